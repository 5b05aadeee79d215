"""Text sources, each split deterministically into train/val/test.

The embedded default is the Python standard library of the running interpreter: real code that
nobody here wrote, present on every machine, so nothing has to be downloaded. A document lands in
a split by a hash of a stable key (its relative path, or its text), about 98/1/1, so the split never
depends on file-system order or on which other documents exist.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

SPLITS = ("train", "val", "test")
STDLIB = "stdlib"
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}


def split_of(key: str, held_out_percent: int = 1) -> str:
    """The split a document (or task problem) belongs to, from a hash of its key alone:
    `held_out_percent` % each to val and test, the rest to train. Disjoint by construction."""
    if not 0 < held_out_percent < 50:
        raise ValueError(f"held_out_percent must be in 1..49, got {held_out_percent}")
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return "val" if bucket < held_out_percent else "test" if bucket < 2 * held_out_percent else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Relative paths of the stdlib's `*.py` files, sorted, without tests, idlelib or site-packages."""
    root = root or stdlib_root()
    files = (p.relative_to(root) for p in root.rglob("*.py"))
    return sorted(p for p in files if not _EXCLUDED_DIRS.intersection(p.parts[:-1]))


def _read_stdlib(root: Path, relpaths: list[Path], split: str) -> list[str]:
    texts = ((root / rel).read_text(encoding="utf-8") for rel in relpaths if split_of(rel.as_posix()) == split)
    return [t for t in texts if t.strip()]


def _read_text_files(path: Path) -> list[str]:
    """Every UTF-8 file under `path` (or `path` itself), in sorted order; binary files are skipped."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def _load_datasets_folder(folder: Path, split: str, text_column: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{folder} is a `datasets` folder; install it with `pip install 'kvtrain[datasets]'`") from e
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        names = {"train": ["train"], "val": ["validation", "val", "valid"], "test": ["test"]}[split]
        name = next((n for n in names if n in ds), None)
        if name is None:
            raise ValueError(f"datasets folder {folder} has splits {list(ds)}; none of them is {names}")
        rows = ds[name][text_column]
        return [t for t in rows if t and t.strip()]
    rows = ds[text_column]
    return [t for t in rows if t and t.strip() and split_of(t) == split]


def load_documents(source: str | None, split: str, text_column: str = "text") -> list[str]:
    """Documents of one split of `source`.

    source: None or "stdlib" (the embedded default: one document per file, split by relative path),
    a text file or a folder of text files (every UTF-8 file under it; documents are blank-line
    separated paragraphs, split by their text, so even a single file yields all three splits),
    or a folder written by `datasets.save_to_disk` (its own splits, or rows split by their text).
    """
    _check_split(split)
    if source in (None, STDLIB):
        root = stdlib_root()
        docs = _read_stdlib(root, stdlib_files(root), split)
        where = f"the Python standard library at {root}"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"corpus {source!r} does not exist (pass a text file, a folder, or 'stdlib')")
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            docs = _load_datasets_folder(path, split, text_column)
        else:
            paragraphs = (p for text in _read_text_files(path) for p in _paragraphs(text))
            docs = [p for p in paragraphs if split_of(p) == split]
        where = str(path)
    if not docs:
        raise ValueError(f"corpus {where} has no non-empty text in its {split!r} split")
    return docs
