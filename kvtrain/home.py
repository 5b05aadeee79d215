"""The kvtrain cache directory: everything kvtrain builds (tokenizer, tokenized corpus, reference
model) lands in `$KVTRAIN_HOME` (default `~/.cache/kvtrain`) and is reused.

An entry is a folder written to a temporary sibling and renamed into place only when complete, with
a manifest of sha256 digests. On load the manifest is checked, so a partial or corrupted entry is
detected and rebuilt instead of being used silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

MANIFEST = "kvtrain-manifest.json"


def kvtrain_home() -> Path:
    return Path(os.environ.get("KVTRAIN_HOME", Path.home() / ".cache" / "kvtrain")).expanduser()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {str(p.relative_to(folder)): _digest(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(digests, indent=1, sort_keys=True))


def is_complete(folder: Path) -> bool:
    """True iff `folder` holds a manifest and every listed file exists with its recorded digest."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        digests = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return all((folder / rel).is_file() and _digest(folder / rel) == d for rel, d in digests.items())


def publish(tmp: Path, target: Path) -> Path:
    """Seal `tmp` with a manifest and move it to `target`, replacing a stale entry."""
    write_manifest(tmp)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def cached_entry(relpath: str, build: Callable[[Path], None]) -> Path:
    """Return `$KVTRAIN_HOME/relpath`, calling `build(tmp_dir)` first if it is missing or corrupt."""
    target = kvtrain_home() / relpath
    if is_complete(target):
        return target
    if target.exists():
        warnings.warn(f"kvtrain cache entry {target} is incomplete or corrupt; rebuilding it", stacklevel=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        return publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
