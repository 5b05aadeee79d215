"""Quantization math against hand-computed values."""

import itertools

import pytest
import torch

from kvtrain.quant import dequantize, fake_quant, pack, packed_length, quantize, unpack


def roundtrip(x, bits, group, axis=-1, **kw):
    return dequantize(quantize(x, bits, group, axis, **kw))


def test_asymmetric_min_max_hand_values():
    x = torch.tensor([[-1.0, 0.1, 0.5, 2.0]])
    q = quantize(x, bits=2, group_size=4)
    # min -1, max 2, scale (2 - -1) / 3 = 1; codes round([0, 1.1, 1.5, 3]) with half-to-even
    assert q.codes.flatten().tolist() == [0, 1, 2, 3]
    assert q.scale.item() == pytest.approx(1.0) and q.zero.item() == pytest.approx(-1.0)
    assert dequantize(q).tolist() == [[-1.0, 0.0, 1.0, 2.0]]


def test_three_bit_hand_values():
    x = torch.tensor([0.0, 0.3, 0.7, 1.0])
    assert quantize(x, 3, 4).codes.flatten().tolist() == [0, 2, 5, 7]  # round([0, 2.1, 4.9, 7])
    torch.testing.assert_close(roundtrip(x, 3, 4), torch.tensor([0.0, 2 / 7, 5 / 7, 1.0]))


def test_symmetric_hand_values():
    x = torch.tensor([-7.0, -3.4, 0.2, 3.5])
    q = quantize(x, 4, 4, symmetric=True)  # scale 7 / (2^3 - 1) = 1, codes offset by 8
    assert q.codes.flatten().tolist() == [1, 5, 8, 12]  # round([1, 4.6, 8.2, 11.5])
    assert dequantize(q).tolist() == [-7.0, -3.0, 0.0, 4.0]


def test_groups_run_along_the_requested_axis():
    x = torch.tensor([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [3.0, 40.0]])  # (tokens=4, channels=2)
    q = quantize(x, 2, 4, axis=0)  # per-channel: one group of 4 tokens per channel
    assert q.scale.flatten().tolist() == pytest.approx([1.0, 10.0])
    assert q.zero.flatten().tolist() == pytest.approx([0.0, 10.0])
    torch.testing.assert_close(dequantize(q), x)
    by_token = quantize(x, 2, 2, axis=1)  # per-token: one group of 2 channels per token
    assert by_token.scale.shape == (4, 1, 1)
    torch.testing.assert_close(dequantize(by_token), x)  # 2 values per group are exact at any width


@pytest.mark.parametrize("value", [0.0, 3.7, -1e-3])
def test_constant_groups_round_trip_exactly(value):
    x = torch.full((3, 8), value)
    for bits in (1, 2, 4, 8):
        assert torch.equal(roundtrip(x, bits, 4), x)
        assert torch.equal(fake_quant(x, bits, 4), x)


def test_non_finite_input_raises_in_quantize():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(torch.tensor([1.0, float("nan"), 0.0, 2.0]), 2, 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(torch.tensor([1.0, float("inf"), 0.0, 2.0]), 2, 4)


def test_fake_quant_propagates_nan_to_its_group_only():
    out = fake_quant(torch.tensor([1.0, float("nan"), 0.0, 2.0, 1.0, 2.0]), 2, 3)
    assert out[:3].isnan().all() and out[3:].isfinite().all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="supports 1 to 8 bits, got 9"):
        quantize(torch.zeros(4), 9, 4)
    with pytest.raises(ValueError, match="symmetric quantization supports 2 to 8 bits, got 1"):
        quantize(torch.zeros(4), 1, 4, symmetric=True)
    with pytest.raises(ValueError, match="group_size=3 must divide the quantized axis"):
        quantize(torch.zeros(4), 2, 3)


@pytest.mark.parametrize("bits", range(1, 9))
def test_fake_quant_equals_quantize_dequantize_and_error_is_bounded(bits):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 64, 16)
    for axis, group in ((-2, 32), (-1, 16), (-1, 8)):
        fq = fake_quant(x, bits, group, axis)
        assert torch.equal(fq, roundtrip(x, bits, group, axis))
        q = quantize(x, bits, group, axis)
        # round to nearest: error at most half a step of its group
        step = q.scale.expand_as(q.codes.float())
        err = (x.movedim(axis, -1).reshape(q.codes.shape) - q.codes * q.scale - q.zero).abs()
        assert (err <= step / 2 + 1e-6).all()


def test_ste_gradient_is_identity_inside_the_clip_range_and_zero_outside():
    x = torch.tensor([-1.0, -0.2, 0.2, 1.0], requires_grad=True)
    fake_quant(x, 4, 4).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    x.grad = None
    fake_quant(x, 4, 4, clip_ratio=0.5).sum().backward()  # range [-0.5, 0.5]
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_packing_hand_values():
    # 2-bit codes [1, 2, 3, 0]: 1 | 2<<2 | 3<<4 | 0<<6 = 57
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [57]
    # 3-bit codes [7, 1, 4]: 7 | 1<<3 | 4<<6 = 271 -> bytes [15, 1]
    assert pack(torch.tensor([7, 1, 4]), 3).tolist() == [15, 1]
    # eight 4-bit 15s fill one int32 word with ones: -1 in two's complement
    assert pack(torch.full((8,), 15), 4, torch.int32).tolist() == [-1]
    assert packed_length(32, 2) == 8 and packed_length(32, 3) == 12 and packed_length(33, 2, torch.int32) == 3


@pytest.mark.parametrize("bits,n,word", itertools.product(range(1, 9), (1, 7, 32, 33), (torch.uint8, torch.int32)))
def test_pack_unpack_is_exact(bits, n, word):
    codes = torch.randint(0, 2**bits, (2, 3, n), generator=torch.Generator().manual_seed(bits * n))
    packed = pack(codes, bits, word)
    assert packed.dtype == word and packed.shape[-1] == packed_length(n, bits, word)
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


def kivi_reference_keys(k, group_size, bits):
    """KIVI's per-channel key quantizer, written from its description: (B, H, T, D) keys, groups of
    `group_size` tokens per channel, asymmetric min-max with the min as a float zero point,
    codes = round(clamp((k - min) / scale)), packed little-endian into int32 words along tokens."""
    B, H, T, D = k.shape
    g = k.reshape(B, H, T // group_size, group_size, D)
    mn, mx = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)
    scale = (mx - mn) / (2**bits - 1)
    codes = ((g - mn) / scale).clamp(0, 2**bits - 1).round().to(torch.int64).reshape(B, H, T, D)
    per_word = 32 // bits
    words = torch.zeros(B, H, T // per_word, D, dtype=torch.int64)
    for j in range(per_word):
        words |= codes[:, :, j::per_word] << (bits * j)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return codes, scale, mn, words


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_preset_quantizer_reproduces_kivi(bits):
    from kvtrain import KVQuantSpec

    spec = KVQuantSpec.preset(f"kivi{bits}")
    k = torch.randn(2, 2, 64, 32, generator=torch.Generator().manual_seed(bits))
    kq = spec.keys(0)
    q = quantize(k, kq.bits, kq.group_size, axis=2, symmetric=kq.symmetric, clip_ratio=kq.clip_ratio)
    codes, scale, mn, words = kivi_reference_keys(k, 32, bits)
    # ours: (B, H, D, groups, G) with tokens moved last
    ours = q.codes.reshape(2, 2, 32, 64).transpose(-1, -2)
    assert torch.equal(ours.long(), codes)
    torch.testing.assert_close(q.scale.squeeze(-1), scale.squeeze(-2).transpose(-1, -2), rtol=0, atol=0)
    torch.testing.assert_close(q.zero.squeeze(-1), mn.squeeze(-2).transpose(-1, -2), rtol=0, atol=0)
    # Packing 32/bits codes per int32 word along tokens gives KIVI's words (within one group here the
    # words of consecutive tokens follow each other, as in KIVI's layout).
    packed = pack(ours.transpose(-1, -2), bits, torch.int32).transpose(-1, -2)
    assert torch.equal(packed, words)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_byte_fast_path_lays_out_the_same_bit_stream_as_int32_words(bits):
    """pack/unpack into bytes take a code-wise fast path for widths dividing 8; int32 words take the
    general bit-stream path. On a little-endian machine both must give the same bytes."""
    codes = torch.randint(0, 2**bits, (3, 37), generator=torch.Generator().manual_seed(bits))
    as_bytes = pack(codes, bits)
    from_words = pack(codes, bits, torch.int32).view(torch.uint8)[..., : as_bytes.shape[-1]]
    assert torch.equal(as_bytes, from_words)
    assert torch.equal(unpack(as_bytes, bits, 37), codes.to(torch.uint8))


def test_scale_and_zero_are_stored_in_param_dtype_and_codes_use_the_stored_grid():
    # one group [0, 1/3, 2/3, 1.0001] at 2 bits: fp32 scale 1.0001/3 = 0.333366..; fp16 stores 0.33325195 (and
    # zero 0). The codes are chosen for the stored grid and dequantization uses it, in the input's dtype.
    x = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0001])
    q = quantize(x, 2, 4, param_dtype=torch.float16)
    assert q.scale.dtype == q.zero.dtype == torch.float16
    stored = torch.tensor(1.0001 / 3).half().float()
    assert q.scale.item() == stored.item() and stored.item() != pytest.approx(1.0001 / 3, abs=1e-5)
    assert q.codes.flatten().tolist() == [0, 1, 2, 3]
    assert dequantize(q).dtype == torch.float32
    assert torch.equal(dequantize(q), torch.arange(4.0) * stored)
    # fake_quant rounds the same way (train/decode parity), and differs from fp32-stored parameters
    assert torch.equal(fake_quant(x, 2, 4, param_dtype=torch.float16), dequantize(q))
    assert not torch.equal(fake_quant(x, 2, 4), dequantize(q))
    # out of fp16's range the stored parameters clamp to its largest finite value instead of overflowing
    big = quantize(torch.tensor([-1e6, 0.0, 1.0, 1e6]), 2, 4, param_dtype=torch.float16)
    assert torch.isfinite(big.scale).all() and big.zero.item() == -65504.0


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_int_gives_unpack_values_from_words_bytes_and_unaligned_slices(bits):
    """The cache's unpacking (int32 words where 1, 2 or 4-bit codes fill them) equals `unpack`, also on
    views a word reading cannot take (a row that is not whole words, a slice off word alignment)."""
    from kvtrain.quant.packing import unpack_int

    for n in (32, 16, 12, 7):
        codes = torch.randint(0, 2**bits, (2, 5, n), generator=torch.Generator().manual_seed(bits * n))
        words = pack(codes, bits)
        views = [(words, n), (words[:, 1:], n), (words.transpose(0, 1), n)]
        if 8 % bits == 0 and words.shape[-1] > 1:  # whole codes per byte: a row may start one byte in
            views.append((words[..., 1:], n - 8 // bits))
        for view, count in views:
            got = unpack_int(view, bits, count)
            assert got.dtype in (torch.int32, torch.uint8)
            assert torch.equal(got.to(torch.uint8), unpack(view, bits, count))
    # 2-bit codes [1, 2, 3, 0, 3, 3, 3, 3, 0, ...] in one int32 word: 57, 255, 0, 0
    words = torch.tensor([[57, 255, 0, 0]], dtype=torch.uint8)
    if bits == 2:
        assert unpack_int(words, 2, 16).tolist() == [[1, 2, 3, 0, 3, 3, 3, 3] + [0] * 8]


@pytest.mark.parametrize("axis,symmetric", [(2, False), (3, False), (3, True), (2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dequantize_into_a_slice_is_dequantize_bit_for_bit(axis, symmetric, dtype):
    """`dequantize(q, out=...)` (the cache writes its store straight into the tensor attention reads)
    computes the same values as `dequantize(q)`, with codes as uint8 or int32."""
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(axis)).to(dtype) * 4
    q = quantize(x, 3, 16, axis, symmetric, param_dtype=torch.float16)
    expected = dequantize(q)
    big = torch.full((2, 3, 80, 32), float("nan"), dtype=dtype)
    for codes in (q.codes, q.codes.to(torch.int32)):
        q.codes = codes
        out = dequantize(q, out=big[:, :, 5:69])
        assert out.data_ptr() == big[:, :, 5:69].data_ptr() and torch.equal(big[:, :, 5:69], expected)
    assert big[:, :, :5].isnan().all() and big[:, :, 69:].isnan().all()
    with pytest.raises(ValueError, match=r"dequantize writes \(2, 3, 64, 32\) .* got out \(2, 3, 64, 32\) torch.float16"):
        dequantize(q, out=torch.empty(2, 3, 64, 32, dtype=torch.float16))


def test_normal_float_levels_are_kvquants_quantiles():
    """KVQuant's NormalFloat signposts (simquant_module_quantizer.py), recomputed with scipy: the
    negative half from the 1/2 (1/32 + 1/30) quantile to the median, the positive half from the median
    to the symmetric quantile, each half scaled to reach -1 and 1, the shared 0 kept once."""
    from scipy.stats import norm

    from kvtrain.quant.codebook import normal_float_levels

    tail = 0.5 * (1 / 32 + 1 / 30)
    for bits in (2, 3, 4):
        half = 2 ** (bits - 1)
        negative = norm.ppf(tail + (0.5 - tail) / (half - 1) * torch.arange(half).double().numpy())
        positive = norm.ppf(list(0.5 + (0.5 - tail) / half * torch.arange(half).double().numpy()) + [1 - tail])
        expected = list(negative / -negative[0]) + list(positive[1:] / positive[-1])
        levels = normal_float_levels(bits)
        assert levels.shape == (2**bits,) and levels[0] == -1 and levels[half - 1] == 0 and levels[-1] == 1
        torch.testing.assert_close(levels, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # 2 bits by hand: ppf(0.5 + (0.5 - tail) / 2) / ppf(1 - tail) = 0.6245 / 1.8481
    assert normal_float_levels(2)[2].item() == pytest.approx(0.337915, abs=1e-6)
    with pytest.raises(ValueError, match="a NormalFloat codebook has 2 to 8 bits, got 1"):
        normal_float_levels(1)


def test_codebook_quantization_hand_values():
    """One group [0, 1, 2, 4] with the 4-level codebook [-1, 0, 0.25, 1]: offset 2 and half-range 2 map
    it to [-1, -0.5, 0, 1]; -0.5 is as near to -1 as to 0 and goes to the lower level, as KVQuant's argmin."""
    from kvtrain.quant.codebook import codebook_dequantize, codebook_quantize

    levels = torch.tensor([-1.0, 0.0, 0.25, 1.0], dtype=torch.float64)
    q = codebook_quantize(torch.tensor([[0.0, 1.0, 2.0, 4.0]]), levels, 4)
    assert q.codes.flatten().tolist() == [0, 0, 1, 3] and q.scale.item() == 2 and q.zero.item() == 2
    assert codebook_dequantize(q, levels).tolist() == [[0.0, 0.0, 2.0, 4.0]]
    # the midpoint of 0.25 and 1 is 0.625 (3.25 in the group [0, 4]): 3.2 -> 0.6 -> 0.25, 3.4 -> 0.7 -> 1
    q = codebook_quantize(torch.tensor([[0.0, 2.0, 3.2, 4.0], [0.0, 2.0, 3.4, 4.0]]), levels, 4)
    assert q.codes.tolist() == [[[0, 1, 2, 3]], [[0, 1, 3, 3]]]
    constant = codebook_quantize(torch.full((1, 4), 7.0), levels, 4)  # a constant group decodes exactly
    assert codebook_dequantize(constant, levels).tolist() == [[7.0] * 4]
