"""A CPU kernel for the cache's hottest loop: decoding its whole affine store every decode step.

In eager torch, decoding b-bit codes is four ops over the (B, H, T, D) tensor (shift, mask, scale,
add), each a pass of its own plus the parameters' dtype conversions; at a small model's decode step
that costs more than the model's attention. This kernel reads each packed byte once and writes each
value once, in place in the tensor attention reads, computing exactly what
`kvtrain.quant.uniform.dequantize` does: `(code - offset) * scale + zero` in the output's dtype, each
operation rounded on its own (compiled with -ffp-contract=off, so no fused multiply-add changes a bit;
tests/test_kv_codecs.py compares them bit for bit). It runs on one thread.

It is C without Python or torch headers, compiled on first use with the system's C compiler (about a
second) into `$KVTRAIN_HOME/kernels/`, and loaded with ctypes. Without a compiler, or with
`KVTRAIN_NATIVE=0`, `affine_decode` returns False and callers decode in torch: same values, slower.
Layouts it reads (the affine codec's payloads, `kvtrain.kv.codecs.affine`): per row of D codes
(one token of one head) ceil(D * bits / 8) bytes, little-endian bit stream; per-channel groups of G
tokens share a row of D scales and zero points, per-token groups of G channels one of each per group.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from kvtrain.home import cached_entry

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* Scales and zero points as stored: 0 the output's own type, 1 IEEE half, 2 bfloat16; both 16-bit
   formats convert to float exactly. */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (mant << 13);          /* inf, nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (mant << 13);   /* normal */
    else if (mant) {                                                  /* subnormal: renormalize */
        int e = -1;
        do { e++; mant <<= 1; } while (!(mant & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ff) << 13);
    } else bits = sign;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#define PARAMS(T)                                                                                      \
static void params_##T(const void *src, int kind, int64_t at, int64_t n, T *dst) {                     \
    for (int64_t k = 0; k < n; k++)                                                                    \
        dst[k] = kind == 0 ? ((const T *)src)[at + k]                                                  \
               : kind == 1 ? (T)half_to_float(((const uint16_t *)src)[at + k])                         \
                           : (T)bf16_to_float(((const uint16_t *)src)[at + k]);                        \
}
PARAMS(float)
PARAMS(double)

/* out[i, t, d] for i < bh (batch x heads), t < tokens, d < dim; rows of `out` are dim apart within a
   head and heads `out_head` apart. BITS divides 8. Each byte expands through a table to its PER codes
   (minus the symmetric offset: exact small integers), then one vectorizable pass scales and shifts. */
#define DECODE(NAME, T, BITS)                                                                          \
void NAME(const uint8_t *codes, const void *scale, const void *zero, int kind, T *out, int64_t bh,     \
          int64_t tokens, int64_t dim, int64_t group, int per_channel, int symmetric,                  \
          int64_t out_head) {                                                                          \
    enum { PER = 8 / BITS };                                                                           \
    const int64_t row_bytes = (dim * BITS + 7) / 8, n_params = per_channel ? dim : dim / group;        \
    const T offset = symmetric ? (T)(1 << (BITS - 1)) : (T)0;                                          \
    T table[256 * PER], c[row_bytes * PER], s[n_params], z[n_params];                                  \
    for (int b = 0; b < 256; b++)                                                                      \
        for (int k = 0; k < PER; k++)                                                                  \
            table[b * PER + k] = (T)((b >> (k * BITS)) & ((1 << BITS) - 1)) - offset;                 \
    for (int64_t i = 0; i < bh; i++) {                                                                 \
        for (int64_t t = 0; t < tokens; t++) {                                                         \
            if (!per_channel || t % group == 0) {                                                      \
                int64_t p = per_channel ? (i * (tokens / group) + t / group) * dim                     \
                                        : (i * tokens + t) * n_params;                                 \
                params_##T(scale, kind, p, n_params, s);                                               \
                params_##T(zero, kind, p, n_params, z);                                                \
            }                                                                                          \
            const uint8_t *row = codes + (i * tokens + t) * row_bytes;                                 \
            for (int64_t j = 0; j < row_bytes; j++)                                                    \
                memcpy(c + j * PER, table + row[j] * PER, PER * sizeof(T));                            \
            T *o = out + i * out_head + t * dim;                                                       \
            if (per_channel) {                                                                         \
                for (int64_t d = 0; d < dim; d++)                                                      \
                    o[d] = c[d] * s[d] + z[d];                                                         \
            } else {                                                                                   \
                for (int64_t g = 0; g < n_params; g++)                                                 \
                    for (int64_t d = g * group; d < (g + 1) * group; d++)                              \
                        o[d] = c[d] * s[g] + z[g];                                                     \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}

DECODE(decode_float_b1, float, 1)
DECODE(decode_float_b2, float, 2)
DECODE(decode_float_b4, float, 4)
DECODE(decode_float_b8, float, 8)
DECODE(decode_double_b1, double, 1)
DECODE(decode_double_b2, double, 2)
DECODE(decode_double_b4, double, 4)
DECODE(decode_double_b8, double, 8)
"""

FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
SINGLE_THREAD_LIMIT = 1 << 20  # values; above it, with several torch threads, torch decodes (not measured yet)
DTYPES = {torch.float32: "float", torch.float64: "double"}
PARAM_KINDS = {torch.float16: 1, torch.bfloat16: 2}  # 0: the output dtype


def _build(folder: Path, compiler: str) -> None:
    source = folder / "affine_decode.c"
    source.write_text(SOURCE)
    subprocess.run([compiler, *FLAGS, "-o", str(folder / "affine_decode.so"), str(source)], check=True,
                   capture_output=True, timeout=120)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no C compiler, compilation failed, or KVTRAIN_NATIVE=0)."""
    if os.environ.get("KVTRAIN_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    digest = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
    try:
        folder = cached_entry(f"kernels/affine-{digest}", lambda tmp: _build(tmp, compiler))
        library = ctypes.CDLL(str(folder / "affine_decode.so"))
    except (OSError, subprocess.SubprocessError) as e:
        stderr = getattr(e, "stderr", b"") or b""
        warnings.warn(f"kvtrain could not build its CPU decode kernel with {compiler} ({e}; {stderr.decode()[-500:]}); "
                      "the cache decodes in torch instead (same values, slower)", stacklevel=2)
        return None
    for dtype in DTYPES.values():
        for bits in (1, 2, 4, 8):
            fn = getattr(library, f"decode_{dtype}_b{bits}")
            fn.restype = None
            fn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4
                           + [ctypes.c_int] * 2 + [ctypes.c_int64])
    return library


def available() -> bool:
    return _library() is not None


def affine_decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                  per_channel: bool, symmetric: bool, out: torch.Tensor) -> bool:
    """Decode into `out` (B, H, T, D) if the kernel applies; False if the caller must decode in torch.

    codes: (B, H, ..., bytes) token-major rows, contiguous; scale, zero: contiguous, in out's dtype,
    float16 or bfloat16; per-channel: (B, H, T / group, 1, D), per-token: (B, H, T, D / group, 1).
    out: CPU float32 or float64, rows contiguous (any stride between the (B, H) planes' rows)."""
    library = _library()
    if (library is None or out.dtype not in DTYPES or out.device.type != "cpu" or bits not in (1, 2, 4, 8)
            or codes.dtype != torch.uint8 or not (codes.is_contiguous() and scale.is_contiguous() and zero.is_contiguous())
            or scale.dtype != zero.dtype or (scale.dtype != out.dtype and scale.dtype not in PARAM_KINDS)):
        return False
    if out.numel() > SINGLE_THREAD_LIMIT and torch.get_num_threads() > 1:
        return False  # the kernel runs on one thread; torch's ops spread a large store over its threads
    batch, heads, tokens, dim = out.shape
    if out.stride(3) != 1 or out.stride(2) != dim or out.stride(0) != heads * out.stride(1):
        return False
    if not per_channel and group * bits % 8:
        return False  # each group's codes start a new byte: not one bit stream per row
    params = batch * heads * (tokens // group * dim if per_channel else tokens * (dim // group))
    whole = tokens % group == 0 if per_channel else dim % group == 0
    if (not whole or codes.numel() != batch * heads * tokens * ((dim * bits + 7) // 8)
            or not scale.numel() == params == zero.numel()):
        raise ValueError(f"affine_decode: codes {tuple(codes.shape)} and parameters {tuple(scale.shape)} do not "
                         f"hold {tuple(out.shape)} values at {bits} bits in groups of {group}")
    fn = getattr(library, f"decode_{DTYPES[out.dtype]}_b{bits}")
    fn(codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), PARAM_KINDS.get(scale.dtype, 0), out.data_ptr(),
       batch * heads, tokens, dim, group, int(per_channel), int(symmetric), out.stride(1))
    return True
