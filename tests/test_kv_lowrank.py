"""The low-rank stage (issue 13): K or V stored as a latent of `rank` numbers per token and group of
heads (CSKV, Palu), its factors from the SVD of k_proj / v_proj, refitted by calibration (principal
directions) and trained with the model; the cache holds the latents. Parity on every architecture and
both placements runs from the registry (tests/test_kv_codecs.py, the `rank` examples)."""

from __future__ import annotations

import pytest
import torch
from test_kv_parity import TOL, build, decode, training_views

from kvtrain.kv import KVSpec, TensorPolicy, attach, detach
from kvtrain.kv.attention import CODEC_STATE, codec_state_dict, load_codec_state
from kvtrain.kv.calibrate import calibrate
from kvtrain.kv.codecs.lowrank import LowRankFactors

RAW = dict(codec="raw", bits=16)


def lowrank(rank: int, latent_heads: int = 0, **policy) -> KVSpec:
    fields = {**RAW, **policy, "rank": rank, "latent_heads": latent_heads}
    return KVSpec(key=fields, value=fields, residual=8, placement="pre_rope")


def test_a_latent_by_hand():
    """Two heads of 2 channels, one latent of rank 1 for both: [[1, 2], [3, 4]] is the row [1, 2, 3, 4]
    (head-major), P = [1, 0, 0, 1]^T gives the latent 5, stored in float16; Q = [0.5, 0, 0, 0.5] gives
    back [2.5, 0, 0, 2.5], heads [[2.5, 0], [0, 2.5]]. One latent per head (latent_heads=1) keeps each
    head's first channel with P = [1, 0]^T, Q = [1, 0]."""
    codec = TensorPolicy(**RAW, rank=1).codec_at(0)
    state = codec.make_state(2, kv_heads=2, weight=torch.eye(4))
    with torch.no_grad():
        state.down.copy_(torch.tensor([[[1.0], [0.0], [0.0], [1.0]]]))
        state.up.copy_(torch.tensor([[[0.5, 0.0, 0.0, 0.5]]]))
    bound = codec.bound(state)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    payload = bound.encode(x)
    assert payload.tensors["values"].dtype == torch.float16 and payload.tensors["values"].flatten().tolist() == [5.0]
    assert payload.nbytes() == 2 and payload.shape == (1, 2, 1, 2)
    assert bound.decode(payload).flatten().tolist() == [2.5, 0.0, 0.0, 2.5]
    per_head = TensorPolicy(**RAW, rank=1, latent_heads=1).codec_at(0)
    state = per_head.make_state(2, kv_heads=2, weight=torch.eye(4))
    with torch.no_grad():
        state.down.copy_(torch.tensor([[1.0], [0.0]]).expand(2, 2, 1))
        state.up.copy_(torch.tensor([[1.0, 0.0]]).expand(2, 1, 2))
    payload = per_head.bound(state).encode(x)
    assert payload.tensors["values"].shape == (1, 2, 1, 1) and payload.nbytes() == 4
    assert per_head.bound(state).decode(payload).flatten().tolist() == [1.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_factors_start_from_the_svd_of_the_projection(arch):
    """P = U_r of the layer's key (value) rows of the projection, Q = P^T: z Q = x U_r U_r^T, the best
    rank-r approximation of the projection (Phi-3: the key and value rows of its fused qkv_proj)."""
    model = build(arch)  # 4 query heads and 2 KV heads of 32, float64
    attach(model, lowrank(24))
    attention = model.model.layers[1].self_attn
    state = getattr(attention, CODEC_STATE)
    if arch == "llama":
        rows = {"key": attention.k_proj.weight, "value": attention.v_proj.weight}
    else:
        rows = dict(zip(("key", "value"), attention.qkv_proj.weight[128:].split(64)))
    for name, weight in rows.items():
        u = torch.linalg.svd(weight.detach(), full_matrices=False)[0][:, :24]
        down, up = state[name].down[0].double(), state[name].up[0].double()
        assert torch.allclose(down @ up, u @ u.T, atol=1e-6)  # (stored in float32)
        assert torch.allclose(down.T @ down, torch.eye(24, dtype=torch.float64), atol=1e-6)
        assert state[name].down.is_contiguous() and state[name].up.is_contiguous()  # (ZeRO views their bytes)
    detach(model)


def test_the_cache_holds_latents_and_counts_their_bytes():
    """Tokens older than the window are stored as one float16 latent of `rank` numbers per token (both
    heads share it); the window stays in the model's dtype."""
    model = build("llama")
    spec = lowrank(24)
    attach(model, spec)
    ids = torch.randint(0, 512, (2, 50), generator=torch.Generator().manual_seed(0))
    _, cache = decode(model, ids, spec, [20])
    detach(model)
    for layer in cache.layers:
        for stored in (layer.k, layer.v):
            latents = stored.packed.payload.tensors["values"]
            assert latents.dtype == torch.float16 and latents.shape == (2, 1, stored.packed.encoded, 24)
            assert stored.packed.n == 50 - 8 and stored.tail.shape == (2, 2, 8, 32)
        positions = 2 * 50 * 4  # pre-RoPE keys: each token's position (int32), to rotate it back
        assert layer.nbytes() == 2 * (2 * layer.k.packed.encoded * 24 * 2 + 2 * 2 * 8 * 32 * 8) + positions


def test_a_training_step_moves_the_factors_and_the_cache_decodes_with_them():
    model = build("llama")
    spec = lowrank(24, codec="affine", bits=4, granularity="per_token(8)")
    attach(model, spec)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    factors = [m for m in model.modules() if isinstance(m, LowRankFactors)]
    before = [f.down.detach().clone() for f in factors]
    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert all(f.down.grad.abs().sum() > 0 and f.up.grad.abs().sum() > 0 for f in factors)
    with torch.no_grad():
        for f in factors:
            f.down -= 0.5 * f.down.grad
            f.up -= 0.5 * f.up.grad
    assert all(not torch.equal(f.down, b) for f, b in zip(factors, before))
    _, trained_view = training_views(model, ids, spec)  # (re-attaching the same spec keeps the factors)
    decoded, _ = decode(model, ids, spec, [17])
    torch.testing.assert_close(decoded, trained_view, **TOL)
    saved = codec_state_dict(model)
    detach(model)
    attach(model, lowrank(24, codec="affine", bits=4, granularity="per_token(8)"), )
    load_codec_state(model, saved)
    assert all(torch.equal(a, b) for a, b in zip(codec_state_dict(model).values(), saved.values()))
    detach(model)


def test_calibration_sets_the_principal_directions_of_what_the_stage_compresses():
    """With no window (residual 0) the keys' stage sees every k_proj output: after calibration its
    error is that of the top-r principal directions of those outputs, lower than the SVD start."""
    model = build("llama")
    spec = KVSpec(key={**RAW, "rank": 8}, value={**RAW, "rank": 8}, residual=0, placement="pre_rope")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    outputs = []
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
    rows = calibrate(model, spec, ids.split(2), progress=False)
    hook.remove()
    keys = torch.cat([o.flatten(0, 1) for o in outputs[:2]])  # the two calibration forwards, (tokens, 64)
    eigenvalues = torch.linalg.eigvalsh(keys.T @ keys)
    expected = float(eigenvalues[:-8].sum() / eigenvalues.sum())
    row = next(r for r in rows if (r["layer"], r["tensor"]) == (0, "key"))
    assert row["fit"] == "low-rank" and row["values"] == keys.numel()
    assert row["error_after"] == pytest.approx(expected, rel=1e-6) and row["error_after"] < row["error_before"]
    assert all(r["error_after"] < r["error_before"] for r in rows)
    detach(model)


def test_low_rank_settings_are_checked():
    with pytest.raises(ValueError, match="latent_heads=2 groups the heads of a low-rank latent: set rank too"):
        TensorPolicy(latent_heads=2)
    with pytest.raises(ValueError, match="rank must be a non-negative integer, got -1"):
        TensorPolicy(rank=-1)
    with pytest.raises(ValueError, match="the raw codec stores each number in 16 bits.*got bits=2"):
        TensorPolicy(codec="raw", bits=2, rank=4)
    with pytest.raises(ValueError, match="scale_dtype='float32'"):
        TensorPolicy(codec="raw", bits=16, scale_dtype="float32")
    codec = TensorPolicy(**RAW, rank=4).codec_at(0)
    with pytest.raises(ValueError, match="from the SVD of the layer's k_proj / v_proj weight"):
        codec.make_state(32, kv_heads=2)
    model = build("llama")
    with pytest.raises(ValueError, match=r"rank=64 keeps all of a latent's 64 numbers \(2 heads of 32\)"):
        attach(model, lowrank(64))
    with pytest.raises(ValueError, match="latent_heads=3 must divide the layer's 2 KV heads"):
        attach(model, lowrank(8, latent_heads=3))
