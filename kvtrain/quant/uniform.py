"""Group-wise uniform quantization: pure functions on tensors.

A tensor is cut into groups of `group_size` consecutive elements along `axis`; each group gets its
own scale and zero point. Asymmetric (the KIVI quantizer): scale = (max - min) / (2^b - 1), the
group minimum is kept as a float zero point, codes = round((x - min) / scale) in [0, 2^b - 1],
x_hat = codes * scale + min. Symmetric: scale = absmax / (2^(b-1) - 1), signed codes stored with an
offset of 2^(b-1) so every code is an unsigned b-bit integer.

Stored parameters: a real cache keeps each group's scale and zero point in 16 bits whatever the
activation dtype (KIVI keeps them in fp16). With `param_dtype`, both are rounded to that dtype
(clamped to its finite range) before the codes are chosen, so the codes are the best ones for the
parameters actually stored; `quantize` returns them in that dtype, and dequantization (here and in
`fake_quant`, identically) computes in the input's dtype. None keeps them in the input's dtype.

Degenerate groups are handled deliberately: a constant group (max == min, e.g. all zeros) gets
scale 0 and round-trips exactly. Non-finite inputs: `quantize` raises (a NaN would poison its whole
group silently); `fake_quant` does not check (the check would synchronize the GPU every step) and a
NaN or inf in a group makes that group's output NaN, which the training loop's NaN-loss check reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BITS, MAX_BITS = 1, 8


def check_bits(bits: int, symmetric: bool = False) -> None:
    low = 2 if symmetric else MIN_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= MAX_BITS:
        kind = "symmetric" if symmetric else "asymmetric"
        raise ValueError(f"{kind} quantization supports {low} to {MAX_BITS} bits, got {bits!r}")


@dataclass
class QuantizedTensor:
    """Codes (uint8, one per element, grouped layout) with per-group scale and zero point.

    `codes` has shape (*lead, n_groups, group_size) with the quantized axis moved last; `scale` and
    `zero` have shape (*lead, n_groups, 1).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    axis: int
    shape: torch.Size
    symmetric: bool
    dtype: torch.dtype = torch.float32  # of the quantized input: dequantization computes in it


def _grouped(x: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """(*lead, n_groups, group_size) view with `axis` moved last."""
    n = x.shape[axis]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size} must divide the quantized axis (size {n})")
    moved = x.movedim(axis, -1)
    return moved.reshape(*moved.shape[:-1], n // group_size, group_size)


def _ungrouped(g: torch.Tensor, axis: int, shape: torch.Size) -> torch.Tensor:
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(axis))
    return g.reshape(moved_shape).movedim(-1, axis)


def _params(g: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float,
            param_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """(scale, zero, lo, hi): each group's grid, as stored (rounded to `param_dtype`, held in g's
    dtype), and its clipping range (where the straight-through gradient passes)."""
    if symmetric:
        half = 2 ** (bits - 1)
        absmax = g.abs().amax(-1, keepdim=True) * clip_ratio
        scale, zero = absmax / (half - 1), torch.zeros_like(absmax)
        lo, hi = -half * scale, (half - 1) * scale
    else:
        lo, hi = g.aminmax(dim=-1, keepdim=True)
        if clip_ratio != 1:  # (the cache quantizes one token per step: every op counts)
            lo, hi = lo * clip_ratio, hi * clip_ratio
        scale, zero = (hi - lo) / (2**bits - 1), lo
    return _stored(scale, param_dtype), _stored(zero, param_dtype), lo, hi


def _stored(t: torch.Tensor, param_dtype: torch.dtype | None) -> torch.Tensor:
    """t as a cache storing it in `param_dtype` would give it back, in t's dtype."""
    if param_dtype is None or param_dtype == t.dtype:
        return t
    limit = torch.finfo(param_dtype).max
    return t.clamp(-limit, limit).to(param_dtype).to(t.dtype)


def _codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    safe = scale.masked_fill(scale == 0, 1)  # constant group: every code is 0
    shifted = (g - zero) / safe
    if symmetric:
        shifted = shifted + 2 ** (bits - 1)
    return shifted.round().clamp(0, 2**bits - 1)


def _dequant_grouped(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool):
    signed = codes - 2 ** (bits - 1) if symmetric else codes
    return signed * scale + zero


def quantize(
    x: torch.Tensor, bits: int, group_size: int, axis: int = -1, symmetric: bool = False, clip_ratio: float = 1.0,
    param_dtype: torch.dtype | None = None, check_finite: bool = True,
) -> QuantizedTensor:
    """Quantize `x` group-wise along `axis`; scale and zero point stored in `param_dtype` (default:
    x's dtype). Raises on NaN/inf input unless `check_finite=False` (a caller that checked already:
    the check synchronizes with the device)."""
    check_bits(bits, symmetric)
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor with NaN or inf values (check the model's activations)")
    axis = axis % x.dim()
    g = _grouped(x, group_size, axis)
    scale, zero, _, _ = _params(g, bits, symmetric, clip_ratio, param_dtype)
    codes = _codes(g, scale, zero, bits, symmetric).to(torch.uint8)
    store = param_dtype or x.dtype
    return QuantizedTensor(codes, scale.to(store), zero.to(store), bits, axis, x.shape, symmetric, x.dtype)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized values, computed in the input's dtype (as `fake_quant` does), then cast to `dtype`.

    `out` (q.shape, q's input dtype, any strides: e.g. a slice of the tensor a cache hands attention)
    receives them instead of a new tensor, with the same operations, so the values are the same bit
    for bit; `q.codes` may then be any integer dtype (`kvtrain.quant.packing.unpack_int`)."""
    if out is None:
        g = _dequant_grouped(q.codes.to(q.dtype), q.scale.to(q.dtype), q.zero.to(q.dtype), q.bits, q.symmetric)
        ungrouped = _ungrouped(g, q.axis, q.shape)
        return ungrouped if dtype is None else ungrouped.to(dtype)
    if out.dtype != q.dtype or out.shape != q.shape or dtype not in (None, q.dtype):
        raise ValueError(f"dequantize writes {tuple(q.shape)} {q.dtype} values, got out {tuple(out.shape)} {out.dtype}")
    grouped = out.movedim(q.axis, -1).unflatten(-1, q.codes.shape[-2:])  # a view of out in the codes' layout
    signed = q.codes.to(torch.int32) - 2 ** (q.bits - 1) if q.symmetric else q.codes
    torch.mul(signed, q.scale.to(q.dtype), out=grouped)  # exact integers times the scale, as codes.to(dtype) * scale
    grouped.add_(q.zero.to(q.dtype))
    return out


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: quantize-dequantize. Backward: straight-through inside each group's clipping range,
    zero outside it (only non-empty when clip_ratio < 1)."""

    @staticmethod
    def forward(ctx, x, bits, group_size, axis, symmetric, clip_ratio, param_dtype):
        g = _grouped(x, group_size, axis)
        scale, zero, lo, hi = _params(g, bits, symmetric, clip_ratio, param_dtype)
        out = _dequant_grouped(_codes(g, scale, zero, bits, symmetric), scale, zero, bits, symmetric)
        ctx.save_for_backward((g >= lo) & (g <= hi))
        ctx.axis, ctx.shape = axis, x.shape
        return _ungrouped(out, axis, x.shape)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        g = _grouped(grad, inside.shape[-1], ctx.axis)
        return _ungrouped(g * inside, ctx.axis, ctx.shape), None, None, None, None, None, None


def fake_quant(
    x: torch.Tensor, bits: int, group_size: int, axis: int = -1, symmetric: bool = False, clip_ratio: float = 1.0,
    param_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype, differentiable with a straight-through estimator.

    Equals `dequantize(quantize(x, ...))` exactly (same operations); see the module docstring for NaN/inf.
    """
    check_bits(bits, symmetric)
    return _FakeQuantSTE.apply(x, bits, group_size, axis % x.dim(), symmetric, clip_ratio, param_dtype)
