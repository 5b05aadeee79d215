"""The notebooks run top to bottom at smoke size (KVTRAIN_SMOKE=1) on the embedded default."""

import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO


def run_notebook(name, checks, tmp_path, home, monkeypatch, timeout=900):
    """Execute notebooks/<name> in tmp_path with a fresh $KVTRAIN_HOME, then `checks` (code run in its
    kernel, on the notebook's own variables); returns the executed notebook."""
    fresh_home = tmp_path / "home"
    shutil.copytree(home / "tokenizers", fresh_home / "tokenizers")
    monkeypatch.setenv("KVTRAIN_HOME", str(fresh_home))
    monkeypatch.setenv("KVTRAIN_SMOKE", "1")
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(checks))
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def markdown_outputs(nb):
    return [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "text/markdown" in o.get("data", {})]


@pytest.mark.slow
def test_finetune_then_evaluate_notebook_runs(tmp_path, home, monkeypatch):
    checks = ("assert [r['kv bits'] for r in after] == ['fp32', 2, 3, 4, 8]\n"
              "sizes = [r['bytes/token'] for r in after]\n"
              "assert sizes[0] == 4 * 2 * 32 * 2 * 4 and sizes[1] < sizes[2] < sizes[3] < sizes[4] < sizes[0]\n"
              "assert all(r['ppl'] > 1 for r in before + after)\n"
              "assert after[1]['kv bits'] == before[1]['kv bits'] == 2\n"
              "assert after[1]['ppl'] < before[1]['ppl']  # the QAT row beats the post-training row under kivi2")
    checks += ("\nassert [r['model'] for r in low_rank] == ['kvtrain-ref, SVD start', 'kvtrain-ref, calibrated', 'low-rank QAT']\n"
               "assert all(r['bytes/token'] == low_rank[0]['bytes/token'] < after[1]['bytes/token'] * 2 for r in low_rank)\n"
               "assert low_rank[1]['ppl'] != low_rank[0]['ppl'] and low_rank[2]['ppl'] < low_rank[1]['ppl']")
    nb = run_notebook("finetune_then_evaluate.ipynb", checks, tmp_path, home, monkeypatch)
    assert (tmp_path / "kv_bits_vs_ppl.png").stat().st_size > 10_000
    assert (tmp_path / "kv_lowrank_vs_ppl.png").stat().st_size > 10_000
    assert any("| QAT (kivi2) | 2 |" in table for table in markdown_outputs(nb))


@pytest.mark.slow
def test_rl_length_penalty_notebook_runs(tmp_path, home, monkeypatch):
    checks = ("assert len(before['lengths']) == len(after['lengths']) == EVAL_PROBLEMS\n"
              "assert 0 < before['length'] <= EVAL_TOKENS and 0 < after['length'] <= EVAL_TOKENS\n"
              "assert series('train/length')[0] == list(range(RL_STEPS))\n"
              "assert all(0 < n <= BUDGET for n in series('train/length')[1])\n"
              "assert series('val/accuracy')[1] and all(0 <= a <= 1 for a in series('val/accuracy')[1])\n"
              "again = evaluate(module.model, 'DLER')  # the table's DLER row is the trained policy's, greedy\n"
              "assert again['lengths'] == after['lengths'] and again['correct'] == after['correct']")
    nb = run_notebook("rl_length_penalty.ipynb", checks, tmp_path, home, monkeypatch, timeout=1200)
    for plot in ("rl_training_curves.png", "length_histogram.png"):
        assert (tmp_path / plot).stat().st_size > 10_000
    assert (tmp_path / "home" / "runs" / "sft_reasoning" / "model" / "config.json").is_file()  # built on first use
    assert any("| DLER |" in table for table in markdown_outputs(nb))


@pytest.mark.slow
def test_token_eviction_notebook_runs(tmp_path, home, monkeypatch):
    checks = ("caches = [r['cache'] for r in before]\n"
              "assert caches[:3] == ['full cache', 'SnapKV 25%', 'H2O 25%'] and len(before) == 5 and len(after) == 4\n"
              "ratios = [r['bytes vs full'] for r in before]\n"
              "assert ratios[0] == 1 and all(r < 0.5 for r in ratios[1:])\n"
              "assert ratios[3] <= ratios[1] and ratios[3] > 0.5 * ratios[1]  # MiKV fits SnapKV-25%'s bytes, just\n"
              "assert all(0 <= r['exact match'] <= 1 for r in before + after)\n"
              "assert 0 < retained_kept < 0.25")
    nb = run_notebook("token_eviction.ipynb", checks, tmp_path, home, monkeypatch)
    assert (tmp_path / "eviction_accuracy_vs_bytes.png").stat().st_size > 10_000
    assert (tmp_path / "home" / "runs" / "token_eviction" / "base" / "config.json").is_file()
    assert any("| SnapKV 25% fine-tune (straight through) | SnapKV 25% |" in table for table in markdown_outputs(nb))
