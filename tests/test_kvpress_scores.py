"""kvtrain's eviction selectors against NVIDIA kvpress's presses on the same attention.

tests/fixtures/kvpress_scores.pt comes from bench/kvpress_scores.py (kvpress 0.5.5, run in its own
venv; kvpress is not installed here): a seeded tiny Llama's layer-0 attention probabilities over a
48-token prompt, the scores kvpress's SnapKVPress, TOVAPress, ObservedAttentionPress and
StreamingLLMPress gave its tokens during prefill, and the tokens each left in the cache at 25% and 50%.
kvtrain's side is recomputed here from the stored probabilities, as `kvtrain.kv.eviction.attend`
accumulates them at the decision that ends the prompt (interval 0): the observed queries' attention
summed, each KV head's query heads averaged. Where the two agree they agree to 1e-9 after the stated
normalisation; where they do not, the difference asserted is the documented one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtrain.kv.eviction import EvictionPolicy
from kvtrain.kv.selectors import build_selector

FIXTURE = Path(__file__).parent / "fixtures" / "kvpress_scores.pt"
KEEPS = (0.25, 0.5)
TOL = 1e-9


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def _options(ref: dict, name: str) -> dict:
    return {"window": ref["window"], "kernel": ref["kernel"]} if name == "snapkv" else {}


def _positions(ref: dict) -> torch.Tensor:
    n, h = ref["seq_len"], ref["num_key_value_heads"]
    return torch.arange(n, dtype=torch.int32).expand(1, h, n)


def _attention(ref: dict, name: str, probs: torch.Tensor | None = None) -> torch.Tensor:
    """What `attend` hands the selector at the prompt's decision."""
    probs = ref["attentions"] if probs is None else probs
    options = _options(ref, name)
    selector = build_selector(name, options)
    policy = EvictionPolicy(selector=name, budget=1.0, interval=0, options=options)
    b, hq, n, length = probs.shape
    observed = policy.observes(torch.arange(n), selector, ref["seq_len"]).to(probs.dtype)
    grouped = probs.reshape(b, ref["num_key_value_heads"], -1, n, length)
    return torch.einsum("bhgql,q->bhl", grouped, observed) / grouped.shape[2]


def _scores(ref: dict, name: str, probs: torch.Tensor | None = None) -> torch.Tensor:
    attention = None if name == "streaming_llm" else _attention(ref, name, probs)
    return build_selector(name, _options(ref, name)).score(attention, _positions(ref))


def _kept(ref: dict, name: str, scores: torch.Tensor, keep: float, **policy) -> torch.Tensor:
    rule = EvictionPolicy(selector=name, budget=keep, interval=0, options=_options(ref, name), **policy)
    return rule.survivors(scores, _positions(ref), ref["seq_len"])


def _difference(mine: torch.Tensor, theirs: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """Per KV head: (kept by kvtrain only, kept by kvpress only)."""
    return [(sorted(set(a.tolist()) - set(b.tolist())), sorted(set(b.tolist()) - set(a.tolist())))
            for a, b in zip(mine[0], theirs[0])]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() <= TOL, float((a - b).abs().max())


def test_fixture(ref):
    assert ref["kvpress_version"].startswith("0.5.")
    assert ref["attentions"].dtype == torch.float64
    assert ref["attentions"].shape == (1, ref["num_attention_heads"], ref["seq_len"], ref["seq_len"])
    # transformers' eager softmax runs in float32 (then casts to float64): rows sum to 1 to float32's precision
    assert (ref["attentions"].sum(-1) - 1).abs().max() < 1e-6
    for name in ("snapkv", "tova"):  # kvpress's window attention recomputed from hidden_states (sdpa) = eager
        _close(ref[f"scores_sdpa/{name}"], ref[f"scores/{name}"])


def test_observed_queries(ref):
    n, window = ref["seq_len"], ref["window"]
    probs = ref["attentions"]
    head_mean = probs.reshape(1, ref["num_key_value_heads"], -1, n, n).mean(2)
    _close(_attention(ref, "snapkv"), head_mean[..., n - window:, :].sum(-2))
    _close(_attention(ref, "tova"), head_mean[..., -1, :])
    _close(_attention(ref, "h2o"), head_mean.sum(-2))


def test_snapkv(ref):
    """kvpress: the mean over the window's queries (kvtrain: the sum, so / window) of the tokens before
    the window only, pooled among themselves (zero padding where the window starts); the window's own
    tokens get max + 1. kvtrain pools over every token, so the last kernel // 2 before the window read
    the window's attention: equal once those columns are zeroed."""
    n, window, kernel = ref["seq_len"], ref["window"], ref["kernel"]
    before, far = n - window, n - window - kernel // 2
    theirs = ref["scores/snapkv"]
    masked = ref["attentions"].clone()
    masked[..., before:] = 0
    _close(_scores(ref, "snapkv", masked)[..., :before] / window, theirs[..., :before])
    mine = _scores(ref, "snapkv") / window
    _close(mine[..., :far], theirs[..., :far])
    assert (mine[..., far:before] - theirs[..., far:before]).abs().min() > 1e-4  # the pooling reaches the window
    assert torch.equal(theirs[..., before:], torch.full_like(theirs[..., before:], theirs[..., :before].max().item() + 1))
    for keep in KEEPS:
        theirs_kept = ref[f"kept/snapkv@{keep}"]
        assert torch.equal(_kept(ref, "snapkv", mine, keep, recent=window), theirs_kept)
        # without recent=window kvtrain ranks the window's tokens by their attention: none of them survives here
        bare = _difference(_kept(ref, "snapkv", mine, keep), theirs_kept)
        assert all(press_only == list(range(before, n)) and len(mine_only) == window for mine_only, press_only in bare)


def test_tova(ref):
    """The same score (the last query's attention averaged over every query head); kvpress gives the
    last token max + 1 instead of its attention to itself."""
    theirs, mine = ref["scores/tova"], _scores(ref, "tova")
    _close(mine[..., :-1], theirs[..., :-1])
    assert theirs[..., -1].eq(theirs[..., :-1].max() + 1).all()
    assert torch.equal(mine[:, :1].expand_as(mine), mine) and torch.equal(theirs[:, :1].expand_as(theirs), theirs)
    for keep in KEEPS:
        assert torch.equal(_kept(ref, "tova", mine, keep, recent=1), ref[f"kept/tova@{keep}"])
    # without recent=1 the last token (attention to itself 0.012) loses its seat
    assert _difference(_kept(ref, "tova", mine, 0.25), ref["kept/tova@0.25"]) == [([43], [47])] * 2
    assert _difference(_kept(ref, "tova", mine, 0.5), ref["kept/tova@0.5"]) == [([18], [47])] * 2


def test_h2o(ref):
    """kvpress's ObservedAttentionPress divides the accumulated attention by the queries that saw each
    token (L - j); kvtrain's H2O keeps the running sum, which favours the early tokens: every token only
    kvtrain keeps comes before every token only kvpress keeps."""
    n = ref["seq_len"]
    theirs, mine = ref["scores/h2o"], _scores(ref, "h2o")
    seen_by = torch.arange(n, 0, -1, dtype=mine.dtype)
    _close(mine / seen_by, theirs)
    expected = {0.25: [([10, 11], [31, 35]), ([4, 6, 11], [25, 35, 46])],
                0.5: [([14, 19, 22], [31, 35, 43]), ([16, 18, 19, 20], [30, 35, 38, 46])]}
    for keep in KEEPS:
        theirs_kept = ref[f"kept/h2o@{keep}"]
        assert torch.equal(_kept(ref, "h2o", mine / seen_by, keep), theirs_kept)
        difference = _difference(_kept(ref, "h2o", mine, keep), theirs_kept)
        assert difference == expected[keep]
        assert all(max(mine_only) < min(press_only) for mine_only, press_only in difference)


def test_streaming_llm(ref):
    """No common scale (kvpress: 1 on the sinks and the newest, 0 elsewhere, for each ratio; kvtrain:
    the position, the policy's sinks): the same kept sets."""
    mine = _scores(ref, "streaming_llm")
    assert torch.equal(mine, _positions(ref).float())
    for keep in KEEPS:
        theirs_kept = ref[f"kept/streaming_llm@{keep}"]
        assert torch.equal(_kept(ref, "streaming_llm", mine, keep, sinks=ref["n_sink"]), theirs_kept)
        mask = torch.zeros_like(ref[f"scores/streaming_llm@{keep}"]).scatter(-1, theirs_kept, 1.0)
        assert torch.equal(ref[f"scores/streaming_llm@{keep}"], mask)
