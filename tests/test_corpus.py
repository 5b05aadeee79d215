from collections import Counter
from pathlib import Path

import pytest

from kvtrain.data.corpus import load_documents, split_of, stdlib_files


def test_split_is_a_pure_function_of_the_key():
    keys = [f"pkg/mod{i}.py" for i in range(2000)]
    first = [split_of(k) for k in keys]
    assert first == [split_of(k) for k in reversed(keys)][::-1]
    counts = Counter(first)
    assert counts["val"] + counts["test"] < 0.04 * len(keys)
    assert counts["val"] > 0 and counts["test"] > 0


def test_split_pinned_values():
    # A change of hash or bucket rule would silently reshuffle every user's splits.
    assert split_of("collections/abc.py") == "val"
    assert split_of("operator.py") == "val"
    assert split_of("fnmatch.py") == "test"
    assert split_of("struct.py") == "test"
    assert split_of("os.py") == "train"


def test_stdlib_corpus_excludes_tests_and_idle():
    files = stdlib_files()
    assert len(files) > 300
    assert files == sorted(files)
    for f in files:
        assert f.suffix == ".py"
        assert not {"test", "tests", "idlelib", "site-packages"} & set(f.parts[:-1]), f
    splits = Counter(split_of(f.as_posix()) for f in files)
    assert splits["train"] / len(files) > 0.95
    assert splits["val"] >= 1 and splits["test"] >= 1


def test_stdlib_splits_are_disjoint_and_cover_the_corpus():
    sizes = {s: len(load_documents(None, s)) for s in ("train", "val", "test")}
    from kvtrain.data.corpus import stdlib_root

    nonempty = [f for f in stdlib_files() if (stdlib_root() / f).read_text(encoding="utf-8").strip()]
    assert sum(sizes.values()) == len(nonempty)
    assert sizes["train"] > 50 * sizes["val"]


def test_text_file_yields_all_splits(corpus_file):
    docs = {s: load_documents(str(corpus_file), s) for s in ("train", "val", "test")}
    assert all(docs.values())
    assert not set(docs["val"]) & set(docs["train"])
    total = sum(len(d) for d in docs.values())
    assert len(docs["train"]) / total > 0.9


def test_folder_of_files_matches_concatenated_file(tmp_path, corpus_file):
    text = corpus_file.read_text()
    half = len(text) // 2
    cut = text.index("\n\n", half)
    (tmp_path / "a.txt").write_text(text[:cut])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text(text[cut:])
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))  # not UTF-8: skipped
    assert load_documents(str(tmp_path), "val") == load_documents(str(corpus_file), "val")


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["def f():\n    return 1", "", "x = 2"]}),
            "validation": datasets.Dataset.from_dict({"text": ["y = 3"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    assert load_documents(str(tmp_path / "ds"), "train") == ["def f():\n    return 1", "x = 2"]
    assert load_documents(str(tmp_path / "ds"), "val") == ["y = 3"]
    with pytest.raises(ValueError, match="none of them is"):
        load_documents(str(tmp_path / "ds"), "test")


def test_missing_corpus_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(str(tmp_path / "nope"), "train")


def test_empty_corpus_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n\n  \n")
    with pytest.raises(ValueError, match="no non-empty text in its 'train' split"):
        load_documents(str(tmp_path), "train")


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be one of"):
        load_documents(None, "validation")
