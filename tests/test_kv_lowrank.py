"""The low-rank stage (issue 13): K or V stored as a latent of `rank` numbers per token and group of
heads (CSKV, Palu), its factors from the SVD of k_proj / v_proj, refitted by calibration (principal
directions) and trained with the model; the cache holds the latents. Parity on every architecture and
both placements runs from the registry (tests/test_kv_codecs.py, the `rank` examples)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_kv_parity import ARCHS, TOL, build, decode, training_views

from kvtrain.kv import KVSpec, TensorPolicy, attach, detach
from kvtrain.kv.attention import CODEC_STATE, codec_state_dict, load_codec_state
from kvtrain.kv.calibrate import calibrate
from kvtrain.kv.codecs.lowrank import LowRankFactors

RAW = dict(codec="raw", bits=16)


def lowrank(rank: int, latent_heads: int = 0, value_rank: int | None = None, **policy) -> KVSpec:
    fields = {**RAW, **policy, "rank": rank, "latent_heads": latent_heads}
    return KVSpec(key=fields, value={**fields, "rank": value_rank or rank}, residual=8, placement="pre_rope")


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


def test_fisher_ranks_by_hand():
    """The budget of the ranks now, spent greedily on the next direction's sensitivity x eigenvalue per
    byte, each rank in [1, width - 1]. A: eigenvalues [8, 4, 2, 1], s = 1; B: [6, 5, 0.5, 0.1], s = 0.5;
    both at rank 2 (budget 4 + 1 = 5 with one byte a rank): from ranks 1, A's next gains 4 against B's
    2.5 -> A = 2; A's next 2 against 2.5 -> B = 2; A's 2 against B's 0.25 -> A = 3, budget spent.
    With B costing 2 bytes a rank (two groups of heads), budget 2 + 4 = 6 from 1 + 2: A takes ranks 2
    and 3 (gains 4 and 2 per byte, against B's 1.25), stops at width - 1 = 3, and B's next rank (2
    bytes) would overspend: A = 3, B = 1."""
    from kvtrain.kv.calibrate import fisher_ranks

    a, b = torch.tensor([[8.0, 4, 2, 1]]), torch.tensor([[6.0, 5, 0.5, 0.1]])
    assert fisher_ranks({"A": (a, 1.0, 1, 2), "B": (b, 0.5, 1, 3)}) == {"A": 3, "B": 2}
    two_groups = torch.cat([b, b]) / 2  # (B's gain summed over its groups: 0.5 x 5 = 2.5, 1.25 per byte)
    assert fisher_ranks({"A": (a, 1.0, 1, 2), "B": (two_groups, 0.5, 2, 2)}) == {"A": 3, "B": 1}
    assert fisher_ranks({"A": (a, 1.0, 1, 2), "B": (two_groups, 0.5, 2, 2)}, floor=1.0) == {"A": 2, "B": 2}
    # a floor: C (s * eigenvalues ~0.001) would drop from rank 4 to 1 while D takes ranks 2-5; at half
    # its rank C keeps 2 and D stops at 4 (budget 2 + 4 = 6)
    c, d = torch.full((1, 8), 1e-3), torch.tensor([[8.0, 4, 2, 1, 0.5, 0.25, 0.1, 0.05]])
    assert fisher_ranks({"C": (c, 1.0, 1, 4), "D": (d, 1.0, 1, 2)}) == {"C": 1, "D": 5}
    assert fisher_ranks({"C": (c, 1.0, 1, 4), "D": (d, 1.0, 1, 2)}, floor=0.5) == {"C": 2, "D": 4}


def test_fisher_calibration_respends_the_uniform_ranks_per_layer_and_decodes_as_trained(tmp_path):
    """ranks='fisher': the attached spec gets per-layer ranks with the uniform spec's total (raw latents:
    every rank costs the same), chosen by `fisher_ranks` from what calibration observed (sensitivity
    from backward is positive); each layer's factors have its rank and are the principal directions
    (error below the SVD start); the model then decodes what it trains on, and the calibrated folder
    reloads with the per-layer ranks."""
    from kvtrain.kv.attention import attached_spec

    model = build("llama")
    layers = len(model.model.layers)
    spec = KVSpec(key={**RAW, "rank": 8}, value={**RAW, "rank": 16}, residual=4, placement="pre_rope")
    ids = torch.randint(0, 512, (4, 40), generator=torch.Generator().manual_seed(5))
    rows = calibrate(model, spec, ids.split(2), progress=False, ranks="fisher")
    fitted = attached_spec(model)
    ranks = {**{(layer, "key"): r for layer, r in fitted.key.layer_rank.items()},
             **{(layer, "value"): r for layer, r in fitted.value.layer_rank.items()}}
    assert len(ranks) == 2 * layers and sum(ranks.values()) == layers * (8 + 16)
    assert len(set(ranks.values())) > 1  # (a uniform answer would be the start: nothing re-spent)
    factors = {(m.layer_idx, name): s for m in (layer.self_attn for layer in model.model.layers)
               for name, s in getattr(m, CODEC_STATE).items()}
    assert all(factors[key].down.shape[-1] == rank for key, rank in ranks.items())
    assert all(f.sensitivity > 0 and f.gradients > 0 for f in factors.values())  # (taken over from the uniform start)
    assert all(r["rank"] == ranks[r["layer"], r["tensor"]] and r["error_after"] < r["error_before"] for r in rows)
    _, trained_view = training_views(model, ids[:2], fitted)
    decoded, _ = decode(model, ids[:2], fitted, [13])
    torch.testing.assert_close(decoded, trained_view, **TOL)
    saved = codec_state_dict(model)
    detach(model)
    fitted.save(tmp_path)  # (kv_spec.json: layer_rank's keys become strings)
    save_file(saved, str(tmp_path / "kv_codec_state.safetensors"))
    assert attach(model, str(tmp_path)) == fitted
    again, _ = decode(model, ids[:2], fitted, [13])
    assert torch.equal(again, decoded)
    detach(model)
    with pytest.raises(ValueError, match="ranks must be one of"):
        calibrate(model, spec, ids.split(2), progress=False, ranks="palu")
    calibrate(model, spec, ids.split(2), progress=False, ranks="fisher", rank_floor=1.0)  # (every rank at its floor)
    assert set(attached_spec(model).key.layer_rank.values()) == {8} and set(attached_spec(model).value.layer_rank.values()) == {16}
    detach(model)
    with pytest.raises(ValueError, match=r"rank_floor must be a fraction in \[0, 1\] of each latent's rank, got 1.5"):
        calibrate(model, spec, ids.split(2), progress=False, ranks="fisher", rank_floor=1.5)
    with pytest.raises(ValueError, match="ranks='fisher' budgets the ranks of low-rank latents"):
        calibrate(model, KVSpec(key=dict(codec="raw", bits=16, prune_channels=0.5), value=None), ids.split(2),
                  progress=False, ranks="fisher")
    detach(model)


def test_observed_sensitivity_is_the_squared_gradient_of_what_the_stage_compresses():
    """During calibration each low-rank state adds up the squared LM-loss gradient of its K or V's
    compressed tokens: equal to autograd's for a crafted loss through one layer's keys."""
    model = build("llama")
    spec = KVSpec(key={**RAW, "rank": 8}, value=None, residual=0, placement="pre_rope")
    attach(model, spec)
    state = getattr(model.model.layers[0].self_attn, CODEC_STATE)["key"]
    state.start_observing()
    x = torch.randn(1, 2, 5, 32, dtype=torch.float64)
    watched = state.observe_gradient(x)
    assert watched.is_leaf and watched.requires_grad
    (watched.square() * 3).sum().backward()  # d/dx = 6x
    assert state.sensitivity == pytest.approx(float((6 * x).square().sum())) and state.gradients == x.numel()
    state.observed = None
    detach(model)


def test_layer_ranks_are_checked():
    with pytest.raises(ValueError, match=r"layer_rank=\{1: 4\} overrides the rank of a low-rank latent.*set rank"):
        TensorPolicy(**RAW, layer_rank={1: 4})
    with pytest.raises(ValueError, match=r"layer_rank maps layer indices >= 0 to ranks >= 1, got \{1: 0\}"):
        TensorPolicy(**RAW, rank=8, layer_rank={1: 0})
    assert TensorPolicy(**RAW, rank=8, layer_rank={"1": 4}).codec_at(1).rank == 4  # (JSON's string keys)
    assert TensorPolicy(**RAW, rank=8, layer_rank={"1": 4}).codec_at(0).rank == 8
    model = build("llama")
    with pytest.raises(ValueError, match=r"layer indices \[7\] are out of range"):
        attach(model, KVSpec(key={**RAW, "rank": 8, "layer_rank": {7: 4}}, value=None))


def joint(rank: int, placement: str = "pre_rope", **policy) -> KVSpec:
    return KVSpec(key={**RAW, **policy, "rank": rank}, value=None, joint_kv=True, residual=8, placement=placement)


@pytest.mark.parametrize("placement", ["pre_rope", "post_rope"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_joint_latent_trains_as_it_decodes(arch, placement):
    """K and V as one latent (MHA2MLA): one training forward equals decoding with the cache, after any
    prefill split, on every architecture and both placements (pre-RoPE: only the keys are rotated)."""
    model = build(arch)
    spec = joint(40, placement)
    ids = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(1))
    full_precision, trained_view = training_views(model, ids, spec)
    assert (trained_view - full_precision).abs().max() > 1e-2, "the joint latent did not change the forward"
    for splits in ([17], [30]):
        decoded, _ = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, trained_view, **TOL, msg=f"prefill splits {splits}")
    detach(model)


def test_a_joint_latent_starts_from_the_svd_of_both_projections_and_the_cache_holds_it():
    """P = U_r of [W_k; W_v] (keys' rows first), one latent of `rank` numbers per token for both K and V
    (128 numbers: 2 KV heads of 32 each), quantized here to 4 bits in groups of 8 (a float16 scale and
    zero point a group); the window holds K and V side by side, 8 tokens of 4 heads."""
    model = build("llama")
    spec = joint(24, codec="affine", bits=4, granularity="per_token(8)")
    attach(model, spec)
    attention = model.model.layers[1].self_attn
    state = getattr(attention, CODEC_STATE)
    assert set(state) == {"key"} and state["key"].down.shape == (1, 128, 24)
    stacked = torch.cat([attention.k_proj.weight, attention.v_proj.weight]).detach()
    u = torch.linalg.svd(stacked, full_matrices=False)[0][:, :24]
    assert torch.allclose(state["key"].down[0].double() @ state["key"].up[0].double(), u @ u.T, atol=1e-6)
    ids = torch.randint(0, 512, (2, 50), generator=torch.Generator().manual_seed(0))
    _, cache = decode(model, ids, spec, [20])
    for layer in cache.layers:
        assert type(layer).__name__ == "JointKVLayer" and layer.v is None
        assert layer.k.packed.n == 50 - 8 and layer.k.tail.shape == (2, 4, 8, 32)
        codes = 2 * layer.k.packed.encoded * 24 // 2  # 4-bit codes, two a byte
        scales = 2 * layer.k.packed.encoded * (24 // 8) * 2 * 2  # scale and zero point, float16
        positions = 2 * 50 * 4
        assert layer.nbytes() == codes + scales + 2 * 4 * 8 * 32 * 8 + positions
    detach(model)
    nbytes = {}
    for name, spec in (("separate", lowrank(8, value_rank=16)), ("joint", joint(24))):
        attach(model, spec)
        nbytes[name] = decode(model, ids, spec, [20])[1].nbytes()
        detach(model)
    assert nbytes["joint"] == nbytes["separate"]  # (at the separate latents' rank total: the same bytes)


class JointLatentProjection(torch.nn.Module):
    """k_proj (`half=0`) or v_proj (`half=1`) of a model whose [k, v] pass through the latent
    fp16([k, v] P) Q, keys first: what the joint view must compute, written out on its own."""

    def __init__(self, k_proj, v_proj, factors, half):
        super().__init__()
        self.k_proj, self.v_proj, self.half = k_proj, v_proj, half
        self.down, self.up = factors.down[0].detach().double(), factors.up[0].detach().double()

    def forward(self, x):
        latent = (torch.cat([self.k_proj(x), self.v_proj(x)], -1) @ self.down).half().double()
        return (latent @ self.up).chunk(2, -1)[self.half]


def test_the_joint_view_stacks_keys_before_values_like_its_svd_start():
    """Every compressed token's [k, v] (keys first, like the SVD start's [W_k; W_v]) becomes its latent's
    reconstruction fp16([k, v] P) Q: a view that stacked the values first would project them onto the
    keys' directions (parity cannot see it, the cache would make the same mistake)."""
    model = build("llama")
    spec = KVSpec(key={**RAW, "rank": 24}, value=None, joint_kv=True, residual=0, placement="pre_rope")
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    _, trained_view = training_views(model, ids, spec)
    factors = [getattr(layer.self_attn, CODEC_STATE)["key"] for layer in model.model.layers]
    detach(model)
    for layer, state in zip(model.model.layers, factors):
        k_proj, v_proj = layer.self_attn.k_proj, layer.self_attn.v_proj
        layer.self_attn.k_proj = JointLatentProjection(k_proj, v_proj, state, half=0)
        layer.self_attn.v_proj = JointLatentProjection(k_proj, v_proj, state, half=1)
    with torch.no_grad():
        torch.testing.assert_close(trained_view, model(ids, use_cache=False).logits, **TOL)


def test_a_joint_latent_trains_calibrates_and_reloads(tmp_path):
    """A training step moves the joint factors, the cache decodes with them, left-padded rows decode as
    trained, and the state reloads; calibration sets the principal directions of [K before RoPE, V]."""
    model = build("qwen2")
    spec = joint(24)
    attach(model, spec)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    with torch.no_grad():
        for f in (m for m in model.modules() if isinstance(m, LowRankFactors)):
            assert f.down.grad.abs().sum() > 0 and f.up.grad.abs().sum() > 0
            f.down -= 0.5 * f.down.grad
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    _, trained_view = training_views(model, ids, spec, attention_mask=mask, position_ids=positions)
    steps, cache = [], None
    from kvtrain import QuantizedKVCache
    cache = QuantizedKVCache(spec)
    with torch.no_grad():
        steps.append(model(ids[:, :15], attention_mask=mask[:, :15], position_ids=positions[:, :15],
                           past_key_values=cache).logits)
        for t in range(15, 40):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                               past_key_values=cache).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], trained_view[real], **TOL)
    saved = codec_state_dict(model)
    detach(model)
    spec.save(tmp_path)
    save_file(saved, str(tmp_path / "kv_codec_state.safetensors"))
    attach(model, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(codec_state_dict(model).values(), saved.values()))
    detach(model)
    calibrated = KVSpec(key={**RAW, "rank": 8}, value=None, joint_kv=True, residual=0, placement="pre_rope")
    outputs = []
    attention = model.model.layers[0].self_attn
    hooks = [getattr(attention, p).register_forward_hook(lambda m, i, o: outputs.append(o.detach())) for p in ("k_proj", "v_proj")]
    rows = calibrate(model, calibrated, ids.split(1), progress=False)
    for hook in hooks:
        hook.remove()
    both = torch.cat([torch.cat(outputs[i:i + 2], -1).flatten(0, 1) for i in (0, 2)])  # (tokens, 128): [k, v]
    eigenvalues = torch.linalg.eigvalsh(both.T @ both)
    row = next(r for r in rows if r["layer"] == 0)
    assert row["tensor"] == "key" and row["values"] == both.numel()
    assert row["error_after"] == pytest.approx(float(eigenvalues[:-8].sum() / eigenvalues.sum()), rel=1e-6)
    detach(model)


def test_joint_latent_settings_are_checked():
    with pytest.raises(ValueError, match="joint_kv=True stores K and V as one low-rank latent: the key policy must set rank"):
        KVSpec(key=RAW, value=None, joint_kv=True)
    with pytest.raises(ValueError, match="the key policy's latent holds the values too, so value must be None"):
        KVSpec(key={**RAW, "rank": 8}, joint_kv=True)
    with pytest.raises(ValueError, match="latent_heads must be 0, got 1"):
        KVSpec(key={**RAW, "rank": 8, "latent_heads": 1}, value=None, joint_kv=True)
    with pytest.raises(ValueError, match="joint_kv must be True or False, got 'yes'"):
        KVSpec(key={**RAW, "rank": 8}, value=None, joint_kv="yes")
    four_bit = joint(8, codec="affine", bits=2, granularity="per_token(8)").with_bits(4)  # (bits=4 on the callback)
    assert four_bit.key.bits == 4 and four_bit.value is None and four_bit.joint_kv
    with pytest.raises(ValueError, match="bits=4 sets the bits of K and V, but this spec keeps V in full precision"):
        KVSpec(key=dict(bits=2), value=None).with_bits(4)
    model = build("llama")
    model.model.layers[0].self_attn.v_proj = torch.nn.Linear(128, 32, bias=False).double()
    with pytest.raises(ValueError, match=r"key and value projections differ in shape \(\(64, 128\) vs \(32, 128\)\)"):
        attach(model, joint(8))
