"""The output directory's life cycle: a build is complete iff `manifest.json` exists (written last,
atomically). A finished build with the same options is a no-op; one with other options is refused unless
`--overwrite`; leftovers of a killed build are removed and the build starts over (it is deterministic, so the
result is the same bytes). Only the build's own files are ever deleted.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gptforge.data.format import MANIFEST, read_manifest
from gptforge.errors import DataError, GptforgeError

log = logging.getLogger("data_pipeline")

TMP_DIR = ".build"
REMOVED = "removed.jsonl"
_OURS = re.compile(r"^(manifest\.json(\.tmp)?|removed\.jsonl(\.tmp)?|(train|val)-\d{5}\.(bin|idx)|\.build)$")


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


def clean(out: Path) -> None:
    """Remove the build's own files (the manifest first: a half-cleaned directory is never 'complete')."""
    (out / MANIFEST).unlink(missing_ok=True)
    for entry in sorted(out.iterdir()):
        if _OURS.match(entry.name):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def prepare(out: Path, config: dict[str, Any], overwrite: bool) -> bool:
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
    if out.is_dir():
        foreign = sorted(e.name for e in out.iterdir() if not _OURS.match(e.name))
        if foreign and not overwrite:
            raise DataError(
                f"--output {out} is not empty and is not a build output (it holds {', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}); choose a new directory, or pass --overwrite "
                "(only the build's own files are removed)"
            )
        clean(out)
    (out / TMP_DIR).mkdir(parents=True, exist_ok=True)
    return True
