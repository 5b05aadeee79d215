"""ThinK's channel pruning (issue 13): each head's lowest-scoring channels are not stored, the kept ones
encoded by the inner codec; the kept set is scored from the weights, then by `kvtrain calibrate` with
ThinK's E[q_j^2] E[k_j^2]. Parity on every architecture and both placements runs from the registry
(tests/test_kv_codecs.py, the `prune_channels` examples)."""

from __future__ import annotations

import pytest
import torch
from test_kv_parity import TOL, build, decode, training_views

from kvtrain.kv import KVSpec, TensorPolicy, attach, detach
from kvtrain.kv.attention import CODEC_STATE, codec_state_dict, load_codec_state
from kvtrain.kv.calibrate import calibrate
from kvtrain.kv.codecs.channels import ChannelScores

THINK = dict(codec="raw", bits=16)


def think(fraction: float, placement: str = "post_rope", residual: int = 8) -> KVSpec:
    """ThinK on the keys, values in full precision."""
    return KVSpec(key={**THINK, "prune_channels": fraction}, value=None, residual=residual, placement=placement)


def test_kept_channels_by_hand():
    """Two heads of 4 channels, prune 0.5: the weight rows' energies keep channels {1, 3} of head 0 and
    {0, 2} of head 1; the token [[1, 2, 3, 4], [5, 6, 7, 8]] is stored as [[2, 4], [5, 7]] in float16
    (8 bytes) and read back as [[0, 2, 0, 4], [5, 0, 7, 0]]."""
    codec = TensorPolicy(**THINK, prune_channels=0.5).codec_at(0)
    weight = torch.diag(torch.tensor([0.1, 2.0, 0.3, 1.0, 3.0, 0.2, 1.5, 0.1])) @ torch.ones(8, 3)
    state = codec.make_state(4, kv_heads=2, weight=weight)
    assert state.kept.tolist() == [[1, 3], [0, 2]]
    bound = codec.bound(state)
    x = torch.arange(1.0, 9.0).view(1, 2, 1, 4)
    payload = bound.encode(x)
    assert payload.tensors["values"].dtype == torch.float16 and payload.tensors["values"].tolist() == [[[[2, 4]], [[5, 7]]]]
    assert payload.nbytes() == 8 and payload.shape == (1, 2, 1, 4)
    assert bound.decode(payload).tolist() == [[[[0, 2, 0, 4]], [[5, 0, 7, 0]]]]
    x.requires_grad_(True)
    bound.simulate(x).sum().backward()
    assert x.grad.tolist() == [[[[0, 1, 0, 1]], [[1, 0, 1, 0]]]]  # the pruned channels get no gradient


def test_the_score_is_thinks_query_times_key_energy():
    """One KV head read by two query heads, 3 channels kept of 4: E[k^2] = [4, 1, 9, 0.25] and the query
    heads' mean E[q^2] = [0.5, 8, 0.1, 2] give scores [2, 8, 0.9, 0.5]: channel 3 goes (its keys alone
    would prune channel 3 too, but the queries make channel 1 outrank channel 0 and channel 2 the
    smallest kept); values (no queries) keep their 3 largest energies."""
    scores = ChannelScores(torch.tensor([[0, 1, 2]]), head_dim=4)
    scores.start_observing()
    scores.observe(torch.tensor([2.0, 1.0, 3.0, 0.5]).view(1, 1, 1, 4).expand(2, 1, 3, 4))
    q = torch.tensor([[1.0, 4.0, 0.0, 2.0], [0.0, 0.0, 0.4472135955, 0.0]])  # E over the 2 heads: [0.5, 8, 0.1, 2]
    scores.observe_queries(q.view(1, 2, 1, 4).expand(3, 2, 5, 4))
    torch.testing.assert_close(scores.scores(), torch.tensor([[2.0, 8.0, 0.9, 0.5]], dtype=torch.float64))
    row = scores.fit()
    assert scores.kept.tolist() == [[0, 1, 2]] and row["values"] == 2 * 3 * 4
    assert row["error_after"] == pytest.approx(0.5 / 11.4) and row["error_before"] == row["error_after"]
    values = ChannelScores(torch.tensor([[0, 1, 2]]), head_dim=4)
    values.start_observing()
    values.observe(torch.tensor([1.0, 3.0, 0.5, 2.0]).view(1, 1, 1, 4))
    values.fit()
    assert values.kept.tolist() == [[0, 1, 3]]


def test_calibration_keeps_the_channels_queries_read():
    """A key channel made large by its k_proj row but never read by a query (its q_proj rows zeroed) is
    kept by the weights' start and pruned by calibration, in both placements (pre-RoPE scores the
    queries rotated back: RoPE pairs channel j with j + 16, so the pair's queries are zeroed)."""
    for placement in ("post_rope", "pre_rope"):
        model = build("llama")  # 4 query heads, 2 KV heads of 32, float64
        with torch.no_grad():
            for layer in model.model.layers:
                attention = layer.self_attn
                attention.k_proj.weight[5] *= 50  # head 0, channel 5
                attention.q_proj.weight.view(4, 32, -1)[:2, [5, 21]] = 0  # the query heads reading KV head 0
        spec = think(0.25, placement, residual=0)
        attach(model, spec)
        assert 5 in model.model.layers[0].self_attn.kv_codec_state["key"].kept[0].tolist()
        detach(model)
        ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
        rows = calibrate(model, spec, ids.split(2), progress=False)
        kept = model.model.layers[0].self_attn.kv_codec_state["key"].kept
        assert 5 not in kept[0].tolist() and kept.shape == (2, 24), placement
        assert all(r["fit"] == "channels" and r["error_after"] < r["error_before"] for r in rows)
        detach(model)


def test_calibration_observes_the_queries_before_rope_for_pre_rope_keys(monkeypatch):
    """Pre-RoPE: the queries the key scores observe are q_proj's output (llama: no query norm)."""
    model = build("llama")
    outputs, seen = [], []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
    real = ChannelScores.observe_queries
    monkeypatch.setattr(ChannelScores, "observe_queries", lambda self, q: seen.append((self, q)) or real(self, q))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    calibrate(model, think(0.5, "pre_rope", residual=0), [ids], progress=False)
    hook.remove()
    scores = getattr(model.model.layers[1].self_attn, CODEC_STATE)["key"]
    query = next(q for state, q in seen if state is scores)  # (B, query heads, T, D)
    # (to the model's RoPE precision: its cos and sin are computed in float32; the rotated query is O(1) away)
    torch.testing.assert_close(query.transpose(1, 2).reshape(2, 24, 128), outputs[0], rtol=1e-6, atol=1e-6)
    detach(model)


def test_the_cache_stores_only_the_kept_channels_and_decodes_as_trained():
    model = build("llama")
    spec = think(0.5)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    calibrate(model, spec, [ids], progress=False)
    _, trained_view = training_views(model, ids, spec)
    decoded, cache = decode(model, ids, spec, [17])
    torch.testing.assert_close(decoded, trained_view, **TOL)
    for layer in cache.layers:
        stored = layer.k.packed.payload.tensors["values"]
        assert stored.dtype == torch.float16 and stored.shape == (2, 2, layer.k.packed.encoded, 16)
    saved = codec_state_dict(model)
    detach(model)
    assert any(name.endswith("key.kept") for name in saved)
    attach(model, think(0.5))  # a fresh attach starts from the weights again; the saved state gives it back
    load_codec_state(model, saved)
    again, _ = decode(model, ids, spec, [17])
    assert torch.equal(again, decoded)
    detach(model)


def test_channel_pruning_settings_are_checked():
    with pytest.raises(ValueError, match=r"prune_channels must be a fraction in \[0, 1\), got 1.0"):
        TensorPolicy(**THINK, prune_channels=1.0)
    with pytest.raises(ValueError, match="prune_channels=0.5 and rank=4 both shrink each token"):
        TensorPolicy(**THINK, prune_channels=0.5, rank=4)
    model = build("llama")
    with pytest.raises(ValueError, match=r"prune_channels=0.01 prunes 0 of a head's 32 channels.*\[0.03125, 0.9688\]"):
        attach(model, think(0.01))
    with pytest.raises(ValueError, match=r"group=32 does not divide head_dim=16.*the 16 channels that prune_channels=0.5 keeps of head_dim 32"):  # the inner codec's groups against the 16 kept channels
        attach(model, KVSpec(key=dict(bits=2, granularity="per_token(32)", prune_channels=0.5), value=None))
    codec = TensorPolicy(**THINK, prune_channels=0.5).codec_at(0)
    with pytest.raises(ValueError, match="reads its kept channels from the model it is attached to"):
        codec.encode(torch.zeros(1, 2, 1, 32))
