"""The output directory's life cycle: a build is complete iff `manifest.json` exists (written last,
atomically). A finished build with the same options is a no-op; one with other options is refused unless
`--overwrite`. A killed build resumes: its temporary directory, if made with the same options from the same
input files (paths, sizes, modification times), keeps every stage the ranks had finished (see context.py);
anything else is removed and the build starts over. It is deterministic, so the result is the same bytes.
Only the build's own files are ever deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.readers import Source
from gptforge.data.format import MANIFEST, read_manifest
from gptforge.errors import DataError, GptforgeError

log = logging.getLogger("data_pipeline")

TMP_DIR = ".build"
REMOVED = "removed.jsonl"
TOKENIZER_MODEL = "tokenizer.model"
STATE = "build.json"  # in the temporary directory: the options and inputs its files were made from
SHARD = re.compile(r"^(train|val)-\d{5,}\.(bin|idx)$")
_OURS = re.compile(
    r"^(manifest\.json(\.tmp)?|removed\.jsonl(\.tmp)?|(train|val)-\d{5,}\.(bin|idx)|tokenizer\.model|\.build)$"
)


def tmp_dir(out: Path, given: str | None) -> Path:
    """The build's temporary directory: OUTPUT/.build, or one named after the output under --tmp-dir."""
    if given is None:
        return out / TMP_DIR
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
    return Path(given) / f"gptforge-build-{out.name}-{digest}"


def fingerprint(sources: list[Source]) -> list[list]:
    """What identifies the inputs of a resumable build: every file's path, size and modification time."""
    out = []
    for s in sources:
        mtime = 0 if s.kind == "hf" else os.stat(s.path).st_mtime_ns
        out.append([s.path, s.size, mtime])
    return out


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k}: {json.dumps(old.get(k))[:60]} -> {json.dumps(new.get(k))[:60]}" for k in keys[:4]]
    return "; ".join(shown) + (" ..." if len(keys) > 4 else "")


def _intact(out: Path) -> bool:
    """Every shard the manifest lists exists with the size it says (cheap; no hashing)."""
    try:
        manifest = read_manifest(out)
    except GptforgeError:
        return False
    itemsize = np.dtype(manifest.dtype).itemsize
    for split in manifest.splits.values():
        for shard in split.shards:
            b, i = out / shard.bin, out / shard.idx
            if not (b.is_file() and i.is_file() and b.stat().st_size == shard.tokens * itemsize):
                return False
    return True


def clean(out: Path, keep_tmp: bool = False) -> None:
    """Remove the build's own files (the manifest first: a half-cleaned directory is never 'complete'); with
    `keep_tmp`, a resumable build's temporary directory and finished removed.jsonl stay."""
    (out / MANIFEST).unlink(missing_ok=True)
    for entry in sorted(out.iterdir()):
        if _OURS.match(entry.name) and not (keep_tmp and entry.name in (TMP_DIR, REMOVED)):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def discard(out: Path, tmp: Path) -> None:
    """A failed build leaves no manifest and no shards (removed.jsonl stays: it says why)."""
    if out.is_dir():
        for path in out.iterdir():
            if SHARD.match(path.name) or path.name == TOKENIZER_MODEL:
                path.unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


def prepare(out: Path, tmp: Path, config: dict[str, Any], inputs: list[list], overwrite: bool) -> bool:
    """Make `out` ready for a build. Returns False when it already holds this very build (nothing to do)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--output {out} exists and is not a directory")
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text()).get("config")
        except (json.JSONDecodeError, OSError, AttributeError):
            old = None
        if old == config:
            if _intact(out):
                return False
            log.warning(
                "%s was built with these options but its shards are missing or damaged: rebuilding", out
            )
        elif not overwrite:
            what = _diff(old, config) if isinstance(old, dict) else "unreadable manifest"
            raise DataError(
                f"{out} holds a build made with other options ({what}); pass --overwrite to replace it, "
                "or choose another --output"
            )
    state = {"config": config, "inputs": inputs}
    try:
        resume = json.loads((tmp / STATE).read_text()) == state and not (out / MANIFEST).is_file()
    except (OSError, ValueError):
        resume = False
    if out.is_dir():
        foreign = sorted(e.name for e in out.iterdir() if not _OURS.match(e.name))
        if foreign and not overwrite:
            raise DataError(
                f"--output {out} is not empty and is not a build output (it holds {', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}); choose a new directory, or pass --overwrite "
                "(only the build's own files are removed)"
            )
        clean(out, keep_tmp=resume)
    if resume:
        log.info("resuming the build in %s from its finished stages", tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / STATE).write_text(json.dumps(state))
    out.mkdir(parents=True, exist_ok=True)
    return True
