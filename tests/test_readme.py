"""The README's results are the results files': every results block renders from bench/results/*.json
to exactly what the README shows, and a changed number in a results file shows up as a mismatch."""

import json
import shutil
import sys

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

