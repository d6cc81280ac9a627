"""Text normalisation (one canonical form before hashing and tokenizing) and Project Gutenberg stripping."""

from __future__ import annotations

import re
import unicodedata

from data_pipeline.base import Doc, Step

# Line breaks of every convention become "\n" (CRLF, CR, NEL, Unicode line/paragraph separators).
_LINE_BREAKS = re.compile("\r\n?|[\x85\u2028\u2029]")
_SUSPECT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff]")  # \r included
# C0/C1 control characters except tab and newline, and the byte-order mark / zero-width no-break space.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f\ufeff]")


class Normalizer(Step):
    """Line endings -> "\\n", control characters removed (tab and newline kept), Unicode NFC.

    Exact dedup and MinHash then see one form of each text; a document with nothing but whitespace left is
    removed as `empty`.
    """

    name = "normalize"

    def apply(self, doc: Doc) -> str | None:
        text = doc.text
        ascii_only = text.isascii()
        if _SUSPECT.search(text):  # one scan; most documents need neither substitution
            text = _LINE_BREAKS.sub("\n", text)
            text = _CONTROL.sub("", text)
        if not ascii_only and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if text is not doc.text:
            doc.text = text
            doc.cache.clear()
        return None if text.strip() else "empty"


_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$"
    r"|^\*END\*THE SMALL PRINT![^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK"
    r"|^\s*End of (?:the )?Project Gutenberg'?s? ",
    re.IGNORECASE | re.MULTILINE,
)


class GutenbergStripper(Step):
    """Drop a Project Gutenberg licence header (up to the `*** START OF ... ***` line) and footer (from
    `*** END OF ...` or `End of the Project Gutenberg EBook` on): boilerplate repeated in every book."""

    name = "gutenberg"

    def apply(self, doc: Doc) -> str | None:
        text = doc.text
        if "gutenberg" not in text[:20000].lower() and "gutenberg" not in text[-40000:].lower():
            return None
        if m := _GUTENBERG_START.search(text):
            text = text[m.end() :]
        if m := _GUTENBERG_END.search(text):
            text = text[: m.start()]
        text = text.strip("\n") + "\n"
        doc.text = text
        doc.cache.clear()
        return None if text.strip() else "empty"
