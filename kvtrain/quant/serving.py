"""The KV-cache formats of serving engines, as pure functions, transcribed from vLLM's kernels so
that a model trained against them here decodes there with the same stored values.

Per-token-head, symmetric (vLLM `--kv-cache-dtype int8_per_token_head` / `fp8_per_token_head`;
`vllm/v1/attention/ops/triton_quant_kv/_per_token_head.py`, `_reshape_cache_per_token_head_kernel`):

    x32   = x in float32
    scale = max(absmax over the head / QMAX, 1e-6)            float32, one per token and head
    q     = clamp(x32 * (1 / scale), QMIN, QMAX)               then stored into the cache dtype:
            int8: Triton's float -> int8 store truncates toward zero; fp8 e4m3: rounds to nearest
    x_hat = q * scale                                          (QMAX, QMIN) = (127, -128) / (448, -448)

Per-tensor fp8 (vLLM `--kv-cache-dtype fp8`, e4m3; `reshape_and_cache_flash`): q = e4m3(x32 / scale)
with the layer's k_scale / v_scale, 1.0 unless the checkpoint was calibrated; the conversion saturates
at +-448 (CUDA's __NV_SATFINITE), x_hat = q * scale.

Per-token-head int4 with a randomized Hadamard transform (vLLM `int4_per_token_head`, PR #40835;
`vllm/v1/attention/ops/int4_per_token_head.py`, `reshape_and_cache_int4`):

    r     = (H_d (x32 * s)) in the model's dtype, then float32   s: +-1 signs, Bernoulli(1/2) draws of a
                                                                   CPU generator seeded 0x9E3779B9
    scale = max((max r - min r) / 15, 1e-6)
    zp    = clamp(round(-min r / scale), 0, 15)                   round: half away from zero
    q     = clamp(round(r * (1 / scale) + zp), 0, 15)             two 4-bit codes per byte, even index in
                                                                   the low nibble
    stored scale: float32 whose 4 lowest mantissa bits hold zp    (the reader masks them off)
    x_hat = H_d((q - zp) * scale_masked) * s / d

Where their arithmetic is not plain float32: Triton contracts `r * inv + zp` into a fused multiply-add
on the GPU; we evaluate it in float64 and round once to float32. The CUDA Hadamard kernels (hadacore)
compute in bf16; their PyTorch path, which this follows, computes in float32.
"""

from __future__ import annotations

import torch

from kvtrain.quant.hadamard import hadamard_transform, random_signs
from kvtrain.quant.packing import pack, unpack

SCALE_FLOOR = 1e-6
INT8_RANGE = (-128.0, 127.0)
FP8_E4M3_RANGE = (-448.0, 448.0)
RHT_SEED = 0x9E3779B9


def absmax_quantize(x: torch.Tensor, low: float, high: float, store: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in `store`, float32 scale per row) of the symmetric per-token-head formats."""
    x32 = x.float()
    scale = (x32.abs().amax(-1, keepdim=True) / high).clamp_min(SCALE_FLOOR)
    q = (x32 * (1.0 / scale)).clamp(low, high)
    codes = q.trunc().to(store) if not store.is_floating_point else q.to(store)
    return codes, scale


def fp8_per_tensor_quantize(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    low, high = FP8_E4M3_RANGE
    return (x.float() / scale).clamp(low, high).to(torch.float8_e4m3fn)


def fp8_per_tensor_dequantize(codes: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


def absmax_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Triton's `(x + 0.5).to(int32)` / `(x - 0.5).to(int32)`: round half away from zero."""
    return torch.where(x >= 0, (x + 0.5).trunc(), (x - 0.5).trunc())


def rht_signs(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return random_signs(d, RHT_SEED).to(device)


def int4_rht_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, uint8 (..., d/2); float32 scale per row with the zero point in its low bits)."""
    d = x.shape[-1]
    r = hadamard_transform(x.float() * rht_signs(d, x.device)).to(x.dtype).float()
    low, high = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    scale = ((high - low) / 15.0).clamp_min(SCALE_FLOOR)
    zp = _round_half_away(-low / scale).clamp(0, 15)
    shifted = (r.double() * (1.0 / scale).double() + zp.double()).float()  # one rounding, as a fused multiply-add
    q = _round_half_away(shifted).clamp(0, 15)
    bits = (scale.view(torch.int32) & -16) | zp.to(torch.int32)
    return pack(q.to(torch.uint8), 4), bits.view(torch.float32)


def int4_rht_dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = packed.shape[-1] * 2
    bits = scale.view(torch.int32)
    zp, masked = (bits & 0xF).float(), (bits & -16).view(torch.float32)
    r = (unpack(packed, 4, d).float() - zp) * masked
    return (hadamard_transform(r) * rht_signs(d, r.device) / d).to(dtype)
