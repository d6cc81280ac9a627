"""Quality filters: Gopher, C4, FineWeb and repetition heuristics, one class per family, every check switchable.

Thresholds live in `filters_default.yaml` (`--filters default`); `--filters FILE.yaml` overrides them key by
key and `--filters none` switches filtering off. A removed document's reason is `filter:<family>.<check>`
(the YAML key that removed it), so `removed.jsonl` says which threshold to relax.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections import Counter
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data_pipeline.base import Doc, Step
from data_pipeline.features import lines, lower, word_hashes, word_stats
from data_pipeline.textfeatures import ngram_hashes
from gptforge.errors import ConfigError

DEFAULT_FILTERS = Path(__file__).with_name("filters_default.yaml")

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "‣", "◦", "⁃", "-", "*", "–", "—", "➢", "►")
ELLIPSES = ("...", "…")
TERMINAL = (".", "!", "?", '"', "'", "”", "’", "»")
POLICY = ("javascript", "cookie", "privacy policy", "terms of use", "terms of service")
_STOP_WORD = re.compile(r"\b(?:" + "|".join(sorted(STOP_WORDS)) + r")\b")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def _ratio(count: int, total: int) -> float:
    return count / total if total else 0.0


class QualityFilter(Step):
    """A family of checks; each check is one threshold (None = off). The first failing check is the reason."""

    family = "filter"

    def __init__(self, enabled: bool = True, **thresholds: Any) -> None:
        super().__init__()
        self.name = f"filter:{self.family}"
        self.stats.name = self.name
        self.t = thresholds

    def fail(self, key: str) -> str:
        return f"filter:{self.family}.{key}"


class GopherQuality(QualityFilter):
    """Gopher's quality rules: document length, word shape, symbols, list-like and ellipsis-heavy pages,
    and the presence of English function words."""

    family = "gopher"

    def prepare(self, docs: list[Doc]) -> None:
        word_stats(docs)

    def apply(self, doc: Doc) -> str | None:
        t = self.t
        n, alpha, chars = word_stats([doc])[0]
        if t["min_words"] is not None and n < t["min_words"]:
            return self.fail("min_words")
        if t["max_words"] is not None and n > t["max_words"]:
            return self.fail("max_words")
        mean = _ratio(chars, n)
        if t["min_mean_word_length"] is not None and mean < t["min_mean_word_length"]:
            return self.fail("min_mean_word_length")
        if t["max_mean_word_length"] is not None and mean > t["max_mean_word_length"]:
            return self.fail("max_mean_word_length")
        text = doc.text
        ellipses = text.count("...") + text.count("…")
        if (
            t["max_symbol_word_ratio"] is not None
            and _ratio(text.count("#") + ellipses, n) > t["max_symbol_word_ratio"]
        ):
            return self.fail("max_symbol_word_ratio")
        ls = lines(doc)
        limit = t["max_ellipsis_line_ratio"]
        if (
            limit is not None
            and ellipses
            and _ratio(sum(map(str.endswith, ls, repeat(ELLIPSES))), len(ls)) > limit
        ):
            return self.fail("max_ellipsis_line_ratio")
        limit = t["max_bullet_line_ratio"]
        if limit is not None and _ratio(sum(map(str.startswith, ls, repeat(BULLETS))), len(ls)) > limit:
            return self.fail("max_bullet_line_ratio")
        if t["min_alpha_word_ratio"] is not None and _ratio(alpha, n) < t["min_alpha_word_ratio"]:
            return self.fail("min_alpha_word_ratio")
        if t["min_stop_words"] is not None:
            found: set[str] = set()
            for m in _STOP_WORD.finditer(text):
                found.add(m.group())
                if len(found) >= t["min_stop_words"]:
                    break
            if len(found) < t["min_stop_words"]:
                return self.fail("min_stop_words")
        return None


class C4Quality(QualityFilter):
    """C4's rules as document checks: sentences end in punctuation, no placeholder text, no
    javascript/cookie/policy boilerplate, no code or templates (curly braces)."""

    family = "c4"

    def apply(self, doc: Doc) -> str | None:
        t, ls = self.t, lines(doc)
        limit = t["min_terminal_punct_line_ratio"]
        if limit is not None and _ratio(sum(map(str.endswith, ls, repeat(TERMINAL))), len(ls)) < limit:
            return self.fail("min_terminal_punct_line_ratio")
        if t["lorem_ipsum"] and "lorem ipsum" in lower(doc):
            return self.fail("lorem_ipsum")
        limit = t["max_javascript_policy_line_ratio"]
        if limit is not None and any(p in lower(doc) for p in POLICY):
            hits = sum(any(p in s.lower() for p in POLICY) for s in ls)
            if _ratio(hits, len(ls)) > limit:
                return self.fail("max_javascript_policy_line_ratio")
        if t["curly_braces"] and "{" in doc.text:
            return self.fail("curly_braces")
        return None


class FineWebQuality(QualityFilter):
    """FineWeb/Gopher repetition of whole lines and paragraphs (boilerplate, spam), and short-line pages
    (menus, lists)."""

    family = "fineweb"

    @staticmethod
    def _duplicates(items: list[str]) -> tuple[int, int]:
        """(number of items repeating an earlier one, their characters)."""
        counts = Counter(items)
        return len(items) - len(counts), sum(len(s) * (c - 1) for s, c in counts.items() if c > 1)

    def apply(self, doc: Doc) -> str | None:
        t, ls = self.t, lines(doc)
        total = len(doc.text)
        if t["max_duplicate_line_ratio"] is not None or t["max_duplicate_line_char_ratio"] is not None:
            dup, chars = self._duplicates(ls)
            if (
                t["max_duplicate_line_ratio"] is not None
                and _ratio(dup, len(ls)) > t["max_duplicate_line_ratio"]
            ):
                return self.fail("max_duplicate_line_ratio")
            limit = t["max_duplicate_line_char_ratio"]
            if limit is not None and _ratio(chars, total) > limit:
                return self.fail("max_duplicate_line_char_ratio")
        if (
            t["max_duplicate_paragraph_ratio"] is not None
            or t["max_duplicate_paragraph_char_ratio"] is not None
        ):
            paras = [p for p in map(str.strip, _PARAGRAPH_BREAK.split(doc.text)) if p]
            dup, chars = self._duplicates(paras)
            limit = t["max_duplicate_paragraph_ratio"]
            if limit is not None and _ratio(dup, len(paras)) > limit:
                return self.fail("max_duplicate_paragraph_ratio")
            limit = t["max_duplicate_paragraph_char_ratio"]
            if limit is not None and _ratio(chars, total) > limit:
                return self.fail("max_duplicate_paragraph_char_ratio")
        if t["max_short_line_ratio"] is not None:
            short = t["short_line_length"]
            n_short = int(np.count_nonzero(np.fromiter(map(len, ls), np.int64, len(ls)) < short))
            if _ratio(n_short, len(ls)) > t["max_short_line_ratio"]:
                return self.fail("max_short_line_ratio")
        return None


class RepetitionFilter(QualityFilter):
    """Gopher's top n-gram rule: the most frequent word n-gram may not cover too much of the text (catches
    repeated phrases that line-level checks miss). Counts run on numpy word hashes, not Python tuples."""

    family = "repetition"

    def _limits(self) -> list[tuple[int, float]]:
        return sorted((n, v) for n, v in (self.t["max_top_ngram_char_ratio"] or {}).items() if v is not None)

    def prepare(self, docs: list[Doc]) -> None:
        """A bound for every document and n at once; only documents over it get the exact count in `apply`.

        Each n-gram goes to a hash bucket (per batch, a bucket per 1-2 n-grams); a bucket's characters bound those
        of every n-gram in it, so a document whose n-grams all sit in buckets under `limit` of its characters
        passes. Natural text stops here; only repetitive documents are counted exactly."""
        limits = self._limits()
        words = word_hashes(docs)
        for doc in docs:
            doc.cache["repetition_check"] = []
        if not limits:
            return
        smallest = limits[0][0]
        idx = [i for i, (h, _) in enumerate(words) if len(h) >= smallest]
        if not idx:
            return
        hashes = np.concatenate([words[i][0] for i in idx])
        counts = np.array([len(words[i][0]) for i in idx])
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))  # each document's first word
        doc_of = np.repeat(np.arange(len(idx)), counts)
        ends = np.concatenate(([0], np.cumsum(np.concatenate([words[i][1] for i in idx]), dtype=np.int64)))
        totals = ends[first + counts] - ends[first]
        with np.errstate(over="ignore"):
            salt = doc_of.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            grams, n_prev = hashes.copy(), 1
            for n, limit in limits:
                m = len(hashes) - n + 1
                if m <= 0:
                    break
                for j in range(n_prev, n):  # extend the (j)-grams to n-grams in place of recomputing
                    grams = grams[: len(hashes) - j] * np.uint64(0x2545F4914F6CDD1D) + hashes[j:]
                n_prev = n
                valid = doc_of[:m] == doc_of[n - 1 :]  # windows inside one document
                chars = np.where(valid, ends[n:] - ends[:m], 0)
                buckets = 1 << max(8, (m // 2).bit_length())  # small enough to stay in cache
                keys = ((grams + salt[:m]) >> np.uint64(20)).astype(np.int64) & (buckets - 1)
                bound = np.bincount(keys, weights=chars, minlength=buckets)[keys]
                has = counts >= n  # documents with at least one window
                worst = np.maximum.reduceat(bound, np.minimum(first, m - 1))
                for k in np.flatnonzero(has & (worst > limit * totals)):
                    docs[idx[k]].cache["repetition_check"].append((n, limit))

    def apply(self, doc: Doc) -> str | None:
        if "repetition_check" not in doc.cache:
            self.prepare([doc])
        hashes, lengths = word_hashes([doc])[0]
        total = int(lengths.sum())
        ends = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
        for n, limit in doc.cache["repetition_check"]:
            grams = ngram_hashes(hashes, n)
            chars = ends[n:] - ends[:-n]
            values, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
            top = int(np.argmax(counts))
            first = int(np.argmax(inverse == top))
            if _ratio(int(counts[top]) * int(chars[first]), total) > limit:
                return f"filter:{self.family}.top_{n}gram_char_ratio"
        return None


FAMILIES: dict[str, type[QualityFilter]] = {
    "gopher": GopherQuality,
    "c4": C4Quality,
    "fineweb": FineWebQuality,
    "repetition": RepetitionFilter,
}


# ---------------------------------------------------------------------------------------------- config


def _nearest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"


def _check_value(path: str, where: str, value: Any, default: Any) -> None:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {where} must be true or false, got {value!r}")
    elif isinstance(default, dict):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: {where} must be a mapping of n-gram size to ratio, got {value!r}")
        for n, v in (value or {}).items():
            if not isinstance(n, int) or n < 1 or not (v is None or isinstance(v, (int, float))):
                raise ConfigError(f"{path}: {where}.{n} must map a positive integer to a number or null")
    elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(
            f"{path}: {where} must be a number or null (null switches the check off), got {value!r}"
        )


def load_filter_config(spec: str) -> dict[str, dict[str, Any]]:
    """`default`, `none`, or a YAML file merged over the defaults (validated key by key)."""
    default = yaml.safe_load(DEFAULT_FILTERS.read_text())
    if spec == "none":
        return {}
    if spec == "default":
        return default
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--filters {spec}: no such file (use default, none or a YAML file)")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: expected a mapping of filter families ({', '.join(default)})")
    merged = copy.deepcopy(default)
    for family, params in user.items():
        if family not in default:
            raise ConfigError(
                f"{path}: unknown filter family {family!r}{_nearest(str(family), list(default))}"
            )
        if params is None:
            params = {"enabled": False}
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: {family} must be a mapping of checks to thresholds")
        for key, value in params.items():
            if key not in default[family]:
                raise ConfigError(
                    f"{path}: unknown key {family}.{key}{_nearest(str(key), list(default[family]))}"
                )
            _check_value(str(path), f"{family}.{key}", value, default[family][key])
            merged[family][key] = value
    return merged


def build_filters(config: dict[str, dict[str, Any]]) -> list[QualityFilter]:
    return [FAMILIES[family](**params) for family, params in config.items() if params.get("enabled", True)]
