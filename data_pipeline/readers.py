"""Readers: input specs -> sorted sources -> raw records, streamed; and the `Decoder` step that turns a raw
record into text and id.

Reading (file I/O, decompression, line splitting) happens in the rank's main process; decoding and JSON
parsing happen in the worker processes, so they run in parallel. Records are yielded one at a time: memory
holds a batch, never the corpus.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.base import RAW_JSON, RAW_TEXT, STR_TEXT, Doc, Step
from gptforge.errors import DataError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Source:
    """One input: a file (`path` as given or as found under a given directory/glob) or an `hf:` spec."""

    path: str
    kind: str  # txt | jsonl | parquet | hf
    size: int  # bytes on disk (0 for hf:), to balance ranks

    @property
    def compressed(self) -> bool:
        return self.path.lower().endswith((".gz", ".zst"))


def _kind(path: str) -> str | None:
    name = path.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    if name.endswith(JSON_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _file_source(path: str, explicit: bool) -> Source | None:
    kind = _kind(path)
    if kind is None:
        if explicit:
            raise DataError(
                f"input {path}: unsupported file type; use .txt, .jsonl/.json (optionally .gz/.zst), "
                ".parquet or hf:NAME[:SPLIT]"
            )
        return None
    return Source(path, kind, os.path.getsize(path))


def expand_inputs(inputs: list[str]) -> list[Source]:
    """Files, directories (recursively: every supported file in them) and globs, in sorted path order."""
    found: dict[str, Source] = {}
    for spec in inputs:
        if spec.startswith("hf:"):
            found[spec] = Source(spec, "hf", 0)
        elif os.path.isfile(spec):
            src = _file_source(spec, explicit=True)
            found[src.path] = src
        elif os.path.isdir(spec):
            for root, dirs, files in os.walk(spec):
                dirs.sort()
                for name in files:
                    src = _file_source(os.path.join(root, name), explicit=False)
                    if src:
                        found[src.path] = src
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"input glob {spec!r} matches no files")
            for path in matches:
                if os.path.isfile(path) and (src := _file_source(path, explicit=False)):
                    found[src.path] = src
        else:
            raise DataError(f"input not found: {spec} (give files, directories, globs or hf:NAME[:SPLIT])")
    return [found[k] for k in sorted(found)]


# ---------------------------------------------------------------------------------------------- reading


def _open_binary(path: str) -> io.BufferedIOBase:
    """Decompressing by suffix, in any case (`.GZ` too)."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed with the returned reader
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")  # noqa: SIM115


def _read_txt(src: Source) -> Iterator[Doc]:
    try:
        with _open_binary(src.path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{src.path}: cannot read ({exc})") from None
    yield Doc(src.path, 0, 0, RAW_TEXT, data, len(data))


def _read_jsonl(src: Source) -> Iterator[Doc]:
    index = 0
    try:
        with _open_binary(src.path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield Doc(src.path, index, lineno, RAW_JSON, line, len(line))
                    index += 1
    except (OSError, EOFError) as exc:
        raise DataError(f"{src.path}: cannot read ({exc})") from None


def _read_parquet(src: Source, text_field: str) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{src.path}: not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{src.path}: no column {text_field!r} (columns: {names}); set --text-field")
    columns = [text_field] + (["id"] if "id" in names else [])
    index = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        texts = batch.column(text_field).to_pylist()
        ids = batch.column("id").to_pylist() if "id" in names else [None] * len(texts)
        for text, rid in zip(texts, ids, strict=True):
            doc = Doc(src.path, index, 0, STR_TEXT, text, len(text.encode()) if isinstance(text, str) else 0)
            if rid is not None:
                doc.id = str(rid)
            yield doc
            index += 1


def _read_hf(src: Source, text_field: str) -> Iterator[Doc]:
    """`hf:NAME_OR_PATH[:SPLIT]`: a `save_to_disk` directory, or a dataset in the local Hugging Face cache."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    spec = src.path[3:]
    name, split = spec, None
    if ":" in spec and "/" not in spec.rsplit(":", 1)[1]:
        name, split = spec.rsplit(":", 1)
    try:
        saved = ("dataset_dict.json", "state.json")
        if os.path.isdir(name) and any((Path(name) / f).is_file() for f in saved):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                split = split or "train"
                if split not in ds:
                    raise DataError(f"{src.path}: no split {split!r} (splits: {list(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split or "train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; all mean "cannot load it offline"
        raise DataError(
            f"{src.path}: cannot load the dataset offline ({type(exc).__name__}: {exc}); give a "
            "save_to_disk directory or a dataset already in the local Hugging Face cache"
        ) from None
    if text_field not in ds.column_names:
        raise DataError(
            f"{src.path}: no column {text_field!r} (columns: {ds.column_names}); set --text-field"
        )
    columns = [text_field] + (["id"] if "id" in ds.column_names else [])
    index = 0
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        ids = batch.get("id", [None] * len(batch[text_field]))
        for text, rid in zip(batch[text_field], ids, strict=True):
            doc = Doc(src.path, index, 0, STR_TEXT, text, len(text.encode()) if isinstance(text, str) else 0)
            if rid is not None:
                doc.id = str(rid)
            yield doc
            index += 1


def read_source(src: Source, text_field: str) -> Iterator[Doc]:
    """The raw records of one source, in file order."""
    if src.kind == "txt":
        return _read_txt(src)
    if src.kind == "jsonl":
        return _read_jsonl(src)
    if src.kind == "parquet":
        return _read_parquet(src, text_field)
    return _read_hf(src, text_field)


# ---------------------------------------------------------------------------------------------- decoding


class Decoder(Step):
    """Raw record -> text and id. Invalid UTF-8 is `decode_error` (or repaired with `utf8_errors="replace"`);
    a malformed JSON line is a `file:line` error, or a `parse_error` removal with `on_error="skip"`."""

    name = "decode"

    def __init__(self, text_field: str = "text", utf8_errors: str = "strict", on_error: str = "fail") -> None:
        super().__init__()
        self.text_field = text_field
        self.utf8_errors = utf8_errors
        self.on_error = on_error

    def _parse_error(self, doc: Doc, what: str) -> str:
        where = f"{doc.source}:{doc.line}" if doc.line else f"{doc.source} record {doc.index}"
        if self.on_error == "fail":
            raise DataError(f"{where}: {what}; fix the input or pass --on-error skip to drop such records")
        return "parse_error"

    def _decode(self, data: bytes) -> str | None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("utf-8", "replace") if self.utf8_errors == "replace" else None

    def apply(self, doc: Doc) -> str | None:
        raw, doc.raw = doc.raw, None
        if doc.kind == RAW_TEXT:
            text = self._decode(raw)
            doc.id = doc.default_id
            if text is None:
                return "decode_error"
            doc.text = text
            return None
        if doc.kind == STR_TEXT:
            doc.id = doc.id or doc.default_id
            if not isinstance(raw, str):
                return self._parse_error(
                    doc, f"field {self.text_field!r} is {type(raw).__name__}, not a string"
                )
            doc.text = raw
            return None
        doc.id = doc.default_id
        line = self._decode(raw)
        if line is None:
            return "decode_error"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            return self._parse_error(doc, f"malformed JSON ({exc.msg} at column {exc.colno})")
        if not isinstance(obj, dict):
            return self._parse_error(doc, f"expected a JSON object, got {type(obj).__name__}")
        if obj.get("id") is not None:
            doc.id = str(obj["id"])
        text = obj.get(self.text_field)
        if not isinstance(text, str):
            what = "missing" if text is None else f"a {type(text).__name__}, not a string"
            return self._parse_error(doc, f"field {self.text_field!r} is {what} (set --text-field)")
        if (
            b"\\ud" in raw or b"\\uD" in raw
        ):  # JSON escapes can encode lone surrogates: not valid Unicode text
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                if self.utf8_errors != "replace":
                    return "decode_error"
                text = _SURROGATE.sub("\ufffd", text)
        doc.text = text
        return None
