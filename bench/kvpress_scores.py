"""kvtrain's eviction selector scores against NVIDIA kvpress's own presses, on the same tensors.

A seeded tiny Llama (1 layer, 4 query heads, 2 KV heads, float64, eager attention) prefills a
48-token prompt under each kvpress press (`with press(model): model(...)`, kvpress's own prefill
hook); the press's `score` is wrapped to record what it was given and what it returned, and the
tokens it kept are read back from the pruned cache. kvtrain's selector scores the same layer-0
attention, accumulated as `kvtrain.kv.eviction.attend` accumulates it at the decision that ends a
48-token prompt (interval 0: the sum over the observed queries, the mean over each KV head's query
heads), and `EvictionPolicy.survivors` keeps its tokens. Both sides are compared after the
documented normalisation (max abs difference) and by the kept sets at 25% and 50% of the prompt.

    python3.11 -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install torch==2.13.0 kvpress
    /tmp/kvpress-venv/bin/python bench/kvpress_scores.py

Writes bench/results/eviction/kvpress_scores.{json,md} and the fixture tests/fixtures/kvpress_scores.pt
that tests/test_kvpress_scores.py checks kvtrain against without kvpress installed.

kvpress pins transformers < 5.3 while kvtrain's package __init__ needs a newer one (its cache), so
kvtrain's modules are imported here without running the package __init__s (`_import_kvtrain`): the
selectors and the eviction rule need torch alone.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "eviction"
FIXTURE = ROOT / "tests" / "fixtures" / "kvpress_scores.pt"

SEED = 0
LENGTH = 48
WINDOW = 8  # SnapKV observation window (kvpress window_size; kvtrain window)
KERNEL = 5  # SnapKV pooling (kvpress kernel_size; kvtrain kernel)
N_SINK = 4  # StreamingLLM sinks (kvpress n_sink; kvtrain EvictionPolicy.sinks)
KEEPS = (0.25, 0.5)  # kept fractions (kvpress compression_ratio = 1 - keep)
KV_HEADS = 2  # num_key_value_heads of the model (4 query heads: groups of 2)
INIT_RANGE = 0.1  # Llama's default 0.02 gives near-uniform attention at this size: rankings then hinge on rounding


def _import_kvtrain():
    for name in ("kvtrain", "kvtrain.kv", "kvtrain.quant"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(ROOT / name.replace(".", "/"))]
            sys.modules[name] = module
    from kvtrain.kv import eviction, selectors
    return eviction, selectors


eviction, selectors = _import_kvtrain()

from kvpress import ObservedAttentionPress, SnapKVPress, StreamingLLMPress, TOVAPress  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import rotate_half  # noqa: E402

# kvtrain selector, its options, the policy that matches the press's forced keeps, the press
CASES = {
    "snapkv": dict(options={"window": WINDOW, "kernel": KERNEL}, policy={"recent": WINDOW},
                   press=lambda ratio: SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=KERNEL),
                   press_name=f"SnapKVPress(window_size={WINDOW}, kernel_size={KERNEL})"),
    "tova": dict(options={}, policy={"recent": 1}, press=lambda ratio: TOVAPress(compression_ratio=ratio),
                 press_name="TOVAPress()"),
    "h2o": dict(options={}, policy={}, press=lambda ratio: ObservedAttentionPress(compression_ratio=ratio),
                press_name="ObservedAttentionPress()"),
    "streaming_llm": dict(options={}, policy={"sinks": N_SINK},
                          press=lambda ratio: StreamingLLMPress(compression_ratio=ratio, n_sink=N_SINK),
                          press_name=f"StreamingLLMPress(n_sink={N_SINK})"),
}


def build_model() -> tuple[LlamaForCausalLM, torch.Tensor]:
    torch.manual_seed(SEED)
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=KV_HEADS, num_hidden_layers=1,
                         intermediate_size=256, vocab_size=512, initializer_range=INIT_RANGE)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    ids = torch.randint(0, config.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(SEED + 1))
    return model, ids


def prefill(model, ids, press=None, attn: str = "eager") -> dict:
    """kvpress's prefill (the press's forward hook on every attention layer) with the press's `score`
    recording its inputs and output; returns them, the layer-0 inputs and the cache after it."""
    model.set_attn_implementation(attn)
    seen: dict = {}
    module = model.model.layers[0].self_attn

    def capture(mod, args, kwargs, output):
        seen.update(hidden_states=kwargs["hidden_states"].detach(), position_embeddings=kwargs["position_embeddings"],
                    attentions=None if output[1] is None else output[1].detach())
    hook = module.register_forward_hook(capture, with_kwargs=True)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            if press is None:
                model(ids, past_key_values=cache)
            else:
                score = press.score

                def recording(module, hidden_states, keys, values, attentions, kwargs):
                    seen.update(keys=keys.clone(), values=values.clone(), press_attentions=attentions)
                    seen["scores"] = score(module, hidden_states, keys, values, attentions, kwargs).detach().clone()
                    return seen["scores"]
                press.score = recording
                with press(model):
                    model(ids, past_key_values=cache)
    finally:
        hook.remove()
    seen["cache_keys"] = cache.layers[0].keys.detach().clone()
    if press is None:
        seen.update(keys=seen["cache_keys"], values=cache.layers[0].values.detach().clone())
    return seen


def kept_from_cache(full_keys: torch.Tensor, pruned_keys: torch.Tensor) -> torch.Tensor:
    """(B, H, k) sorted indices of the prompt's tokens the press left in the cache (matched by key)."""
    match = (pruned_keys[:, :, :, None, :] == full_keys[:, :, None, :, :]).all(-1)  # (B, H, k, L)
    assert (match.sum(-1) == 1).all(), "every kept key matches exactly one prompt token"
    return match.int().argmax(-1).sort(-1).values


def kvtrain_attention(probs: torch.Tensor, name: str, options: dict) -> torch.Tensor:
    """The (B, H_kv, L) attention `attend` hands the selector at the decision after a LENGTH-token
    prompt (interval 0), from the (B, Hq, Lq, Lk) probabilities: observed queries summed, query
    heads of a KV head averaged."""
    selector = selectors.build_selector(name, options)
    policy = eviction.EvictionPolicy(selector=name, budget=1.0, interval=0, options=options)
    if selector.observed == 0:
        return None
    b, hq, n, length = probs.shape
    observed = policy.observes(torch.arange(n), selector, LENGTH).to(probs.dtype)
    grouped = probs.reshape(b, KV_HEADS, hq // KV_HEADS, n, length)
    return torch.einsum("bhgql,q->bhl", grouped, observed) / grouped.shape[2]


def kvtrain_scores(probs: torch.Tensor, name: str, options: dict) -> torch.Tensor:
    attention = kvtrain_attention(probs, name, options)
    return selectors.build_selector(name, options).score(attention, _positions())


def kvtrain_kept(scores: torch.Tensor, name: str, options: dict, keep: float, policy: dict) -> torch.Tensor:
    rule = eviction.EvictionPolicy(selector=name, budget=keep, interval=0, options=options, **policy)
    return rule.survivors(scores, _positions(), LENGTH)


def _positions() -> torch.Tensor:
    return torch.arange(LENGTH, dtype=torch.int32).expand(1, KV_HEADS, LENGTH)


@torch.no_grad()
def attend_check(model, seen: dict, name: str, options: dict) -> dict:
    """kvtrain's own `attend` on the layer's real q/k/v: the attention it hands the selector at the
    prompt's decision, against the reconstruction from float64 probabilities of the same q/k (the
    accumulation) and from the model's eager probabilities (softmax in float32, as transformers does)."""
    module = model.model.layers[0].self_attn
    hidden, (cos, sin) = seen["hidden_states"], seen["position_embeddings"]
    b, n, _ = hidden.shape
    q = module.q_proj(hidden).view(b, n, -1, module.head_dim).transpose(1, 2)
    q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
    keys, values = seen["keys"], seen["values"]
    base = selectors.build_selector(name, options)
    recorded = []

    class Recording(type(base)):
        def score(self, attention, positions):
            recorded.append(None if attention is None else attention.clone())
            return super().score(attention, positions)
    selector = Recording(**{f.name: getattr(base, f.name) for f in fields(base)})
    policy = eviction.EvictionPolicy(selector=name, budget=1.0, interval=0, options=options)
    with torch.no_grad():
        eviction.attend(q, keys, values, eviction.Survivors.empty(keys, values, selector), policy, selector,
                        module.scaling, prompt=LENGTH)
    if recorded[0] is None:
        return {"attend_calls_score": len(recorded)}
    grouped = (q.reshape(b, KV_HEADS, -1, module.head_dim) @ keys.transpose(-1, -2)) * module.scaling
    grouped = grouped.reshape(b, KV_HEADS, -1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf)
    probs64 = grouped.softmax(-1).reshape(b, -1, n, n)
    return {"attend_vs_float64_probs": _maxdiff(recorded[0], kvtrain_attention(probs64, name, options)),
            "attend_vs_model_attentions": _maxdiff(recorded[0], kvtrain_attention(seen["attentions"], name, options))}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _agreement(mine: torch.Tensor, theirs: torch.Tensor) -> dict:
    heads = []
    for h in range(mine.shape[1]):
        a, b = set(mine[0, h].tolist()), set(theirs[0, h].tolist())
        heads.append({"kvtrain_only": sorted(a - b), "kvpress_only": sorted(b - a), "overlap": len(a & b),
                      "kept": len(b)})
    return {"identical": all(not h["kvtrain_only"] and not h["kvpress_only"] for h in heads), "heads": heads}


def _agreement_cell(result: dict) -> str:
    if result["identical"]:
        return f"yes ({result['heads'][0]['kept']}/{result['heads'][0]['kept']} each head)"
    return "no: " + ", ".join(f"h{i} {h['overlap']}/{h['kept']}" for i, h in enumerate(result["heads"]))


def main() -> None:
    model, ids = build_model()
    assert model.config.num_key_value_heads == KV_HEADS
    reference = prefill(model, ids)  # no press: the uncompressed cache, the layer's inputs
    full_keys, probs = reference["cache_keys"], reference["attentions"]
    fixture = {"kvpress_version": version("kvpress"), "transformers_version": version("transformers"),
               "torch_version": str(torch.__version__), "seed": SEED, "seq_len": LENGTH, "window": WINDOW,
               "kernel": KERNEL, "n_sink": N_SINK, "num_attention_heads": model.config.num_attention_heads,
               "num_key_value_heads": KV_HEADS, "initializer_range": INIT_RANGE,
               "attentions": probs.clone().contiguous()}
    rows, report = [], {"kvpress_version": fixture["kvpress_version"],
                        "transformers_version": fixture["transformers_version"], "torch_version": str(torch.__version__),
                        "model": "LlamaForCausalLM(hidden 128, 4 heads, 2 KV heads, 1 layer, intermediate 256, vocab "
                                 f"512, initializer_range {INIT_RANGE}), float64, seed {SEED}, layer 0",
                        "prompt_tokens": LENGTH, "selectors": {}}
    for name, case in CASES.items():
        options = case["options"]
        mine = kvtrain_scores(probs, name, options)
        entry = {"press": case["press_name"], "kvtrain_options": options, "kvtrain_policy": case["policy"],
                 "attend": attend_check(model, reference, name, options), "keep": {}}
        theirs_by_keep = {}
        for keep in KEEPS:
            ratio = round(1 - keep, 9)
            run = prefill(model, ids, case["press"](ratio))
            assert torch.equal(run["keys"], full_keys) and torch.equal(run["press_attentions"], probs)
            theirs_by_keep[keep] = run["scores"]
            kept = kept_from_cache(full_keys, run["cache_keys"])
            fixture[f"kept/{name}@{keep}"] = kept
            mine_kept = kvtrain_kept(mine, name, options, keep, case["policy"])
            bare_kept = kvtrain_kept(mine, name, options, keep, {})
            entry["keep"][str(keep)] = {"kvpress_compression_ratio": ratio, "kept": int(kept.shape[-1]),
                                        "kvpress_topk_of_scores_is_cache": bool(torch.equal(
                                            run["scores"].topk(kept.shape[-1], -1).indices.sort(-1).values, kept)),
                                        "matched_policy": _agreement(mine_kept, kept),
                                        "bare_policy": _agreement(bare_kept, kept)}
            if name == "streaming_llm":
                fixture[f"scores/{name}@{keep}"] = run["scores"].clone()
        theirs = theirs_by_keep[KEEPS[0]]
        if name != "streaming_llm":
            assert all(torch.equal(t, theirs) for t in theirs_by_keep.values())
            fixture[f"scores/{name}"] = theirs.clone()
        entry.update(compare(name, model, ids, mine, theirs, probs, options, fixture))
        report["selectors"][name] = entry
        rows.append([name, case["press_name"], entry["normalisation"], _fmt(entry["max_abs_diff"]),
                     _agreement_cell(entry["keep"]["0.25"]["matched_policy"]),
                     _agreement_cell(entry["keep"]["0.5"]["matched_policy"]), entry["note"]])
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, FIXTURE)
    torch.load(FIXTURE, weights_only=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kvpress_scores.json").write_text(json.dumps(report, indent=2) + "\n")
    header = ["selector", "kvpress press + options", "normalisation", "max abs diff", "top-25% kept agree",
              "top-50% kept agree", "why they differ"]
    lines = [f"# kvtrain selectors vs kvpress {report['kvpress_version']} scores", "",
             f"{report['model']}; a {LENGTH}-token prompt, one decision at its end (kvtrain interval 0). "
             "Kept sets: kvtrain's `EvictionPolicy.survivors` with the policy that reproduces the press's "
             f"forced keeps (snapkv recent={WINDOW}, tova recent=1, streaming_llm sinks={N_SINK}) against the "
             "tokens kvpress left in the cache. Generated by bench/kvpress_scores.py.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += ["", "Without the matched policy (sinks=0, recent=0): " + "; ".join(
        f"{n} 25% {_agreement_cell(e['keep']['0.25']['bare_policy'])}, 50% "
        f"{_agreement_cell(e['keep']['0.5']['bare_policy'])}" for n, e in report["selectors"].items()),
        "", "kvtrain's `attend` on the layer's real q/k/v hands the selector the attention reconstructed here: "
        + "; ".join(f"{n} {_fmt(e['attend'].get('attend_vs_float64_probs'))} (vs the model's float32-softmax "
                    f"attentions {_fmt(e['attend'].get('attend_vs_model_attentions'))})"
                    for n, e in report["selectors"].items() if "attend_vs_float64_probs" in e["attend"]) + "."]
    (RESULTS / "kvpress_scores.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {RESULTS / 'kvpress_scores.json'}, {RESULTS / 'kvpress_scores.md'}, {FIXTURE} "
          f"({FIXTURE.stat().st_size} bytes)", file=sys.stderr)


def compare(name, model, ids, mine, theirs, probs, options, fixture) -> dict:
    n = LENGTH
    if name == "snapkv":
        before = n - WINDOW
        # kvpress scores only the tokens before the window, pooled with them alone (zero padding at the
        # window's edge); kvtrain pools over every held token: the same on the window's columns zeroed
        masked = probs.clone()
        masked[..., before:] = 0
        exact = kvtrain_scores(masked, name, options)[..., :before] / WINDOW
        far = n - WINDOW - KERNEL // 2
        sdpa = prefill(model, ids, CASES[name]["press"](0.5), attn="sdpa")
        assert sdpa["press_attentions"] is None  # kvpress recomputes the window's attention from hidden_states
        fixture[f"scores_sdpa/{name}"] = sdpa["scores"].clone()
        return {"normalisation": f"kvtrain / window ({WINDOW}), tokens before the window",
                "max_abs_diff": _maxdiff(exact, theirs[..., :before]),
                "max_abs_diff_unmasked": {
                    f"tokens < {far}": _maxdiff(mine[..., :far] / WINDOW, theirs[..., :far]),
                    f"tokens {far}..{before - 1} (pooling reaches the window)":
                        _maxdiff(mine[..., far:before] / WINDOW, theirs[..., far:before])},
                "kvpress_window_score": float(theirs[0, 0, -1]),
                "kvpress_window_is_max_plus_1": bool(torch.equal(
                    theirs[..., before:], torch.full_like(theirs[..., before:], float(theirs[..., :before].max()) + 1))),
                "max_abs_diff_sdpa_path": _maxdiff(sdpa["scores"], theirs),
                "note": f"kvpress means over the {WINDOW} window queries (kvtrain sums); it scores only the "
                        f"{before} tokens before the window and pools them with zero padding at the window's edge "
                        f"(kvtrain's pooling reads the window's own attention: tokens {far}-{before - 1} differ, "
                        f"exact with those columns zeroed); the window's tokens get max+1 (kept), kvtrain scores "
                        f"them by attention and keeps them only with recent={WINDOW}. kvpress pools per query head "
                        "then averages the group, kvtrain averages then pools (linear: equal)"}
    if name == "tova":
        sdpa = prefill(model, ids, CASES[name]["press"](0.5), attn="sdpa")
        assert sdpa["press_attentions"] is None  # kvpress recomputes the window's attention from hidden_states
        fixture[f"scores_sdpa/{name}"] = sdpa["scores"].clone()
        return {"normalisation": "none, tokens before the last",
                "max_abs_diff": _maxdiff(mine[..., :-1], theirs[..., :-1]),
                "kvpress_last_is_max_plus_1": bool(float(theirs[0, 0, -1]) == float(theirs[..., :-1].max()) + 1),
                "kvtrain_last_token_score": float(mine[0, 0, -1]),
                "max_abs_diff_sdpa_path": _maxdiff(sdpa["scores"], theirs),
                "note": "same score (last query's attention, mean over all query heads, one set for every KV head); "
                        "kvpress drops the last token's attention to itself and gives it max+1 (kept), kvtrain "
                        "scores it by that attention and keeps it for sure only with recent=1"}
    if name == "h2o":
        seen_by = torch.arange(n, 0, -1, dtype=mine.dtype)
        normalised_kept = {str(keep): _agreement(kvtrain_kept(mine / seen_by, name, options, keep, {}),
                                                 fixture[f"kept/{name}@{keep}"])["identical"] for keep in KEEPS}
        return {"normalisation": "kvtrain / (queries that saw the token: L - j)",
                "max_abs_diff": _maxdiff(mine / seen_by, theirs),
                "max_abs_diff_unnormalised": _maxdiff(mine, theirs),
                "normalised_kvtrain_kept_equals_kvpress": normalised_kept,
                "note": "kvpress's ObservedAttention averages each token's attention over the queries that saw it "
                        "(L - j), kvtrain's H2O keeps the running sum (the H2O paper's): the sum favours early "
                        "tokens, the mean late ones, so the kept sets differ; kvtrain's scores / (L - j) keep "
                        "exactly kvpress's sets"}
    # streaming_llm: kvpress writes a 0/1 mask for the ratio, kvtrain scores by position
    return {"normalisation": "none (kvpress: 0/1 mask per ratio; kvtrain: position)",
            "max_abs_diff": None,
            "note": f"no common scale: kvpress's score is 1 on the {N_SINK} sinks and the newest and 0 elsewhere, "
                    f"recomputed for each compression ratio; kvtrain scores the position and the policy's sinks="
                    f"{N_SINK} keeps the sinks: the kept sets are the same (n_kept int(L*(1-r)) = ceil(budget*L) "
                    f"at L={n})"}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1e}"


if __name__ == "__main__":
    main()
