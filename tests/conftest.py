"""Shared fixtures: an isolated $KVTRAIN_HOME, a small real-text corpus, and a tiny saved Llama."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
REPO = TESTS.parent
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# Tests never reach a hub, and they never touch the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
TEST_HOME = os.environ["KVTRAIN_HOME"] = tempfile.mkdtemp(prefix="kvtrain-test-home-")
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_sessionfinish(session, exitstatus):
    """The session's home holds a copy of SmolLM2 (~600 MB): left behind, a few runs fill a CI disk."""
    shutil.rmtree(TEST_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def home() -> Path:
    """The session's $KVTRAIN_HOME with the embedded tokenizer already built (tests copy it around)."""
    from kvtrain.models import load_tokenizer

    load_tokenizer("kvtrain-ref")
    return Path(os.environ["KVTRAIN_HOME"])


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """~1500 paragraphs of real code: the first 40 train-split stdlib files, concatenated."""
    from kvtrain.data.corpus import split_of, stdlib_files, stdlib_root

    files = [f for f in stdlib_files() if split_of(f.as_posix()) == "train"][:40]
    path = tmp_path_factory.mktemp("corpus") / "code.txt"
    path.write_text("\n\n".join((stdlib_root() / f).read_text(encoding="utf-8") for f in files), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialized 2-layer Llama with the embedded tokenizer, saved as a HF folder."""
    from kvtrain.models import load_model, load_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    load_model("kvtrain-ref", init="random", config_overrides=TINY).save_pretrained(str(path))
    load_tokenizer("kvtrain-ref").save_pretrained(str(path))
    return path


def run_kvtrain(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    """Run the `kvtrain` console entry point in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "kvtrain.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
