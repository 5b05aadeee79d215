"""RotateKV's channel reordering (issue 12): the rotated channels of each group of heads handed to the
codec sorted by their calibrated mean. Parity on every architecture and both placements runs from the
registry (tests/test_kv_codecs.py, affine's grouped-rotation example)."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from test_kv_parity import TOL, build, decode, training_views

from kvtrain.kv import KVSpec, TensorPolicy, attach, detach
from kvtrain.kv.attention import CODEC_STATE, codec_state_dict, load_codec_state
from kvtrain.kv.calibrate import calibrate
from kvtrain.kv.codecs.reorder import ChannelOrder

ROTATEKV = dict(bits=2, granularity="per_token(4)", rotation="hadamard", rotation_heads=0, reorder_channels=True)


def rotatekv(placement: str = "pre_rope", residual: int = 8) -> KVSpec:
    """RotateKV's keys (grouped Hadamard, reordered, 2-bit per-token groups), values in full precision."""
    return KVSpec(key=ROTATEKV, value=None, residual=residual, placement=placement)


def test_the_order_sorts_the_channel_means_by_hand():
    """Two heads of 4 rotated channels with means [3, -1, 0, 2 | 5, -2, 1, 4]: sorted, channels
    [5, 1, 2, 6, 3, 0, 7, 4]. The means' squared deviations sum to 42 about their mean 1.5; inside the
    heads 10 + 30 = 40 before (heads [3, -1, 0, 2], [5, -2, 1, 4]) and 5 + 5 = 10 after ([-2, -1, 0, 1],
    [2, 3, 4, 5])."""
    order = ChannelOrder(groups=1, width=8, head_dim=4)
    assert order.order.tolist() == [list(range(8))]  # the identity until calibrated
    order.start_observing()
    means = torch.tensor([3.0, -1, 0, 2, 5, -2, 1, 4])
    noise = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1) * torch.arange(8.0)  # (cancels over the two tokens)
    order.observe(means.view(1, 1, 1, 8) + noise)
    order.observe(means.view(1, 1, 1, 8).expand(3, 1, 2, 8))
    row = order.fit()
    assert order.order.tolist() == [[5, 1, 2, 6, 3, 0, 7, 4]] and row["values"] == 8 * 8
    assert row["error_before"] == pytest.approx(40 / 42) and row["error_after"] == pytest.approx(10 / 42)


def test_encoding_is_the_inner_codec_on_the_rotated_channels_in_order():
    """Two heads of 4, rotated together: the codec quantizes y = (x_0 | x_1) H_8 / sqrt(8) with its channels
    taken in the order, then puts them back and rotates back (H from scipy)."""
    codec = TensorPolicy(**ROTATEKV).codec_at(0)
    state = codec.make_state(4, kv_heads=2)
    state.order.copy_(torch.tensor([[6, 0, 3, 5, 1, 7, 2, 4]]))
    bound = codec.bound(state)
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = torch.tensor(scipy.linalg.hadamard(8), dtype=torch.float64) / math.sqrt(8)
    y = x.transpose(1, 2).reshape(2, 3, 8) @ h  # (B, n, both heads' channels)
    quantize = bound.inner.inner  # the affine codec, per token in groups of 4 (one group per head here)
    order = state.order[0]
    q = quantize.decode(quantize.encode(y[..., order].unflatten(-1, (2, 4)).transpose(1, 2)))
    back = torch.empty_like(y)
    back[..., order] = q.transpose(1, 2).reshape(2, 3, 8)
    expected = (back @ h.T).unflatten(-1, (2, 4)).transpose(1, 2)
    torch.testing.assert_close(bound.decode(bound.encode(x)), expected, rtol=0, atol=1e-12)
    x.requires_grad_(True)
    simulated = bound.simulate(x)
    assert torch.equal(simulated.detach(), bound.decode(bound.encode(x.detach())))
    simulated.sum().backward()  # (straight through the quantizer: the permutations and rotations cancel)
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=0, atol=1e-12)


def test_a_fitted_order_groups_channels_of_equal_offset():
    """Rotated channels with offsets +-10 alternating (and small noise): every per-token group of 4 spans
    both offsets until the order is fitted, then each holds one offset and the 2-bit error falls ~30x."""
    codec = TensorPolicy(**ROTATEKV).codec_at(0)
    state = codec.make_state(4, kv_heads=2)
    bound = codec.bound(state)
    gen = torch.Generator().manual_seed(1)
    rotated = torch.tensor([10.0, -10.0] * 4) + 0.5 * torch.randn(1, 64, 8, generator=gen, dtype=torch.float64)
    h = torch.tensor(scipy.linalg.hadamard(8), dtype=torch.float64) / math.sqrt(8)
    x = (rotated @ h.T).unflatten(-1, (2, 4)).transpose(1, 2)  # the keys whose rotation that is

    def error() -> float:
        return float((bound.decode(bound.encode(x)) - x).square().mean())

    before = error()
    state.start_observing()
    bound.simulate(x)  # (observing: passes x through)
    state.fit()
    state.observed = None
    assert sorted(state.order[0, :4].tolist()) == [1, 3, 5, 7] and sorted(state.order[0, 4:].tolist()) == [0, 2, 4, 6]
    assert error() < before / 30


def test_calibration_fits_the_orders_and_the_cache_decodes_as_trained():
    """On a tiny model (2 KV heads of 32, rotated together) in both placements: calibration makes each
    layer's order non-trivial and lowers the spread of the channel means inside the heads; the view and
    the cache then agree to float64 tolerance; the order is saved and reloaded with the codec state."""
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    for placement in ("post_rope", "pre_rope"):
        model = build("llama")
        spec = rotatekv(placement)
        rows = calibrate(model, spec, [ids], progress=False)
        assert {r["fit"] for r in rows} == {"channel order"} and len(rows) == len(model.model.layers)
        assert all(r["error_after"] < r["error_before"] for r in rows), placement
        order = getattr(model.model.layers[0].self_attn, CODEC_STATE)["key"].order
        assert order.shape == (1, 64) and order.tolist() != [list(range(64))]
        assert sorted(order[0].tolist()) == list(range(64))
        _, trained_view = training_views(model, ids, spec)
        decoded, _ = decode(model, ids, spec, [17])
        torch.testing.assert_close(decoded, trained_view, **TOL)
        saved = codec_state_dict(model)
        detach(model)
        assert any(name.endswith("key.order") for name in saved)
        fresh = build("llama")
        attach(fresh, spec)  # a fresh model starts from the identity; the saved state gives the order back
        assert getattr(fresh.model.layers[0].self_attn, CODEC_STATE)["key"].order.tolist() == [list(range(64))]
        load_codec_state(fresh, saved)
        again, _ = decode(fresh, ids, spec, [17])
        assert torch.equal(again, decoded)


def test_a_learned_rotation_holds_the_order_beside_its_parameter():
    policy = TensorPolicy(**{**ROTATEKV, "rotation": "learned", "rotation_heads": 2})
    state = policy.codec_at(0).make_state(4, kv_heads=4)
    assert state.weight.shape == (8, 8) and isinstance(state.inner, ChannelOrder) and state.inner.order.shape == (2, 8)
    bound = policy.codec_at(0).bound(state)
    assert bound.inner.state is state.inner


def test_reordering_settings_are_checked():
    with pytest.raises(ValueError, match="reorder_channels orders the channels a rotation makes"):
        TensorPolicy(bits=2, granularity="per_token(4)", reorder_channels=True)
    with pytest.raises(ValueError, match="reorder_channels must be True or False, got 1"):
        TensorPolicy(**{**ROTATEKV, "reorder_channels": 1})
    with pytest.raises(ValueError, match="rotation_heads=3 must divide the layer's 4 KV heads"):
        TensorPolicy(**{**ROTATEKV, "rotation_heads": 3}).codec_at(0).make_state(4, 4)
    with pytest.raises(ValueError, match="channel order is read from the model it is attached to"):
        TensorPolicy(**ROTATEKV).codec_at(0).encode(torch.zeros(1, 2, 1, 4))
    nuq = KVSpec(key={**ROTATEKV, "codec": "nf", "learnable": True}, value=None, residual=0)
    with pytest.raises(ValueError, match="both codebooks and a channel order"):
        calibrate(build("llama"), nuq, [torch.zeros(1, 8, dtype=torch.long)], progress=False)
