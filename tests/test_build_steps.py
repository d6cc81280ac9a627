"""Normalisation, Gutenberg stripping and quality filters, step by step."""

from __future__ import annotations

import pytest
from build_helpers import CORPORA, shared_text

from data_pipeline.base import RAW_TEXT, Doc
from data_pipeline.filters import build_filters, load_filter_config
from data_pipeline.normalize import GutenbergStripper, Normalizer
from data_pipeline.readers import Decoder
from gptforge.errors import ConfigError

PROSE = (
    "The king had three sons, and the youngest of them was called the simpleton. He went out into the "
    "forest with the others, and they found a little grey man who asked them for bread and wine. "
)


def doc(text: str) -> Doc:
    d = Doc("t", 0, 0, RAW_TEXT, None, len(text.encode()))
    d.text = text
    return d


def reasons(text: str, spec: str = "default") -> list[str | None]:
    """The removal reason of the first failing family, or [None] if every family keeps it."""
    d = doc(text)
    for step in build_filters(load_filter_config(spec)):
        if not step(d):
            return [d.removed]
    return [None]


def test_normalizer_nfc_controls_line_endings():
    d = doc("Cafe\u0301\r\nline two\rthree\u2028four\x00\x07\tkept\x1b\ufeff\n")
    assert Normalizer()(d)
    assert d.text == "Caf\u00e9\nline two\nthree\nfour\tkept\n"
    e = doc(" \n\t\x00\r\n")
    assert not Normalizer()(e) and e.removed == "empty"


def test_gutenberg_header_and_footer_stripped():
    d = Doc("grimm", 0, 0, RAW_TEXT, (CORPORA / "grimm_tales.txt").read_bytes(), 0)
    assert Decoder()(d) and Normalizer()(d) and GutenbergStripper()(d)
    assert "Project Gutenberg" not in d.text and "START OF THIS" not in d.text
    assert d.text.startswith("Produced by") and d.text.endswith("ends of lines were retained.\n")
    raw = shared_text("grimm_tales.txt")
    assert 0.9 * len(raw) < len(d.text) < len(raw) - 18000  # the licence (~18 kB) is gone, the tales stay


@pytest.mark.parametrize("name", ["tinyshakespeare.txt", "grimm_tales.txt"])
def test_default_filters_keep_the_shared_literary_corpora(name):
    assert reasons(shared_text(name)) == [None]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("too short to be a document", "filter:gopher.min_words"),
        ("a b c d e f g h i j " * 10 + PROSE, "filter:gopher.min_mean_word_length"),
        ("#tag " * 30 + PROSE, "filter:gopher.max_symbol_word_ratio"),
        (
            "\n".join(["and then the story went on and on..."] * 4 + [PROSE]),
            "filter:gopher.max_ellipsis_line_ratio",
        ),
        (
            "\n".join(f"- the golden items with number {i} of that castle." for i in range(60)),
            "filter:gopher.max_bullet_line_ratio",
        ),
        ("1234 5678 9012 3456 " * 30 + PROSE, "filter:gopher.min_alpha_word_ratio"),
        (
            "Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 5,
            "filter:gopher.min_stop_words",
        ),
        (PROSE.replace(".", ",") + "\n" + PROSE.replace(".", ";"), "filter:c4.min_terminal_punct_line_ratio"),
        (PROSE * 2 + "lorem ipsum dolor sit amet.", "filter:c4.lorem_ipsum"),
        (
            "\n".join([PROSE * 2, "Please enable JavaScript to view this page.", "We use cookies."]),
            "filter:c4.max_javascript_policy_line_ratio",
        ),
        (PROSE * 2 + " function f() { return 1; }.", "filter:c4.curly_braces"),
        (
            "\n".join(
                [
                    PROSE,
                    "Subscribe to the newsletter today.",
                    "Subscribe to the newsletter today.",
                    "Subscribe to the newsletter today.",
                ]
            ),
            "filter:fineweb.max_duplicate_line_ratio",
        ),
        (
            "\n".join([PROSE] + [f"Short line {w}." for w in "abcdefghijklmnopqrst"]),
            "filter:fineweb.max_short_line_ratio",
        ),
        (PROSE + " buy cheap pills now" * 40 + ".", "filter:repetition.top_2gram_char_ratio"),
    ],
)
def test_each_filter_check_removes_its_junk(text, reason):
    assert reasons(text) == [reason]
    assert reasons(text, "none") == [None]


def test_batch_decisions_equal_one_document_at_a_time():
    """Filters compute features for a whole batch; the decisions must not depend on the batch."""
    from build_helpers import chunk_documents

    texts = chunk_documents(shared_text("tinyshakespeare.txt"), words=60, limit=300)
    texts += [PROSE + " buy cheap pills now" * 40 + ".", "tiny", PROSE * 3]
    one_by_one = [reasons(t) for t in texts]
    assert sum(r != [None] for r in one_by_one) > 10  # the batch has removals to agree on
    docs = [doc(t) for t in texts]
    alive = docs
    for step in build_filters(load_filter_config("default")):
        alive = step.run(alive)
    assert [[d.removed] for d in docs] == one_by_one


def test_prose_passes_every_check():
    assert reasons(PROSE * 3) == [None]


def test_yaml_overrides_and_switches(tmp_path):
    cfg = tmp_path / "f.yaml"
    cfg.write_text(
        "gopher:\n  min_words: 5\nc4: null\nfineweb:\n  max_short_line_ratio: null\n"
        "repetition:\n  enabled: false\n"
    )
    merged = load_filter_config(str(cfg))
    assert merged["gopher"]["min_words"] == 5 and merged["gopher"]["min_mean_word_length"] == 3.0
    assert merged["c4"]["enabled"] is False and merged["repetition"]["enabled"] is False
    assert [f.family for f in build_filters(merged)] == ["gopher", "fineweb"]
    text = "\n".join(["The king and the miller went out."] + [f"Short line {w}." for w in "abcdefghij"])
    assert reasons(text) == ["filter:gopher.min_words"]
    assert reasons(text, str(cfg)) == [None]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("gopher:\n  min_word: 5\n", "unknown key gopher.min_word; did you mean 'min_words'"),
        ("gopherr:\n  min_words: 5\n", "unknown filter family 'gopherr'; did you mean 'gopher'"),
        ("gopher:\n  min_words: many\n", "gopher.min_words must be a number or null"),
        ("c4:\n  curly_braces: 1\n", "c4.curly_braces must be true or false"),
        ("gopher: [1\n", "f.yaml:2: invalid YAML"),
    ],
)
def test_yaml_errors_name_file_and_key(tmp_path, yaml_text, message):
    cfg = tmp_path / "f.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_filter_config(str(cfg))
