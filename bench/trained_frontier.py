"""Every cache trained on SmolLM2-135M in one protocol, against the bytes it holds: the frontier a user
picks from (issues 12 and 13).

Reads what was measured elsewhere, measures nothing: each trained cache's perplexities from its
bench/qat_recovery.py results (the same 40-step recipe, seeds and windows: `readme_tables.qat_versus`
checks that seed for seed), the plain fine-tune's from the control arm of smollm2/qat_recovery, and each
cache's bytes per token from the real cache in bfloat16, decoding at 1024 tokens, where
bench/kv_quality.py (quantizers) and bench/kv_lowrank.py (latents) measured them. Writes
OUT/trained_frontier.{json,md,png}: per cache the start model's perplexity under it (post-training) and
the trained runs' mean and sample sd, against bytes per token and the share of full precision's.

    python bench/trained_frontier.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kvtrain.eval import write_json
from readme_tables import check_comparable, frontier_table

RESULTS = Path(__file__).resolve().parent / "results"
COMBOS = "smollm2/kv_combos/kv_quality.json"
LOWRANK = "lowrank/smollm2/kv_lowrank.json"
# cache: (its qat_recovery results, the bytes file, the cache's name there; None: a method's kv_lowrank point)
CACHES = {
    "kivi2": ("smollm2/qat_recovery", COMBOS, "kivi2"),
    "rotnuq2": ("smollm2/qat_rotnuq2", COMBOS, "bench/results/smollm2/kv_combos/specs/rotnuq2_prerope_sinks"),
    "sub2bit_15_rot": ("smollm2/qat_sub2bit_15_rot", COMBOS, "bench/results/smollm2/kv_combos/specs/sub2bit_15_rot"),
    "kvquant2": ("smollm2/qat_kvquant2", COMBOS, "bench/results/smollm2/kv_methods/specs/kvquant2"),
    "raw50": ("smollm2/qat_lowrank_raw50", LOWRANK, "raw50"),
    "raw25": ("smollm2/qat_lowrank_raw25", LOWRANK, "raw25"),
    "int2_50": ("smollm2/qat_lowrank_int2_50", LOWRANK, "int2_50"),
    "int4_50": ("smollm2/qat_lowrank_int4_50", LOWRANK, "int4_50"),
    "joint25": ("smollm2/qat_lowrank_joint25", LOWRANK, "joint25"),
    "joint50": ("smollm2/qat_lowrank_joint50", LOWRANK, "joint50"),
}
FULL = "full precision"


def bytes_per_token(results: Path, file: str, name: str) -> float:
    """A cache's bytes per token in bfloat16, decoding at 1024 tokens, as its benchmark measured them."""
    report = json.loads((results / file).read_text())
    if isinstance(report["bytes"], dict):  # kv_lowrank: per point, in bfloat16 at 1024
        return report["bytes"][name]
    return next(row["B/tok 1024"] for row in report["bytes"]
                if row["name"] == name and row["dtype"] == "bfloat16" and row["state"] == "decoding")


def runs(report: dict, arm: str, quantized: bool, split: str) -> list[float]:
    """The perplexities of an arm's runs ("start": the one start model) with or without the cache."""
    return [row["ppl"] for row in report["rows"] if row["model"].split("-seed")[0] == arm
            and (row["kv"] != FULL) == quantized and row["split"] == split]


def point(cache: str, kind: str, nbytes: float, full: float, values: dict[str, list[float]]) -> dict:
    row = {"cache": cache, "kind": kind, "B/token": round(nbytes), "x fp": round(nbytes / full, 4)}
    for split, ppl in values.items():
        row[f"{split} ppl"] = ppl[0] if len(ppl) == 1 else statistics.mean(ppl)
        row[f"{split} sd"] = None if len(ppl) == 1 else statistics.stdev(ppl)
        row[f"{split} n"] = len(ppl)
    return row


def frontier(results: Path = RESULTS, caches: dict = CACHES, splits: tuple[str, ...] = ("val", "test")) -> list[dict]:
    """One row for full precision (the start, and the plain fine-tune), two per cache with finished runs."""
    control = json.loads((results / "smollm2/qat_recovery/results.json").read_text())
    full = bytes_per_token(results, COMBOS, "fp")
    rows = [point(FULL, "start", full, full, {s: runs(control, "start", False, s) for s in splits}),
            point(FULL, "plain fine-tune", full, full, {s: runs(control, "control", False, s) for s in splits})]
    for cache, (folder, file, name) in caches.items():
        path = results / folder / "results.json"
        if not path.is_file():
            continue
        report, nbytes = json.loads(path.read_text()), bytes_per_token(results, file, name)
        check_comparable(report, control, folder, "smollm2/qat_recovery")
        rows.append(point(cache, "post-training", nbytes, full, {s: runs(report, "start", True, s) for s in splits}))
        rows.append(point(cache, "trained", nbytes, full, {s: runs(report, "qat", True, s) for s in splits}))
    return rows


def plot(rows: list[dict], path: Path, split: str = "val") -> None:
    """Perplexity against bytes per token: hollow at the start, filled once trained, an arrow between."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, cache in enumerate(dict.fromkeys(row["cache"] for row in rows)):
        mine = {row["kind"]: row for row in rows if row["cache"] == cache}
        color = f"C{i}"
        for kind, row in mine.items():
            filled = kind in ("trained", "plain fine-tune")
            ax.errorbar(row["B/token"], row[f"{split} ppl"], yerr=row[f"{split} sd"], fmt="o", color=color,
                        mfc=color if filled else "none", label=f"{cache}, {kind}")
        if "post-training" in mine and "trained" in mine:
            a, b = mine["post-training"], mine["trained"]
            ax.annotate("", (b["B/token"], b[f"{split} ppl"]), (a["B/token"], a[f"{split} ppl"]),
                        arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.5})
    tuned = next(row for row in rows if row["kind"] == "plain fine-tune")
    ax.axhline(tuned[f"{split} ppl"], ls=":", color="C0", lw=0.8)  # what every trained cache is held to
    ax.set_yscale("log")
    ax.set_xlabel("KV bytes per token (bfloat16, decoding at 1024 tokens)")
    ax.set_ylabel(f"{split} perplexity (smollm2-135m, 1024-token windows)")
    ax.set_title("SmolLM2-135M: each cache post-training (hollow) and trained 40 steps (filled, 3 seeds)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "smollm2")
    args = parser.parse_args(argv)
    rows = frontier()
    write_json(args.out / "trained_frontier.json", {"rows": rows})
    (args.out / "trained_frontier.md").write_text(frontier_table(rows) + "\n")
    plot(rows, args.out / "trained_frontier.png")
    print(frontier_table(rows))


if __name__ == "__main__":
    main()
