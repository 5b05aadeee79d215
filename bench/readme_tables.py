"""Render the README's results from bench/results/*.json, so the README never says what a results file
does not. Each rendered block sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`.

    python bench/readme_tables.py            # rewrite the blocks in README.md
    python bench/readme_tables.py --check    # exit 1, naming the blocks, if README.md differs (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def load(relpath: str, results: Path) -> dict:
    return json.loads((results / relpath).read_text())


def check_same_builds(env: dict, earlier: dict, where: str) -> None:
    """Refuse rows measured on another build of a model (`environment(models=...)`'s hashes) in one table."""
    for name, build in env.get("models", {}).items():
        other = earlier.get("models", {}).get(name)
        if build and other and build != other:
            raise ValueError(f"{where} holds results for another build of {name} (weights {other}, this run's "
                             f"{build}): its rows would mix two models; measure them again on this build, or write "
                             "this run to another --out")


def fmt(v: float, digits: int = 4) -> str:
    return f"{v:.{digits}g}"


def table(rows: list[list[object]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# ------------------------------------------------------------------------------ the blocks


def check_comparable(r: dict, b: dict, folder: str, baseline: str) -> None:
    """Refuse two bench/qat_recovery.py results on other seeds, windows, models or model builds."""
    for setting, default in (("seeds", None), ("max_batches", None), ("model", "kvtrain-ref")):
        if r.get(setting, default) != b.get(setting, default):
            raise ValueError(f"{folder} ran {setting}={r.get(setting, default)}, {baseline} {b.get(setting, default)}: "
                             "compare like with like")
    check_same_builds(r["env"], b["env"], f"{baseline}/results.json")


def with_overrides(result: dict) -> str:
    """The recipe a bench/qat_recovery.py result trained, with the settings its command line changed."""
    shown = [o.removeprefix("--") for o in result["overrides"] if not o.startswith("--trainer.enable_progress_bar")]
    return f"{result['recipe']} ({', '.join(shown)})" if shown else result["recipe"]


def qat_recovery(results: Path, folder: str = "") -> str:
    r = load(f"{folder}qat_recovery/results.json", results)
    name, seeds, splits, start = r["spec_name"], r["seeds"], r["splits"], r.get("model", "kvtrain-ref")
    ppl = {(row["model"], row["kv"], row["split"]): row["ppl"] for row in r["rows"]}
    rows = []
    for model, kv, label in [("start", "full precision", f"{start} (start)"), ("start", name, f"{start} (start)"),
                             ("control", "full precision", "control fine-tune"), ("control", name, "control fine-tune"),
                             ("qat", name, f"**{name} QAT**"), ("qat", "full precision", f"{name} QAT")]:
        cells = []
        for split in splits:
            if model == "start":
                cells.append(fmt(ppl["start", kv, split]))
            else:
                cells.append(mean_sd([ppl[f"{model}-seed{s}", kv, split] for s in seeds]))
        kv_label = f"{name}, post-training" if model == "start" and kv != "full precision" else kv
        rows.append([label, kv_label, *cells])
    out = [table(rows, ["model", "KV cache", *[f"{s} ppl" for s in splits]]), ""]
    for split in splits:
        by_seed = [r["measures"][split][str(s)] for s in seeds]
        rec = [100 * m["recovered"] for m in by_seed]
        left = [100 * m["gap_left"] for m in by_seed]
        out.append(f"- {split}: QAT recovers **{statistics.mean(rec):.1f}% ± {statistics.stdev(rec):.1f}** of the gap "
                   f"the 2-bit cache opens on the control (seeds: {', '.join(f'{v:.1f}' for v in rec)}); the gap left "
                   f"against its own full-precision KV is {statistics.mean(left):.2f}% ± {statistics.stdev(left):.2f} "
                   f"(seeds: {', '.join(f'{v:.2f}' for v in left)}).")
    settings = with_overrides(r).removeprefix(r["recipe"])
    if r.get("max_batches"):
        tokens = ", ".join(f"{split} {next(row['tokens'] for row in r['rows'] if row['split'] == split):,}" for split in splits)
        out.append(f"- perplexity over at most the first {4 * r['max_batches']} windows of each split (predicted tokens: {tokens}).")
    out.append(f"- {len(seeds)} seeds per arm (the data order), mean ± sample sd; {r['recipe']}{settings}; training "
               f"wall time per run {min(r['train_seconds'].values()) / 60:.0f}-{max(r['train_seconds'].values()) / 60:.0f} "
               f"min (2-core CPU); Python {r['env']['python']}.")
    return "\n".join(out)


def cache_name(result: dict) -> str:
    """The cache a bench/qat_recovery.py result trained: its --spec's or preset's name, else the recipe's
    (a recipe for the real model is named qat_<spec>_smollm2)."""
    if result["spec_name"] != "recipe spec":
        return result["spec_name"]
    return Path(result["recipe"]).stem.removeprefix("qat_").removesuffix("_smollm2")


def qat_versus(results: Path, folder: str, baseline: str = "qat_recovery", name: str | None = None,
               base: str | None = None) -> str:
    """Another recipe's QAT (bench/qat_recovery.py --out bench/results/<folder>) against kivi2's
    (`baseline`), seed by seed: the same seeds draw the same data order in both. `name` and `base` label
    the two where their cache names would not tell them apart (one cache trained for longer)."""
    r, b = load(f"{folder}/results.json", results), load(f"{baseline}/results.json", results)
    name, base = name or cache_name(r), base or cache_name(b)
    seeds, splits, start = r["seeds"], r["splits"], r.get("model", "kvtrain-ref")
    check_comparable(r, b, folder, baseline)
    ppl = {(row["model"], row["kv"] != "full precision", row["split"]): row["ppl"] for row in r["rows"]}
    ref = {(row["model"], row["kv"] != "full precision", row["split"]): row["ppl"] for row in b["rows"]}
    arms = [(ref, f"{base} QAT", True, cache_name(b)), (ref, f"{base} QAT", False, "full precision"),
            (ppl, f"**{name} QAT**", True, cache_name(r)), (ppl, f"{name} QAT", False, "full precision")]
    # the start under each cache, once where both trained the same one (the labels say how, not what)
    caches = [(ref, cache_name(b))] + ([(ppl, cache_name(r))] if cache_name(r) != cache_name(b) else [])
    rows = [[f"{start} (start)", kv, *[fmt(source["start", quantized, split]) for split in splits]]
            for source, quantized, kv in ((ref, False, "full precision"),
                                          *((source, True, f"{cache}, post-training") for source, cache in caches))]
    rows += [[label, kv, *[mean_sd([source[f"qat-seed{s}", quantized, split] for s in seeds]) for split in splits]]
             for source, label, quantized, kv in arms]
    out = [table(rows, ["model", "KV cache", *[f"{s} ppl" for s in splits]]), ""]
    for split in splits:
        delta = [ppl[f"qat-seed{s}", True, split] - ref[f"qat-seed{s}", True, split] for s in seeds]
        left = [100 * r["measures"][split][str(s)]["gap_left"] for s in seeds]
        out.append(f"- {split}: {name} QAT minus {base} QAT, each under its own cache, same seed: **{mean_sd(delta)}** "
                   f"(seeds: {', '.join(f'{v:+.2f}' for v in delta)}); gap left against its own full-precision KV "
                   f"{mean_sd(left)}% (seeds: {', '.join(f'{v:.2f}' for v in left)}).")
        # the run's own control where it trained one (same steps), else the baseline's
        control = next(((source, owner) for source, owner in ((ppl, folder), (ref, baseline))
                        if all((f"control-seed{s}", False, split) in source for s in seeds)), None)
        if control:
            over = [100 * (ppl[f"qat-seed{s}", True, split] / control[0][f"control-seed{s}", False, split] - 1) for s in seeds]
            out.append(f"- {split}: {name} QAT under its cache against the plain fine-tune (full-precision KV, "
                       f"{control[1]}'s control, same seed): {mean_sd(over)}% (seeds: {', '.join(f'{v:+.2f}' for v in over)}).")
    if r.get("max_batches"):
        out.append(f"- perplexity over the first {4 * r['max_batches']} windows of 1024 tokens of each split.")
    recipe = f"{with_overrides(r)} with the spec {r['spec']}" if r.get("spec") else with_overrides(r)
    out.append(f"- {len(seeds)} seeds (the data order), mean ± sample sd; {recipe} against {with_overrides(b)}; training "
               f"wall time per run {min(r['train_seconds'].values()) / 60:.0f}-{max(r['train_seconds'].values()) / 60:.0f} "
               f"min (2-core CPU); Python {r['env']['python']}.")
    return "\n".join(out)


def frontier_table(rows: list[dict], splits: tuple[str, ...] = ("val", "test")) -> str:
    """bench/trained_frontier.py's rows: each cache's bytes, post-training and trained (mean ± sd)."""
    def cell(row: dict, split: str) -> str:
        mean, sd = row[f"{split} ppl"], row[f"{split} sd"]
        return fmt(mean) if sd is None else f"{mean:.2f} ± {sd:.2f} (n={row[f'{split} n']})"

    return table([[row["cache"], row["kind"], f"{row['B/token']:,}", f"{row['x fp']:.3f}", *[cell(row, s) for s in splits]]
                  for row in rows], ["cache", "kind", "B/token", "x fp", *[f"{s} ppl" for s in splits]])


def spec_name(label: str) -> str:
    """A cache label with a spec folder's path shortened to the folder's name (the README names the specs)."""
    return re.sub(r"(ours QuantizedKVCache )\S*/specs/(\S+)", r"\1\2", label)


def kv_quality(results: Path, folder: str = "") -> str:
    r = load(f"{folder}kv_quality.json", results)
    best = {f"hqq{b}-k{a[0]}v{a[1]}" for b, a in r["best_peer_axes"].items()}
    shown = [row for row in r["perplexity"] if not row["name"].startswith("hqq") or row["name"] in best]
    rows = [[row["model"], spec_name(row["kv cache"]), fmt(row["ppl"])] for row in shown]
    peers = [row for row in r["perplexity"] if row["name"].startswith("hqq")]
    axes = "; ".join(f"{row['name']} {fmt(row['ppl'])}" for row in peers)
    args = r["args"]
    swept = args.get("peer_axes", ["00", "01", "10", "11"])
    peer = (f"the peer at its best axes of the four transformers documents (all four: {axes})" if len(swept) == 4 else
            f"the peer at axes {', '.join(f'k{a[0]}v{a[1]}' for a in swept)} only ({axes})")
    return "\n".join([
        table(rows, ["model", "KV cache", "ppl"]), "",
        f"{r['windows']} val windows of {args['seq_len']} tokens, a {args['prefill']}-token prompt then decoding, the "
        f"loss over the decoded {args['seq_len'] - args['prefill']} tokens; {peer}; Python {r['env']['python']}.",
    ])


def kv_bytes(results: Path, folder: str = "") -> str:
    r = load(f"{folder}kv_quality.json", results)
    shape = r.get("shape", {"layers": 4, "kv_heads": 2, "head_dim": 32})  # kvtrain-ref's, before results recorded it
    lengths = r["args"]["byte_lengths"]
    rows = [[spec_name(row["cache"]), row["state"], *[f"{fmt(row[f'B/tok {t}'])} ({row[f'x fp {t}']:.3f}x)" for t in lengths]]
            for row in r["bytes"]]
    return "\n".join([
        table(rows, ["cache", "state", *[f"bytes/token at {t}" for t in lengths]]), "",
        f"{r['args']['bytes_dtype']} K/V of {r['args']['base']}'s shape ({shape['layers']} layers x {shape['kv_heads']} KV "
        f"heads x {shape['head_dim']} dims), measured from the "
        "tensors each cache holds; (x) is the ratio to a DynamicCache in the same dtype.",
    ])


def kv_speed(results: Path, folder: str = "") -> str:
    r = load(f"{folder}kv_speed.json", results)
    t, d = r["training"], r["decoding"]
    train = "; ".join(f"{k} **{v:.2f}x**" for k, v in t["ratios"].items())
    rows = [[b["batch"], row["label"], fmt(row["decode tok/s"]), f"{row['KV bytes/token']:,.1f}"]
            for b in d["by_batch"] for row in b["rows"]]
    return "\n".join([
        f"Training step at {t['batch']} x {t['seq_len']} tokens (the QAT recipe's shape), interleaved, medians: {train}.",
        "", f"Greedy decoding, {d['prompt']}-token prompt + {d['new_tokens']} tokens, {d['dtype']}, interleaved:", "",
        table(rows, ["batch", "cache", "decode tok/s", "KV bytes/token"]), "", *_round_ratios(d["by_batch"]),
        f"CPU, {r['env']['threads']} thread(s), Python {r['env']['python']}.",
    ])


def train_cost(results: Path, folder: str) -> str:
    """bench/kv_speed.py --skip_decode: a QAT step's time under each spec against a plain step and against
    the same step with the recipe's distillation (what a QAT run adds to the fine-tune it replaces)."""
    r = load(f"{folder}kv_speed.json", results)
    t = r["training"]
    medians = {row["variant"]: row["median s/step"] for row in t["rows"]}
    rows = [[re.sub(r"\S*/specs/", "", v), fmt(s), f"{s / medians['plain']:.2f}x",
             f"{s / medians['plain+distill']:.2f}x" if v.endswith("+distill") else "-"] for v, s in medians.items()]
    return "\n".join([
        table(rows, ["training step", "median s/step", "x plain", "x plain+distill"]), "",
        f"{r['args']['model']}'s config at random init, {t['batch']} x {t['seq_len']} tokens, forward + backward + "
        f"AdamW; +distill: the KL to a frozen full-precision copy (weight 1, as the QAT recipes); variants "
        f"interleaved, {len(next(iter(t['times'].values())))} steps each, medians; CPU, {r['env']['threads']} "
        f"thread(s), Python {r['env']['python']}.",
    ])


def _round_ratios(batches: list[dict]) -> list[str]:
    """kivi2's decode speed ratios, where the run measured them round by round."""
    if not all(b.get("ratios_by") == "round" for b in batches):
        return []
    return ["Decode speed, ours / other (median over rounds of the ratio within a round): " + "; ".join(
        f"batch {b['batch']}: " + ", ".join(f"{k} {v:.2f}" for k, v in b["ratios"].items() if k.startswith("kivi2/"))
        for b in batches) + ".", ""]


def rl_length(results: Path, folder: str = "") -> str:
    text = (results / folder / "rl_length" / "rl_length.md").read_text()
    r = load(f"{folder}rl_length/rl_length.json", results)
    body = text.split("\n\n", 1)[1].strip()  # the tables and verdicts, without the header paragraph
    return f"{body}\n\nPython {r['env']['python']}."


def paired_se(a: list[bool], b: list[bool]) -> float:
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    return statistics.stdev(d) / len(d) ** 0.5


def rl_selection(results: Path) -> str:
    """DLER's learning rate and steps, chosen on the task's val split (never on the test split)."""
    import yaml

    folder = results / "rl_length_val"
    sft = load("rl_length_val/sft/result.json", results)["evals"]["full precision"]
    rows = []
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "sft"):
        config = yaml.safe_load((run / "config.yaml").read_text())
        ev = load(f"rl_length_val/{run.name}/result.json", results)["evals"]["full precision"]
        drop, cut = 100 * (ev["accuracy"] - sft["accuracy"]), 100 * (1 - ev["length"] / sft["length"])
        meets = "yes" if cut >= 50 and drop >= -2 else "no"
        rows.append([config["model"]["init_args"]["lr"], config["trainer"]["max_steps"],
                     f"{drop:+.1f} ± {100 * paired_se(ev['correct'], sft['correct']):.1f}", f"-{cut:.1f}%", meets])
    return "\n".join([table(rows, ["lr", "steps", "accuracy vs SFT (points)", "length vs SFT", "meets the bar"]), "",
                      f"{sft['problems']} problems of the val split; SFT: accuracy {100 * sft['accuracy']:.1f}%, "
                      f"length {sft['length']:.1f} tokens."])


def reference(results: Path) -> str:
    rows = []
    for split in ("val", "test"):
        r = load(f"reference/{split}.json", results)
        model, unigram = r["rows"]
        rows.append([split, fmt(model["ppl"]), fmt(unigram["ppl"]), f"{model['tokens']:,}"])
    return "\n".join([table(rows, ["split", "kvtrain-ref ppl", "unigram baseline ppl", "tokens"]), "",
                      f"`kvtrain eval --split val|test` (256-token windows), Python {r['python']}."])


def smollm2_eval(results: Path) -> str:
    r = load("smollm2/eval_val.json", results)
    rows = [[row["kv"], fmt(row["ppl"]), f"{row['kv_bytes_per_token']:,.0f}"]
            for row in r["rows"] if row.get("model") != "unigram baseline"]
    return "\n".join([table(rows, ["KV cache", "val ppl", "KV bytes/token (fp32 model)"]), "",
                      f"`kvtrain eval --model smollm2-135m --kv kivi2 --seq_len {r['seq_len']}` on the embedded val split "
                      f"({r['rows'][0]['tokens']:,} predicted tokens), Python {r['python']}."])


def kv_lowrank(results: Path, stem: str = "kv_lowrank") -> str:
    r = load(f"lowrank/{stem}.json", results)
    columns = ["point", "kind", "B/token", "x fp", *[f"{s} ppl" for s in r["args"]["splits"]]]
    rows = [[row[c] if isinstance(row[c], str) else fmt(row[c]) for c in columns] for row in r["table"]]
    lists = {kind: [(name, point) for name, point in r["points"].items() if kind == _point_kind(point)]
             for kind in ("ranks", "pruned", "joint")}
    ranks = "; ".join(f"{name}: key {k}, value {v}, {'float16' if bits == 16 else f'{bits}-bit'} latents"
                      for name, (k, v, bits) in lists["ranks"])
    pruned = "; ".join(f"{name}: {k:.0%} of each key head's channels{f', {v:.0%} of each value head' if v else ''}"
                       for name, (k, v) in lists["pruned"])
    joint = "; ".join(f"{name}: rank {point['joint rank']}" for name, point in lists["joint"])
    return "\n".join([table(rows, columns), "", f"Points (ranks of the key and value latents, each over all of a layer's KV heads): {ranks}."
                      + (f" ThinK (channels not stored, post-RoPE, the kept ones in float16; values in full precision unless said): {pruned}." if pruned else "")
                      + (f" Joint (one float16 latent of K and V together per token, over all of a layer's KV heads: joint_kv): {joint}." if joint else ""),
                      f"Python {r['env']['python']}, {r['env']['threads']} thread(s)."])


def _point_kind(point: list | dict) -> str:
    """A kv_lowrank point's kind by its form: (key rank, value rank, bits), ThinK's (key, value)
    fractions, or a joint latent's {"joint rank", "bits"}."""
    return "joint" if isinstance(point, dict) else "ranks" if len(point) == 3 else "pruned"


def kv_eviction(results: Path) -> str:
    r = load("eviction/kv_eviction.json", results)
    free, fractions = r["training_free"], (0.5, 0.25, 0.125)
    rows = [["full cache", "-", fmt(free[0]["accuracy"], 3), "", "", "1"]]
    for interval in dict.fromkeys(row["interval"] for row in free[1:]):
        for selector in dict.fromkeys(row["selector"] for row in free[1:]):
            kept = {row["kept"]: row for row in free if (row["selector"], row["interval"]) == (selector, interval)}
            rows.append([selector, "end of prompt" if interval == 0 else f"every {interval}",
                         *[fmt(kept[f]["accuracy"], 3) for f in fractions],
                         " / ".join(fmt(kept[f]["bytes_ratio"], 3) for f in fractions)])
    header = ["selector", "decided", "50% kept", "25% kept", "12.5% kept", "bytes vs full (50 / 25 / 12.5%)"]
    control = {row["under"]: row for row in r["trained"] if row["point"] == "control"}

    def recovered(row: dict) -> str:  # of what the full-cache control loses under the same eviction
        # (learned logits are random untrained: a learned selector against SnapKV at its budget and schedule)
        base = control.get(row["under"].replace("dms", "snapkv"))
        if row["point"] == "control" or base is None:
            return "-"
        return f"{(row['accuracy'] - base['accuracy']) / (base['accuracy_full'] - base['accuracy']):.0%}"

    trained = [[row["point"], row["under"], row["seeds"], f"{row['accuracy']:.3f} ± {row['accuracy_std']:.3f}",
                recovered(row), f"{row['accuracy_full']:.3f} ± {row['accuracy_full_std']:.3f}"] for row in r["trained"]]
    equal = [[row["method"], "-" if row["vs_dropping"] == "-" else f"{row['kept']:.1%}",
              "-" if row["vs_dropping"] == "-" else f"{row['vs_dropping']:.0%} kept",
              fmt(row["accuracy"], 3), "-" if row["dropping_accuracy"] == "-" else fmt(row["dropping_accuracy"], 3),
              fmt(row["bytes_ratio"], 3)] for row in r["equal_bytes"]]
    quantizers = [row for row in equal if row[1] == "-"]
    equal = [row for row in equal if row[1] != "-"] + [
        [row["method"], "-", "-", fmt(row["accuracy"], 3), "-", fmt(row["bytes_ratio"], 3)] for row in r["composed"]
    ] + quantizers
    ppl = {}
    for row in r["perplexity"]:
        ppl.setdefault(row["selector"], {})[row["kept"]] = row
    perplexity = [["full cache", fmt(r["perplexity"][0]["ppl"], 4), "", ""]] + [
        [selector, *[fmt(kept[f]["ppl"], 4) for f in fractions]] for selector, kept in ppl.items()
        if selector != "full cache" and "retained" not in selector]
    for row in r["perplexity"]:  # MiKV under the fraction whose bytes it holds
        if "retained" in row["selector"]:
            cells = ["" for _ in fractions]
            cells[fractions.index(row["vs_dropping"])] = fmt(row["ppl"], 4)
            perplexity.append([f"{row['selector']} ({row['kept']:.1%} in full, the column's bytes)", *cells])
    sweep = ", ".join(f"{row['merge_above']:g}: {row['accuracy']:.3f}" for row in r["merge_sweep"])
    a = r["args"]
    return "\n".join([
        table(rows, header), "",
        f"Merging only the evicted tokens whose nearest survivor's key is more similar than a threshold "
        f"(snapkv + merge, 25% kept, end of prompt; threshold: exact match): {sweep}.", "",
        table(perplexity, ["perplexity, every 16 tokens decided", "50% kept", "25% kept", "12.5% kept"]), "",
        f"Perplexity: the pretrained kvtrain-ref on the second half of {a['ppl_windows']} val windows of "
        f"{a['ppl_len']} tokens of the embedded corpus.", "",
        table(trained, ["fine-tuned", "measured under", "seeds", "exact match (mean ± sd)", "recovered",
                        "same models, full cache"]), "",
        "recovered: the share won back of what the full-cache fine-tune (control, the same steps) loses under "
        "that eviction (dms: under SnapKV keeping as many, decided as often); +st: the selection trained straight "
        "through (the same cache at decode); dms: learned logits, a direction in value space per KV head.", "",
        table(equal, ["evicted tokens kept at 2 bits (MiKV), eviction over quantized K/V, a quantizer alone", "kept in full",
                      "at the bytes of dropping with", "exact match", "dropping them", "bytes vs full"]), "",
        f"kvtrain-ref fine-tuned {a['base_steps']} steps on recall ({a['pairs']} lines, needle), then {a['steps']} more "
        f"steps per trained row (lr {a['lr']}, batch {a['batch_size']}); {a['val_size']} held-out prompts (accuracy "
        f"in fp32); bytes: `QuantizedKVCache.nbytes()` after the prompt and answer in bf16, against a DynamicCache. "
        f"Python {r['env']['python']}."])


BLOCKS: dict[str, Callable[[Path], str]] = {
    "reference": reference, "qat_recovery": qat_recovery, "kv_quality": kv_quality, "kv_bytes": kv_bytes,
    "kv_speed": kv_speed, "rl_length": rl_length, "rl_selection": rl_selection,
    "smollm2_eval": smollm2_eval,
    # the same tables on the real pretrained model, next to each kvtrain-ref table
    "smollm2_qat_recovery": partial(qat_recovery, folder="smollm2/"),
    "smollm2_kv_bytes": partial(kv_bytes, folder="smollm2/"),
    "smollm2_kv_quality": partial(kv_quality, folder="smollm2/"),
    "smollm2_kv_quality_4096": partial(kv_quality, folder="smollm2/ctx4096/"),
    "smollm2_kv_speed": partial(kv_speed, folder="smollm2/"),
    "smollm2_rl_length": partial(rl_length, folder="smollm2/"),
    # issue 12: a calibrated codebook's QAT against kivi2's, at the same bytes
    "qat_nuq2": partial(qat_versus, folder="qat_nuq2"),
    "qat_sub2bit_15": partial(qat_versus, folder="qat_sub2bit_15"),
    "smollm2_qat_rotnuq2": partial(qat_versus, folder="smollm2/qat_rotnuq2", baseline="smollm2/qat_recovery"),
    "smollm2_qat_rotnuq2_80steps": partial(qat_versus, folder="smollm2/qat_rotnuq2_80steps", baseline="smollm2/qat_rotnuq2",
                                           name="rotnuq2, 80 steps", base="rotnuq2, 40 steps"),
    "train_cost": partial(train_cost, folder="train_cost/"),
    "smollm2_train_cost": partial(train_cost, folder="smollm2/train_cost/"),
    "smollm2_qat_sub2bit_15_rot": partial(qat_versus, folder="smollm2/qat_sub2bit_15_rot", baseline="smollm2/qat_recovery"),
    "smollm2_qat_kvquant2": partial(qat_versus, folder="smollm2/qat_kvquant2", baseline="smollm2/qat_recovery"),
    "smollm2_qat_rotnuq2_codec_lr": partial(qat_versus, folder="smollm2/qat_rotnuq2_codec_lr", baseline="smollm2/qat_rotnuq2",
                                            name="rotnuq2, levels at codec_lr 1e-2", base="rotnuq2, levels at lr"),
    "smollm2_qat_learnednuq2": partial(qat_versus, folder="smollm2/qat_learnednuq2", baseline="smollm2/qat_rotnuq2_codec_lr",
                                       name="learned rotation", base="random Hadamard"),
    # vLLM's per-token-head formats next to the kivi presets, post-training
    "serving_kv_quality": partial(kv_quality, folder="serving/"),
    "serving_kv_bytes": partial(kv_bytes, folder="serving/"),
    # issue 12: every quantizer of the issue, post-training, on the real model
    "smollm2_kv_methods": partial(kv_quality, folder="smollm2/kv_methods/"),
    "smollm2_kv_methods_bytes": partial(kv_bytes, folder="smollm2/kv_methods/"),
    "smollm2_kv_combos": partial(kv_quality, folder="smollm2/kv_combos/"),
    "smollm2_kv_combos_bytes": partial(kv_bytes, folder="smollm2/kv_combos/"),
    # issue 13: low-rank latents against their bytes
    "kv_lowrank": kv_lowrank,
    "kv_lowrank_256": partial(kv_lowrank, stem="kv_lowrank_256"),
    "kv_lowrank_think": partial(kv_lowrank, stem="think/kv_lowrank"),
    "smollm2_kv_lowrank": partial(kv_lowrank, stem="smollm2/kv_lowrank"),
    "smollm2_qat_lowrank_raw50": partial(qat_versus, folder="smollm2/qat_lowrank_raw50", baseline="smollm2/qat_recovery"),
    "smollm2_qat_lowrank_raw25": partial(qat_versus, folder="smollm2/qat_lowrank_raw25", baseline="smollm2/qat_recovery"),
    "smollm2_qat_lowrank_int2_50": partial(qat_versus, folder="smollm2/qat_lowrank_int2_50", baseline="smollm2/qat_recovery"),
    "smollm2_qat_lowrank_int4_50": partial(qat_versus, folder="smollm2/qat_lowrank_int4_50", baseline="smollm2/qat_recovery"),
    "smollm2_qat_lowrank_joint25": partial(qat_versus, folder="smollm2/qat_lowrank_joint25", baseline="smollm2/qat_recovery"),
    "smollm2_qat_lowrank_joint50": partial(qat_versus, folder="smollm2/qat_lowrank_joint50", baseline="smollm2/qat_recovery"),
    # issues 12 and 13: every cache trained on the real model, against its bytes
    "smollm2_trained_frontier": lambda results: frontier_table(load("smollm2/trained_frontier.json", results)["rows"]),
    # issue 14: retrieval under token eviction, training-free and trained against
    "kv_eviction": kv_eviction,
}


def render(readme: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """(README with every block re-rendered, the names of the blocks that changed)."""
    changed = []

    def sub(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"README has a results block {name!r} that no renderer knows ({sorted(BLOCKS)})")
        body = BLOCKS[name](results) + "\n"
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(sub, readme), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report blocks that differ (exit 1)")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    rendered, changed = render(text, args.results)
    missing = sorted(set(BLOCKS) - set(m["name"] for m in BLOCK.finditer(text)))
    if args.check:
        if changed or missing:
            print(f"README results differ from bench/results: {changed}; blocks missing: {missing}", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(rendered)
    print(f"rendered {sorted(set(BLOCKS) - set(missing))}; changed {changed}; missing {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
