"""The README's results are the results files': every results block renders from bench/results/*.json
to exactly what the README shows, and a changed number in a results file shows up as a mismatch."""

import json
import shutil
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import readme_tables  # noqa: E402


def test_every_results_block_matches_the_results_files():
    readme = (REPO / "README.md").read_text()
    rendered, changed = readme_tables.render(readme)
    assert changed == [], f"README results differ from bench/results: run `python bench/readme_tables.py` ({changed})"
    present = {m["name"] for m in readme_tables.BLOCK.finditer(readme)}
    assert present == set(readme_tables.BLOCKS)  # every renderer has its block, every block its renderer
    assert readme_tables.main(["--check"]) == 0


def test_a_changed_result_is_a_mismatch(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench" / "results", results, ignore=shutil.ignore_patterns("model", "checkpoints", "trl"))
    path = results / "reference" / "val.json"
    report = json.loads(path.read_text())
    report["rows"][0]["ppl"] *= 1.01
    path.write_text(json.dumps(report))
    _, changed = readme_tables.render((REPO / "README.md").read_text(), results)
    assert changed == ["reference"]
    assert readme_tables.main(["--check", f"--results={results}"]) == 1


def test_smollm2_qat_results_ran_the_shipped_recipe():
    """bench/results/smollm2/qat_recovery ran qat_kivi2.yaml with overrides (its runs predate the recipe
    file); applied, they must give recipes/qat_kivi2_smollm2.yaml's training settings, so the README's
    SmolLM2 QAT table is that recipe's."""
    import yaml

    result = json.loads((REPO / "bench" / "results" / "smollm2" / "qat_recovery" / "results.json").read_text())
    ran = yaml.safe_load((REPO / "recipes" / result["recipe"]).read_text())
    for override in result["overrides"]:
        key, value = override.removeprefix("--").split("=", 1)
        *parents, leaf = key.split(".")
        node = ran
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
        if isinstance(node[leaf], str) and node[leaf][:1].isdigit():
            node[leaf] = float(node[leaf])  # YAML 1.1 reads "2e-4" as a string, LightningCLI as a float
    shipped = yaml.safe_load((REPO / "recipes" / "qat_kivi2_smollm2.yaml").read_text())
    assert ran["model"] == shipped["model"] and ran["data"] == shipped["data"]
    assert ran["trainer"]["callbacks"][0] == shipped["trainer"]["callbacks"][0]  # KVQuantCallback kivi2
    for key in ("max_steps", "gradient_clip_val", "precision", "val_check_interval", "limit_val_batches"):
        assert ran["trainer"][key] == shipped["trainer"][key], key


def test_smollm2_codebook_qat_trains_as_the_kivi2_qat_it_is_compared_with():
    """recipes/qat_rotnuq2_smollm2.yaml differs from qat_kivi2_smollm2.yaml in its KV spec only (and so the
    run folders), so the README's seed-for-seed comparison on SmolLM2 is one of caches, not of training."""
    import yaml

    ours, kivi2 = (yaml.safe_load((REPO / "recipes" / f"qat_{n}_smollm2.yaml").read_text()) for n in ("rotnuq2", "kivi2"))
    assert ours["model"] == kivi2["model"] and ours["data"] == kivi2["data"] and ours["seed_everything"] == kivi2["seed_everything"]
    assert {k: v for k, v in ours["trainer"].items() if k not in ("callbacks", "logger")} == {
        k: v for k, v in kivi2["trainer"].items() if k not in ("callbacks", "logger")}
    assert [c["class_path"] for c in ours["trainer"]["callbacks"]] == [c["class_path"] for c in kivi2["trainer"]["callbacks"]]
    assert ours["trainer"]["callbacks"][0]["init_args"]["spec"] != "kivi2"


def test_a_run_with_its_own_control_is_measured_against_it():
    """A run that trained its own plain fine-tune (e.g. 80 steps) is held against that one, not against the
    baseline's control of another length."""
    results = REPO / "bench" / "results"
    block = readme_tables.qat_versus(results, "smollm2/qat_recovery", "smollm2/qat_rotnuq2", name="own")
    own = json.loads((results / "smollm2" / "qat_recovery" / "results.json").read_text())
    ppl = {(r["model"], r["kv"] != "full precision"): r["ppl"] for r in own["rows"] if r["split"] == "test"}
    line = block.split("- test: own QAT under its cache against the plain fine-tune (full-precision KV, "
                       "smollm2/qat_recovery's control, same seed): ")[1]
    assert f"(seeds: {100 * (ppl['qat-seed1', True] / ppl['control-seed1', False] - 1):+.2f}, " in line.split("\n")[0]


def test_a_comparison_of_runs_evaluated_on_other_windows_is_refused(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench" / "results" / "smollm2", results / "smollm2",
                    ignore=shutil.ignore_patterns("model", "checkpoints", "specs"))
    path = results / "smollm2" / "qat_rotnuq2" / "results.json"
    report = json.loads(path.read_text())
    block = readme_tables.qat_versus(results, "smollm2/qat_rotnuq2", "smollm2/qat_recovery")
    control = json.loads((results / "smollm2" / "qat_recovery" / "results.json").read_text())
    ours = next(r["ppl"] for r in report["rows"] if (r["model"], r["split"]) == ("qat-seed1", "val") and r["kv"] != "full precision")
    plain = next(r["ppl"] for r in control["rows"] if (r["model"], r["kv"], r["split"]) == ("control-seed1", "full precision", "val"))
    assert f"(seeds: {100 * (ours / plain - 1):+.2f}, " in block.split("- val: rotnuq2 QAT under its cache against the plain")[1]
    assert "against qat_kivi2.yaml (model.init_args.model=smollm2-135m, trainer.max_steps=40," in block  # its overrides
    longer = readme_tables.qat_versus(results, "smollm2/qat_rotnuq2", "smollm2/qat_rotnuq2", name="long", base="short")
    assert "- val: long QAT minus short QAT, each under its own cache, same seed: **0.00 ± 0.00**" in longer
    assert longer.count("post-training") == 1 and "| **long QAT** | rotnuq2 |" in longer  # one start, its cache named
    path.write_text(json.dumps({**report, "max_batches": report["max_batches"] + 1}))
    with pytest.raises(ValueError, match="max_batches"):
        readme_tables.qat_versus(results, "smollm2/qat_rotnuq2", "smollm2/qat_recovery")
