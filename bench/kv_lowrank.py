"""Low-rank K/V (issue 13): perplexity against the KV bytes per token a cache holds, on kvtrain-ref.

Each point is a spec of `recipes/lowrank_cskv.yaml`'s form (keys pre-RoPE, a 32-token full-precision
window, the latents of older tokens in the cache) at some key and value ranks, the latents kept in
float16 ("raw") or quantized at 4 or 2 bits (KIVI-style: the key latent per channel in groups of 32
tokens, the value latent per token in groups of 8 numbers). Rows, on whole val and test splits at 1024
tokens (every prediction reading K/V as the cache holds them, train/decode parity):

    kivi2/kivi4  quantization alone, post-training (the presets: 2 and 4 bits, a 128-token window)
    svd          the factors as attach starts them: the truncated SVD of k_proj / v_proj (CSKV's init)
    raw25f       raw25's bytes with the ranks re-spent per layer by calibration (`--ranks fisher`, Palu's
                 Fisher rank search: kvtrain.kv.calibrate.fisher_ranks); calibrated and trained rows only;
                 raw25f50 the same with each latent keeping at least half its rank (`--rank_floor 0.5`)
    weights      ThinK's kept channels as attach starts them: each head's largest k_proj / v_proj rows
    calibrated   refitted to the principal directions of the model's own K and V (`kvtrain calibrate`
                 on 16 windows of the train split: Palu's whitened SVD; for raw latents also the
                 optimum of CSKV's layer-wise reconstruction objective, which it trains towards; ThinK:
                 each head's channels with the highest E[q_j^2] E[k_j^2], values by E[v_j^2])
    trained      fine-tuned end to end from the calibration (the recipe: LM loss + KL to the full-KV
                 model, 120 steps of 4 x 1024), 3 seeds, each with its own full-precision-KV perplexity
    references   kivi2 QAT and the calibrated 2-bit codebook QAT (bench/results/qat_recovery, qat_nuq2)

Joint points (`JOINT`: joint50, joint25) hold the raw points' latent numbers per token in one latent of K
and V together (`joint_kv`, MHA2MLA's joint SVD of [W_k; W_v]): the same bytes, shared directions.

ThinK points (`THINK`) prune key channels (40%, 60%: ThinK's settings, values in full precision) or key
and value channels (50%: the low-rank 50% points' bytes), post-RoPE, the same window, kept channels in
float16. A report run re-evaluates the points it is given and keeps the committed rows of the others
(OUT/kv_lowrank.json), so a new point does not need every trained model on the machine.

Bytes: real caches for kvtrain-ref's shape filled with random K/V in bfloat16, decoding at 1024 tokens
(bench/kv_quality.py's measure), against a bfloat16 DynamicCache. Runs land in OUT/<point>/; a finished
one is skipped, so the trained runs can be split over processes:

    python bench/kv_lowrank.py --train raw50:1 raw50:2      # some trained runs (one process per core)
    python bench/kv_lowrank.py                               # every post-training row, the report, the plot
    python bench/kv_lowrank.py --smoke                       # seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from bench_utils import environment, save_outputs, set_threads
from readme_tables import check_same_builds
from kv_quality import bytes_per_token
from qat_recovery import evaluate, mean_sd, run_dir, train
from kvtrain.cli import calibrate, recipe_path
from kvtrain.data.lm import PackedDataset, token_stream
from kvtrain.eval import format_table, perplexity, write_json
from kvtrain.home import is_complete
from kvtrain.kv import KVSpec, load_spec
from kvtrain.models import REFERENCE, load_model, load_tokenizer

POINTS = {  # name: (key rank, value rank, latent bits; 16: float16)
    "raw1": (1, 1, 16),  # a control: one number of each old token, about nothing (see the README)
    "raw50": (24, 32, 16), "raw25": (8, 16, 16),
    "int4_50": (24, 32, 4), "int2_50": (24, 32, 2), "int4_25": (8, 16, 4), "int2_25": (8, 16, 2),
    "int4_75": (48, 48, 4),  # three quarters of each width at 4 bits (Palu: low rank and quantization together)
}
# name: (the point whose ranks its calibration re-spends per layer, ranks="fisher"; the share of its rank each latent keeps)
FISHER = {"raw25f": ("raw25", 0.0), "raw25f50": ("raw25", 0.5)}
THINK = {"think40": (0.4, 0.0), "think60": (0.6, 0.0), "think50kv": (0.5, 0.5)}  # name: pruned K, V fractions
# name: the point whose latent numbers per token one latent of K and V together holds (joint_kv, MHA2MLA)
JOINT = {"joint50": "raw50", "joint25": "raw25"}
NAMES = [*POINTS, *FISHER, *THINK, *JOINT]
REFERENCES = {"kivi2 QAT": ("bench/results/qat_recovery", "kivi2"), "nuq2 QAT": ("bench/results/qat_nuq2", "recipe spec")}
QUANTIZERS = ("kivi2", "kivi4")  # quantization alone, post-training, the same protocol
WINDOW = 32


def point_spec(name: str, scale: int = 1) -> KVSpec:
    """The point's spec; `scale` multiplies its ranks (a model with `scale` times kvtrain-ref's KV width)."""
    if name in FISHER:
        return point_spec(FISHER[name][0], scale)  # (its calibration sets the per-layer ranks)
    if name in THINK:
        key, value = ({"codec": "raw", "bits": 16, "prune_channels": f} if f else None for f in THINK[name])
        return KVSpec(key=key, value=value, residual=WINDOW)
    if name in JOINT:
        return KVSpec(key={"codec": "raw", "bits": 16, "rank": joint_rank(name) * scale}, value=None, joint_kv=True,
                      residual=WINDOW, placement="pre_rope")
    key_rank, value_rank, bits = POINTS[name]
    key_rank, value_rank = key_rank * scale, value_rank * scale
    latent = dict(codec="raw", bits=16) if bits == 16 else dict(codec="affine", bits=bits)
    key = {**latent, "rank": key_rank, **({} if bits == 16 else {"granularity": "per_channel(32)"})}
    value = {**latent, "rank": value_rank, **({} if bits == 16 else {"granularity": "per_token(8)"})}
    return KVSpec(key=key, value=value, residual=WINDOW, placement="pre_rope")


def joint_rank(name: str) -> int:
    """A joint point's rank: its twin's key and value ranks together (the same numbers per token)."""
    key_rank, value_rank, _ = POINTS[JOINT[name]]
    return key_rank + value_rank


def trained_spec(out: Path, name: str, scale: int) -> KVSpec:
    """The spec a point trains and is evaluated with: a Fisher point's per-layer ranks are its calibration's."""
    return load_spec(out / name / "calibrated" / "kv_spec.json") if name in FISHER else point_spec(name, scale)


def spec_folder(out: Path, name: str, scale: int) -> Path:
    """OUT/<point>/spec/kv_spec.json: the point's spec, its factors fresh (the SVD start)."""
    folder = out / name / "spec"
    if not (folder / "kv_spec.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        point_spec(name, scale).save(folder)
    return folder


def calibrated(out: Path, name: str, model: str, windows: int, scale: int) -> Path:
    folder = out / name / "calibrated"
    if not is_complete(folder):
        calibrate(str(spec_folder(out, name, scale) / "kv_spec.json"), str(folder), model, seq_len=1024, windows=windows,
                  ranks="fisher" if name in FISHER else "uniform", rank_floor=FISHER.get(name, ("", 0.0))[1])
    return folder


def recipe_variant(out: Path, name: str, model: str, windows: int, scale: int) -> Path:
    """recipes/lowrank_cskv.yaml with the point's spec, starting from its calibration."""
    config = yaml.safe_load(recipe_path("lowrank_cskv.yaml").read_text())
    state = calibrated(out, name, model, windows, scale) / "kv_codec_state.safetensors"
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("KVQuantCallback"):
            callback["init_args"] = {"spec": trained_spec(out, name, scale).to_dict(), "codec_state": str(state)}
    path = out / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def post_training_rows(out: Path, names: list[str], args) -> list[dict]:
    """The start model with full-precision KV, then each point from its SVD start and calibrated."""
    model = load_model(args.model)
    rows = []
    for split in args.splits:
        dataset = PackedDataset(token_stream(None, split, load_tokenizer(args.model)), args.seq_len)
        rows.append({"point": "full precision", "init": "-", "split": split,
                     **perplexity(model, dataset, 4, args.max_batches, desc=f"fp / {split}")})
        rows += [{"point": name, "init": "post-training", "split": split,
                  **perplexity(model, dataset, 4, args.max_batches, desc=f"{name} / {split}", spec=name)} for name in QUANTIZERS]
        for name in names:
            starts = [] if name in FISHER else [("weights" if name in THINK else "svd", spec_folder(out, name, args.rank_scale))]
            for init, folder in (*starts, ("calibrated", calibrated(out, name, args.model, args.windows, args.rank_scale))):
                result = perplexity(model, dataset, 4, args.max_batches, desc=f"{name} {init} / {split}", spec=str(folder))
                rows.append({"point": name, "init": init, "split": split, **result})
    return rows


def earlier_report(path: Path, env: dict) -> dict:
    """The report this run adds to ({} if none), refused when it was measured on another build of the
    model (`env`: this run's)."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    check_same_builds(env, earlier.get("env", {}), str(path))
    return earlier


def kept_rows(earlier: dict, points: list[str], kind: str) -> list[dict]:
    """The `kind` rows of the earlier report for the points this run does not evaluate."""
    rows = [r for r in earlier.get(kind, []) if r["point"] not in points]
    return [r for r in rows if kind == "trained" or r["point"] in NAMES]


def trained_rows(out: Path, names: list[str], args) -> list[dict]:
    """Every finished trained run: its perplexity with full-precision KV and under its own cache."""
    rows = []
    for name in names:
        models = {f"{name}-seed{s}": str(run_dir(out / name, "qat", s) / "model") for s in args.seeds
                  if is_complete(run_dir(out / name, "qat", s) / "model")}
        for split in args.splits:
            for row in evaluate(models, trained_spec(out, name, args.rank_scale), None, split, args.seq_len, args.max_batches, args.model) if models else []:
                point, seed = row["model"].rsplit("-seed", 1)
                rows.append({**row, "point": point, "seed": int(seed), "kv": "full precision" if row["kv"] == "full precision" else "own"})
    return rows


def reference_rows(splits: list[str]) -> list[dict]:
    """kivi2 QAT and nuq2 QAT under their caches, per seed, from their results."""
    rows = []
    for label, (folder, kv) in REFERENCES.items():
        path = Path(folder) / "results.json"
        if path.is_file():
            rows += [{"point": label, "split": r["split"], "seed": int(r["model"].rsplit("seed", 1)[1]), "ppl": r["ppl"],
                      "kv": "own" if r["kv"] == kv else "full precision"}
                     for r in json.loads(path.read_text())["rows"] if r["model"].startswith("qat-seed") and r["split"] in splits]
    return rows


def fisher_ranks(out: Path, name: str, scale: int) -> tuple[list[int], list[int], int]:
    """A Fisher point's ranks per layer (key, value) as its calibration chose them, and its latent bits."""
    spec = load_spec(out / name / "calibrated" / "kv_spec.json")
    return [*spec.key.layer_rank.values()], [*spec.value.layer_rank.values()], POINTS[FISHER[name][0]][2]


def bytes_rows(out: Path, names: list[str], args, earlier: dict) -> dict[str, float]:
    """Bytes per token (bfloat16, decoding at seq_len) of each point's cache, kivi2's and a DynamicCache's;
    a point this run does not evaluate keeps the earlier report's (a pre-RoPE cache at SmolLM2's shape
    takes minutes to measure: it rotates every held key at each of 128 decode steps)."""
    kept = {name: v for name, v in earlier.get("bytes", {}).items() if name in names and name not in args.points}
    names = [name for name in names if name not in kept]
    model = load_model(args.model)
    caches = {"full precision": "fp", "kivi2 QAT": "kivi2", "nuq2 QAT": "kivi2",  # (nuq2 stores kivi2's bytes)
              **{name: name for name in QUANTIZERS},
              **{name: str(spec_folder(out, name, args.rank_scale) if name not in FISHER else out / name / "calibrated")
                 for name in names}}
    return {**kept, **{label: bytes_per_token(model, cache, args.seq_len, torch.bfloat16, "decoding")
                       for label, cache in caches.items()}}


def summary(post: list[dict], trained: list[dict], references: list[dict], nbytes: dict[str, float], splits) -> list[dict]:
    """One row per point and kind: bytes and each split's perplexity (mean ± sd over seeds)."""
    table = []
    full = nbytes["full precision"]
    for row in post:
        if row["split"] == splits[0]:
            same = {r["split"]: r["ppl"] for r in post if (r["point"], r["init"]) == (row["point"], row["init"])}
            table.append({"point": row["point"], "kind": row["init"], "B/token": nbytes[row["point"]],
                          "x fp": nbytes[row["point"]] / full, **{f"{s} ppl": f"{same[s]:.2f}" for s in splits}})
    for point in dict.fromkeys(r["point"] for r in [*trained, *references]):
        kind = "trained" if point in NAMES else "reference"
        for kv in ("own", "full precision"):
            cells = {}
            for split in splits:
                values = [r["ppl"] for r in [*trained, *references] if (r["point"], r["split"], r["kv"]) == (point, split, kv)]
                mean, sd = mean_sd(values)
                cells[f"{split} ppl"] = f"{mean:.2f} ± {sd:.2f} (n={len(values)})"
            table.append({"point": point, "kind": f"{kind}, {'its cache' if kv == 'own' else 'full-precision KV'}",
                          "B/token": nbytes[point] if kv == "own" else full, "x fp": nbytes[point] / full if kv == "own" else 1.0,
                          **cells})
    return table


def plot(table: list[dict], path: Path, split: str, seq_len: int, model: str) -> None:
    """Perplexity against bytes per token: every point's rows, the frontier a reader would look for."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"svd": "x", "weights": "+", "calibrated": "o", "trained": "s", "reference": "D"}
    for row in table:
        if "full-precision KV" in row["kind"]:
            continue
        kind = row["kind"].split(",")[0]
        ppl = float(str(row[f"{split} ppl"]).split()[0])
        ax.scatter(row["B/token"], ppl, marker=markers.get(kind, "."), label=f"{row['point']} {kind}")
        ax.annotate(row["point"], (row["B/token"], ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"KV bytes per token (bfloat16, decoding at {seq_len} tokens)")
    ax.set_ylabel(f"{split} perplexity ({model}, {seq_len}-token windows)")
    ax.set_title("Low-rank K/V: perplexity against cache bytes")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=REFERENCE)
    p.add_argument("--points", nargs="+", choices=NAMES, help="default: all (--smoke: four)")
    p.add_argument("--train", nargs="+", metavar="POINT:SEED", help="train just these runs (no report)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--windows", type=int, default=16, help="calibration windows of 1024 tokens (train split)")
    p.add_argument("--seq_len", type=int, default=1024, help="evaluation windows (trained runs train at the recipe's 1024)")
    p.add_argument("--rank_scale", type=int, default=1, help="multiply every rank (smollm2-135m: 3, its 3 KV heads of 64)")
    p.add_argument("--no_references", action="store_true", help="leave out kivi2's and nuq2's QAT rows (other lengths)")
    p.add_argument("--max_batches", type=int, default=None, help="evaluate the first N batches of 4 windows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/lowrank")
    p.add_argument("--override", action="append", default=[], help="a recipe override for the trained runs")
    p.add_argument("--smoke", action="store_true", help="four points, 1 calibration window, 1 eval batch, 2 steps of one seed")
    args = p.parse_args(argv)
    if args.smoke:
        args.points = args.points or ["raw25", "int2_25", "raw25f", "think50kv"]
        args.windows, args.max_batches, args.splits, args.seeds = 1, 1, ["val"], [1]
        args.override += ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
                          "--trainer.enable_progress_bar=false"]
    args.points = args.points or NAMES
    return args


def train_runs(out: Path, runs: list[tuple[str, int]], args) -> None:
    for name, seed in runs:
        if not is_complete(run_dir(out / name, "qat", seed) / "model"):
            recipe = recipe_variant(out, name, args.model, args.windows, args.rank_scale)
            write_json(run_dir(out / name, "qat", seed) / "train.json", train(recipe, out / name, "qat", seed, args.override))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    out = Path(args.out)
    if args.train:
        train_runs(out, [(name, int(seed)) for name, seed in (item.split(":") for item in args.train)], args)
        return
    if args.smoke:
        train_runs(out, [(name, seed) for name in args.points for seed in args.seeds], args)
    stem = "kv_lowrank_smoke" if args.smoke else "kv_lowrank" if args.seq_len == 1024 else f"kv_lowrank_{args.seq_len}"
    env = environment({"model": args.model})
    earlier = earlier_report(out / f"{stem}.json", env)
    post, trained = (kept_rows(earlier, args.points, kind) for kind in ("post_training", "trained"))
    order = ["full precision", *QUANTIZERS, *NAMES].index
    post = sorted([*post_training_rows(out, args.points, args), *post], key=lambda r: order(r["point"]))
    trained = sorted([*trained_rows(out, args.points, args), *trained], key=lambda r: order(r["point"]))
    references = [] if args.no_references else reference_rows(args.splits)
    names = list(dict.fromkeys(r["point"] for r in [*post, *trained] if r["point"] in NAMES))
    nbytes = bytes_rows(out, names, args, earlier)
    table = summary(post, trained, references, nbytes, args.splits)
    points = {n: (POINTS[n][0] * args.rank_scale, POINTS[n][1] * args.rank_scale, POINTS[n][2]) for n in names if n in POINTS}
    points.update({n: THINK[n] for n in names if n in THINK})
    points.update({n: {"joint rank": joint_rank(n) * args.rank_scale, "bits": 16} for n in names if n in JOINT})
    kept_ranks = earlier.get("points", {})  # (a kept Fisher point's calibration is not committed: its ranks are)
    points.update({n: kept_ranks[n] if n not in args.points and n in kept_ranks else fisher_ranks(out, n, args.rank_scale)
                   for n in names if n in FISHER})
    result = {"args": vars(args), "env": env, "points": points,
              "bytes": nbytes, "post_training": post, "trained": trained, "references": references, "table": table}
    columns = ["point", "kind", "B/token", "x fp", *[f"{s} ppl" for s in args.splits]]
    text = (f"{args.model} at {args.seq_len} tokens, whole splits; bytes: bfloat16, decoding. Ranks (key, value, "
            f"latent bits), ThinK's pruned fractions (key, value), joint latents: {points}.\n\n" + format_table(table, columns))
    save_outputs(out, stem, result, text)
    plot(table, out / f"{stem}.png", args.splits[0], args.seq_len, args.model)
    print(text)


if __name__ == "__main__":
    main()
