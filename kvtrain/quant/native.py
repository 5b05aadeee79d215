"""A CPU kernel for the cache's hottest loop: decoding its whole affine store every decode step.

In eager torch, decoding b-bit codes is four ops over the (B, H, T, D) tensor (shift, mask, scale,
add), each a pass of its own plus the parameters' dtype conversions; at a small model's decode step
that costs more than the model's attention. This kernel reads each packed byte once and writes each
value once, in place in the tensor attention reads, computing exactly what
`kvtrain.quant.uniform.dequantize` does: `(code - offset) * scale + zero` in the output's dtype, each
operation rounded on its own (compiled with -ffp-contract=off, so no fused multiply-add changes a bit;
tests/test_kv_codecs.py compares them bit for bit). A codebook codec (`nf`) passes its levels, and a
value is then `levels[code] * scale + zero`, as `kvtrain.quant.codebook.codebook_dequantize` computes
it. It runs on one thread.

It is C without Python or torch headers, compiled on first use with the system's C compiler (about a
second) into `$KVTRAIN_HOME/kernels/`, and loaded with ctypes. Without a compiler, or with
`KVTRAIN_NATIVE=0`, `affine_decode` returns False and callers decode in torch: same values, slower.
Layouts it reads (the grouped codecs' payloads, `kvtrain.kv.codecs.affine.GroupedCodec`): per row of D codes
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
from typing import Any, Callable

import torch

from kvtrain.home import cached_entry

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* Scales and zero points as stored: 0 the output's own type, 1 IEEE half, 2 bfloat16; both 16-bit
   formats convert to float exactly. */
static inline float half_to_float(uint16_t h) {
    /* normals by rebiasing the exponent; subnormals by one exact float subtraction (F. Giesen) */
    uint32_t bits = (uint32_t)(h & 0x7fff) << 13, exp = bits & 0x0f800000, magic = 113u << 23;
    float f, m;
    bits += (uint32_t)(127 - 15) << 23;
    if (exp == 0x0f800000) bits += (uint32_t)(128 - 16) << 23;  /* inf, nan */
    else if (exp == 0) {                                          /* zero, subnormal */
        bits += 1u << 23;
        memcpy(&f, &bits, 4);
        memcpy(&m, &magic, 4);
        f -= m;
        memcpy(&bits, &f, 4);
    }
    bits |= (uint32_t)(h & 0x8000) << 16;
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

/* out[i, t, d] for i < bh (batch x heads), t < tokens, d < dim, from a store of `stored` >= tokens
   tokens per head; rows of `out` are dim apart within a head and heads `out_head` apart, and after each
   head's tokens come `then_tokens` rows of `then` (heads `then_head` apart), copied. BITS divides 8.
   Each byte expands through a table to its PER codes (minus the symmetric offset: exact small
   integers), or to their `levels` when a codebook is given (levels[code]), then one vectorizable pass
   scales and shifts. DIM > 0 compiles a head size in and PC
   the grouping (the loops unroll: ~1.5x faster at 32), DIM 0 takes the head size at run time. */
#define DECODE(T, BITS, DIM, PC)                                                                        \
static void decode_##T##_b##BITS##_d##DIM##_##PC(                                                      \
        const uint8_t *codes, const void *scale, const void *zero, int kind, T *out, int64_t bh,       \
        int64_t tokens, int64_t stored, int64_t dim_, int64_t group, int symmetric, const T *levels,   \
        int64_t out_head, const T *then, int64_t then_tokens, int64_t then_head) {                     \
    enum { PER = 8 / BITS, per_channel = PC };                                                         \
    const int64_t dim = DIM ? DIM : dim_;                                                              \
    const int64_t row_bytes = (dim * BITS + 7) / 8, n_params = per_channel ? dim : dim / group;        \
    const T offset = symmetric ? (T)(1 << (BITS - 1)) : (T)0;                                          \
    T table[256 * PER], c[row_bytes * PER], s[n_params], z[n_params];                                  \
    for (int b = 0; b < 256; b++)                                                                      \
        for (int k = 0; k < PER; k++)                                                                  \
            table[b * PER + k] = levels ? levels[(b >> (k * BITS)) & ((1 << BITS) - 1)]               \
                                        : (T)((b >> (k * BITS)) & ((1 << BITS) - 1)) - offset;         \
    for (int64_t i = 0; i < bh; i++) {                                                                 \
        for (int64_t t = 0; t < tokens; t++) {                                                         \
            if (!per_channel || t % group == 0) {                                                      \
                int64_t p = per_channel ? (i * (stored / group) + t / group) * dim                     \
                                        : (i * stored + t) * n_params;                                 \
                params_##T(scale, kind, p, n_params, s);                                               \
                params_##T(zero, kind, p, n_params, z);                                                \
            }                                                                                          \
            const uint8_t *row = codes + (i * stored + t) * row_bytes;                                 \
            for (int64_t j = 0; j < row_bytes; j++)                                                    \
                memcpy(c + j * PER, table + row[j] * PER, PER * sizeof(T));                            \
            T *o = out + i * out_head + t * dim;                                                       \
            if (per_channel) {                                                                         \
                for (int64_t d = 0; d < dim; d++)                                                      \
                    o[d] = c[d] * s[d] + z[d];                                                         \
            } else if (n_params == 1) {  /* one group per row: a broadcast the compiler vectorizes */ \
                for (int64_t d = 0; d < dim; d++)                                                      \
                    o[d] = c[d] * s[0] + z[0];                                                         \
            } else {                                                                                   \
                for (int64_t g = 0; g < n_params; g++)                                                 \
                    for (int64_t d = g * group; d < (g + 1) * group; d++)                              \
                        o[d] = c[d] * s[g] + z[g];                                                     \
            }                                                                                          \
        }                                                                                              \
        if (then_tokens)                                                                               \
            memcpy(out + i * out_head + tokens * dim, then + i * then_head, then_tokens * dim * sizeof(T)); \
    }                                                                                                  \
}

#define SIZES(T, BITS, PC)                                                                             \
DECODE(T, BITS, 0, PC) DECODE(T, BITS, 32, PC) DECODE(T, BITS, 64, PC) DECODE(T, BITS, 128, PC)

#define PICK(T, BITS, PC) (dim == 32 ? decode_##T##_b##BITS##_d32_##PC : dim == 64 ? decode_##T##_b##BITS##_d64_##PC \
                           : dim == 128 ? decode_##T##_b##BITS##_d128_##PC : decode_##T##_b##BITS##_d0_##PC)

#define ENTRY(T, BITS)                                                                                 \
SIZES(T, BITS, 0) SIZES(T, BITS, 1)                                                                    \
void decode_##T##_b##BITS(const uint8_t *codes, const void *scale, const void *zero, int kind, T *out, \
        int64_t bh, int64_t tokens, int64_t stored, int64_t dim, int64_t group, int per_channel,       \
        int symmetric, const T *levels, int64_t out_head, const T *then, int64_t then_tokens,          \
        int64_t then_head) {                                                                           \
    void (*fn)(const uint8_t *, const void *, const void *, int, T *, int64_t, int64_t, int64_t,       \
               int64_t, int64_t, int, const T *, int64_t, const T *, int64_t, int64_t) =               \
        per_channel ? PICK(T, BITS, 1) : PICK(T, BITS, 0);                                             \
    fn(codes, scale, zero, kind, out, bh, tokens, stored, dim, group, symmetric, levels, out_head,     \
       then, then_tokens, then_head);                                                                  \
}

ENTRY(float, 1)
ENTRY(float, 2)
ENTRY(float, 4)
ENTRY(float, 8)
ENTRY(double, 1)
ENTRY(double, 2)
ENTRY(double, 4)
ENTRY(double, 8)
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
    return library


@functools.cache
def _functions() -> dict[tuple[torch.dtype, int], Any]:
    """The entry points by (output dtype, bits); empty without the library."""
    library = _library()
    functions = {}
    for dtype, name in DTYPES.items() if library is not None else ():
        for bits in (1, 2, 4, 8):
            fn = getattr(library, f"decode_{name}_b{bits}")
            fn.restype = None
            fn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 5
                           + [ctypes.c_int] * 2 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
                           + [ctypes.c_int64] * 2)
            functions[dtype, bits] = fn
    return functions


def available() -> bool:
    return _library() is not None


def affine_decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                  per_channel: bool, symmetric: bool, out: torch.Tensor, stored: int | None = None,
                  then: torch.Tensor | None = None, levels: torch.Tensor | None = None) -> bool:
    """Decode the first tokens of a store of `stored` tokens per head (default: all of out's, less
    then's) into `out` (B, H, T, D), followed by `then` (B, H, m, D) when given, if the kernel applies;
    False if the caller must decode in torch. With `levels` (2^bits values in out's dtype, a codebook
    codec's), a value is levels[code] * scale + zero instead of code * scale + zero.

    codes: (B, H, ..., bytes) token-major rows, contiguous; scale, zero: contiguous, in out's dtype,
    float16 or bfloat16; per-channel: (B, H, stored / group, 1, D), per-token: (B, H, stored, D / group, 1).
    out: CPU float32 or float64, rows contiguous (any stride between the (B, H) planes' rows); then:
    out's dtype, laid out the same way."""
    tokens = out.shape[2] - (0 if then is None else then.shape[2])
    shape = (*codes.shape[:2], tokens if stored is None else stored, out.shape[3])  # the store's
    decode = affine_decoder(codes, scale, zero, bits, group, per_channel, symmetric, shape, out.dtype, levels)
    return decode is not None and decode(out, then)


def affine_decoder(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                   per_channel: bool, symmetric: bool, shape: tuple[int, ...], dtype: torch.dtype,
                   levels: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor | None], bool] | None:
    """`affine_decode` bound to one store of `shape` (B, H, stored, D) decoded into `dtype`: the store
    checked once, then `decode(out, then) -> bool` for any number of calls; None where the kernel does
    not apply. (The cache keeps it while its payload does not change: a decode step, which runs it for
    K and V of every layer, pays only for a few checks of out and then.)"""
    fn = _functions().get((dtype, bits))
    kind = 0 if scale.dtype == dtype else PARAM_KINDS.get(scale.dtype)
    if (fn is None or kind is None or not codes.is_cpu or codes.dtype != torch.uint8 or scale.dtype != zero.dtype
            or not (codes.is_contiguous() and scale.is_contiguous() and zero.is_contiguous())
            or (not per_channel and group * bits % 8)  # per-token groups must start a byte: one bit stream per row
            or (levels is not None and not (levels.dtype == dtype and levels.is_contiguous()))):
        return None
    if levels is not None and levels.numel() != 1 << bits:
        raise ValueError(f"affine_decode: {levels.numel()} levels for {bits}-bit codes (needs {1 << bits})")
    batch, heads, stored, dim = shape
    if not _holds(codes, scale, zero, bits, group, per_channel, shape):
        raise ValueError(_mismatch(codes, scale, bits, group, shape))
    store = (codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), kind)
    table = None if levels is None else levels.data_ptr()

    def decode(out: torch.Tensor, then: torch.Tensor | None = None) -> bool:
        if (out.dtype != dtype or not out.is_cpu or not _rows(out)
                or (then is not None and not (then.dtype == dtype and _rows(then)))):
            return False
        if out.numel() > SINGLE_THREAD_LIMIT and torch.get_num_threads() > 1:
            return False  # the kernel runs on one thread; torch's ops spread a large store over its threads
        tokens = out.shape[2] - (0 if then is None else then.shape[2])
        if (out.shape[:2] != (batch, heads) or out.shape[3] != dim or not 0 <= tokens <= stored
                or (then is not None and then.shape[:2] + then.shape[3:] != out.shape[:2] + out.shape[3:])):
            raise ValueError(_mismatch(codes, scale, bits, group, shape, out, then))
        fn(*store, out.data_ptr(), batch * heads, tokens, stored, dim, group, per_channel, symmetric, table,
           out.stride(1), *((None, 0, 0) if then is None else (then.data_ptr(), then.shape[2], then.stride(1))))
        return True

    decode.store = (codes, scale, zero, levels)  # the pointers it reads stay alive with it
    return decode


def _rows(t: torch.Tensor) -> bool:
    """(B, H, T, D) with contiguous rows and one stride between all (B, H) planes."""
    plane, head, row, one = t.stride()
    return one == 1 and row == t.shape[3] and plane == t.shape[1] * head


def _holds(codes, scale, zero, bits, group, per_channel, shape) -> bool:
    """The store's tensors hold `shape` (B, H, stored, D) values in whole groups: the kernel reads
    no further than the shapes say."""
    batch, heads, stored, dim = shape
    params = batch * heads * (stored // group * dim if per_channel else stored * (dim // group))
    whole = stored % group == 0 if per_channel else dim % group == 0
    return (whole and codes.numel() == batch * heads * stored * ((dim * bits + 7) // 8)
            and scale.numel() == params == zero.numel())


def _mismatch(codes, scale, bits, group, shape, out=None, then=None) -> str:
    return (f"affine_decode: codes {tuple(codes.shape)} and parameters {tuple(scale.shape)} do not hold "
            f"{tuple(shape)} values at {bits} bits in groups of {group}"
            + ("" if out is None else f" for {tuple(out.shape)}")
            + ("" if then is None else f" followed by {tuple(then.shape)}"))
