"""The notebooks run top to bottom at smoke size (KVTRAIN_SMOKE=1) on the embedded default."""

import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO


@pytest.mark.slow
def test_finetune_then_evaluate_notebook_runs(tmp_path, home, monkeypatch):
    fresh_home = tmp_path / "home"
    shutil.copytree(home / "tokenizers", fresh_home / "tokenizers")
    monkeypatch.setenv("KVTRAIN_HOME", str(fresh_home))
    monkeypatch.setenv("KVTRAIN_SMOKE", "1")
    nb = nbformat.read(REPO / "notebooks" / "finetune_then_evaluate.ipynb", as_version=4)
    namespace_check = nbformat.v4.new_code_cell(
        "assert [r['kv bits'] for r in after] == ['fp32', 2, 3, 4, 8]\n"
        "sizes = [r['bytes/token'] for r in after]\n"
        "assert sizes[0] == 4 * 2 * 32 * 2 * 4 and sizes[1] < sizes[2] < sizes[3] < sizes[4] < sizes[0]\n"
        "assert all(r['ppl'] > 1 for r in before + after)"
    )
    nb.cells.append(namespace_check)  # checks on the notebook's own variables, run in its kernel
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "kv_bits_vs_ppl.png").stat().st_size > 10_000
    tables = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/markdown" in o.get("data", {})]
    assert any("| QAT (kivi2) | 2 |" in o["data"]["text/markdown"] for o in tables)


@pytest.mark.slow
def test_rl_length_penalty_notebook_runs(tmp_path, home, monkeypatch):
    fresh_home = tmp_path / "home"
    shutil.copytree(home / "tokenizers", fresh_home / "tokenizers")
    monkeypatch.setenv("KVTRAIN_HOME", str(fresh_home))
    monkeypatch.setenv("KVTRAIN_SMOKE", "1")
    nb = nbformat.read(REPO / "notebooks" / "rl_length_penalty.ipynb", as_version=4)
    namespace_check = nbformat.v4.new_code_cell(
        "assert len(before['lengths']) == len(after['lengths']) == EVAL_PROBLEMS\n"
        "assert 0 < before['length'] <= EVAL_TOKENS and 0 < after['length'] <= EVAL_TOKENS\n"
        "assert series('train/length')[0] == list(range(RL_STEPS))\n"
        "assert all(0 < n <= BUDGET for n in series('train/length')[1])\n"
        "assert series('val/accuracy')[1] and all(0 <= a <= 1 for a in series('val/accuracy')[1])"
    )
    nb.cells.append(namespace_check)  # checks on the notebook's own variables, run in its kernel
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    for plot in ("rl_training_curves.png", "length_histogram.png"):
        assert (tmp_path / plot).stat().st_size > 10_000
    assert (fresh_home / "runs" / "sft_reasoning" / "model" / "config.json").is_file()  # built on first use
    tables = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/markdown" in o.get("data", {})]
    assert any("| DLER |" in o["data"]["text/markdown"] for o in tables)
