"""The kvtrain cache directory: everything kvtrain builds (tokenizer, tokenized corpus, reference
model) lands in `$KVTRAIN_HOME` (default `~/.cache/kvtrain`) and is reused.

An entry is a folder written to a temporary sibling and renamed into place only when complete, with
a manifest of sha256 digests. On load the manifest is checked, so a partial or corrupted entry is
detected and rebuilt instead of being used silently. Processes that want the same entry at once
(the ranks of a job) take a file lock: one builds, the others wait and load it.

`publish` is also how exports land: it never replaces a folder kvtrain did not write (no manifest)
unless told to, and the folder it replaces is moved aside and removed only once the new one is in
place, so a failure at any point leaves either the old folder or the new one, never neither.
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

from filelock import FileLock

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


def written_by_kvtrain(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def check_replaceable(target: Path, overwrite: bool = False) -> None:
    """Raise unless `target` is absent, an empty folder, a folder kvtrain wrote, or `overwrite` is set."""
    if not target.exists() or overwrite or written_by_kvtrain(target):
        return
    if target.is_dir() and not any(target.iterdir()):
        return
    kind = "folder" if target.is_dir() else "file"
    raise FileExistsError(
        f"{target} is a non-empty {kind} that kvtrain did not write (it has no {MANIFEST}); kvtrain will not "
        "replace it. Choose another destination, or pass overwrite=True (`--overwrite true`) to replace it."
    )


def publish(tmp: Path, target: Path, overwrite: bool = False) -> Path:
    """Seal `tmp` with a manifest and move it to `target`. An existing target (see check_replaceable)
    is moved aside first and deleted only after `tmp` is in its place; if that rename fails, the old
    target is put back and `tmp` is left as it is."""
    check_replaceable(target, overwrite)
    write_manifest(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent)) / target.name
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
            old.parent.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
    return target


def lock(target: Path) -> FileLock:
    """The inter-process lock of one entry (a file beside it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target.parent / f".{target.name}.lock"))


def cached_entry(relpath: str, build: Callable[[Path], None]) -> Path:
    """Return `$KVTRAIN_HOME/relpath`, calling `build(tmp_dir)` first if it is missing or corrupt."""
    target = kvtrain_home() / relpath
    if is_complete(target):
        return target
    with lock(target):
        if is_complete(target):  # another process built it while we waited
            return target
        if target.exists():
            warnings.warn(f"kvtrain cache entry {target} is incomplete or corrupt; rebuilding it", stacklevel=2)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            return publish(tmp, target, overwrite=True)  # $KVTRAIN_HOME's entries are kvtrain's own
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
