"""vLLM's per-token-head KV formats (kvtrain.quant.serving, kvtrain.kv.codecs.vllm) against scalar
transcriptions of its kernels (`_reshape_cache_per_token_head_kernel`, `_reshape_cache_int4_kernel`,
`single_rht`), written here element by element in numpy float32 / exact fractions, independent of the
vectorized code; the Hadamard transform against scipy's matrices."""

from fractions import Fraction

import numpy as np
import pytest
import scipy.linalg
import torch

from kvtrain.kv import KVSpec
from kvtrain.kv.codecs.vllm import Fp8PerTensor, Fp8PerTokenHead, Int4PerTokenHead, Int8PerTokenHead
from kvtrain.quant.hadamard import hadamard_transform
from kvtrain.quant.serving import int4_rht_dequantize, rht_signs

F32 = np.float32


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_hadamard_transform_is_scipys_matrix_and_differentiable(d):
    x = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    H = torch.from_numpy(scipy.linalg.hadamard(d)).double()
    y = hadamard_transform(x)
    torch.testing.assert_close(y, x @ H.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(y) / d, x, rtol=0, atol=1e-12)
    w = torch.randn(3, 5, d, dtype=torch.float64)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w @ H, rtol=0, atol=1e-12)


def test_hadamard_transform_refuses_a_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="must be a power of two for a Hadamard transform, got 48"):
        hadamard_transform(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="Foo's head_dim .*int4_per_token_head.* power of two .* got 48"):
        KVSpec(key=dict(codec="int4_per_token_head", bits=4, granularity="per_token_head"),
               value=dict(codec="int4_per_token_head", bits=4, granularity="per_token_head")).check_model(2, 48, "Foo")


def per_token_head_reference(head: np.ndarray, quant_max: float, quant_min: float, integer: bool):
    """One (token, head) of vLLM's per-token-head kernel, element by element in float32."""
    head = head.astype(F32)
    scale = max(F32(np.max(np.abs(head))) / F32(quant_max), F32(1e-6))
    inv = F32(1.0) / F32(scale)
    q = [min(max(F32(v) * inv, F32(quant_min)), F32(quant_max)) for v in head]
    return [float(np.trunc(v)) for v in q] if integer else q, F32(scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("codec", [Int8PerTokenHead(), Fp8PerTokenHead()])
def test_symmetric_formats_match_the_kernel_bit_for_bit(codec, dtype):
    x = (torch.randn(2, 3, 7, 16, generator=torch.Generator().manual_seed(0)) * 5).to(dtype)
    x[0, 0, 0] = 0  # an all-zero head: the 1e-6 scale floor
    payload = codec.encode(x)
    integer = codec.store[0] == torch.int8
    for index in np.ndindex(*x.shape[:3]):
        q, scale = per_token_head_reference(x[index].float().numpy(), codec.store[1][1], codec.store[1][0], integer)
        expected = torch.tensor(q, dtype=torch.float32)
        expected = expected if integer else expected.to(torch.float8_e4m3fn).float()  # the store rounds to e4m3
        assert torch.equal(payload.tensors["codes"][index].float(), expected), index
        assert payload.tensors["scale"][index].item() == scale
    decoded = codec.decode(payload)
    assert decoded.dtype == dtype
    torch.testing.assert_close(decoded, (payload.tensors["codes"].float() * payload.tensors["scale"]).to(dtype), rtol=0,
                               atol=0)


def fma_f32(a: F32, b: F32, c: F32) -> F32:
    """a * b + c rounded once to float32 (to nearest, ties to even), from the exact value."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    guess = F32(float(exact))
    candidates = [np.nextafter(guess, F32(-np.inf)), guess, np.nextafter(guess, F32(np.inf))]
    return min(candidates, key=lambda f: (abs(Fraction(float(f)) - exact), int(np.float32(f).view(np.int32)) & 1))


def round_half_away(v: F32) -> float:
    return float(np.trunc(v + F32(0.5)) if v >= 0 else np.trunc(v - F32(0.5)))


def int4_reference(rotated: np.ndarray):
    """One (token, head) of vLLM's `_reshape_cache_int4_kernel` on the rotated head: packed bytes, and
    the float32 scale's bits with the zero point in the 4 lowest."""
    r = rotated.astype(F32)
    lo, hi = F32(r.min()), F32(r.max())
    scale = max(F32(hi - lo) / F32(15.0), F32(1e-6))
    zp = min(max(round_half_away(F32(-lo) / scale), 0.0), 15.0)
    inv = F32(1.0) / scale
    q = [int(min(max(round_half_away(fma_f32(v, inv, F32(zp))), 0.0), 15.0)) for v in r]
    packed = [q[2 * i] | (q[2 * i + 1] << 4) for i in range(len(q) // 2)]
    bits = (int(np.array(scale, dtype=F32).view(np.int32)) & -16) | int(zp)
    return packed, bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_with_its_hadamard_rotation_matches_the_kernel_bit_for_bit(dtype):
    """Inputs on a 1/8 grid keep the rotation exact in float32 whatever the order of its additions, so the
    reference rotates with scipy's matrix and the signs drawn as vLLM's `_get_rht_signs` draws them."""
    d = 32
    x = (torch.randint(-32, 33, (2, 2, 5, d), generator=torch.Generator().manual_seed(1)) / 8).to(dtype)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(0x9E3779B9 + 0 * 0x517CC1B7)
    signs = (2.0 * torch.bernoulli(torch.full((d,), 0.5, device="cpu"), generator=generator) - 1.0).numpy()
    H = scipy.linalg.hadamard(d).astype(np.float64)
    payload = Int4PerTokenHead().encode(x)
    for index in np.ndindex(*x.shape[:3]):
        rotated = H @ (x[index].double().numpy() * signs)
        rotated = torch.tensor(rotated, dtype=torch.float32).to(dtype).float().numpy()  # the kernel reads the model dtype
        packed, bits = int4_reference(rotated)
        assert payload.tensors["codes"][index].tolist() == packed, index
        assert payload.tensors["scale"][index].view(torch.int32).item() == bits, index
    assert payload.nbytes() == 2 * 2 * 5 * (d // 2 + 4)


def test_int4_decodes_by_the_inverse_rotation_in_float64():
    """x_hat = H((q - zp) * masked scale) * signs / d, evaluated in float64 from the stored codes."""
    d = 64
    x = torch.randn(1, 2, 3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    payload = Int4PerTokenHead().encode(x)
    codes = payload.tensors["codes"]
    q = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2).double()
    bits = payload.tensors["scale"].view(torch.int32)
    zp, scale = (bits & 0xF).double(), (bits & -16).view(torch.float32).double()
    H = torch.from_numpy(scipy.linalg.hadamard(d)).double()
    expected = ((q - zp) * scale) @ H.T * rht_signs(d).double() / d
    decoded = Int4PerTokenHead().decode(payload)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)  # the codec computes in float32
    assert (decoded - x).abs().max() < 0.25 * x.abs().max()
    assert torch.equal(decoded, int4_rht_dequantize(codes, payload.tensors["scale"], torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_tensor_fp8_matches_the_kernel_bit_for_bit(dtype):
    """vLLM's `--kv-cache-dtype fp8` with its default scale 1.0: e4m3(x / 1.0), saturated at +-448."""
    x = (torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(3)) * 200).to(dtype)
    payload = Fp8PerTensor().encode(x)
    expected = [min(max(F32(v) / F32(1.0), F32(-448.0)), F32(448.0)) for v in x.float().flatten().numpy()]
    codes = torch.tensor(expected, dtype=torch.float32).to(torch.float8_e4m3fn)
    assert torch.equal(payload.tensors["codes"].flatten().view(torch.uint8), codes.view(torch.uint8))
    assert x.float().abs().max() > 448 and payload.tensors["codes"].float().abs().max() == 448  # saturated, no NaN
    assert list(payload.tensors) == ["codes"] and payload.nbytes() == x.numel()
