"""CPU kernels for the cache's hot loops: decoding its whole affine store every decode step, and
encoding the tokens that leave its window.

In eager torch, decoding b-bit codes is four ops over the (B, H, T, D) tensor (shift, mask, scale,
add), each a pass of its own plus the parameters' dtype conversions; at a small model's decode step
that costs more than the model's attention. This kernel reads each packed byte once and writes each
value once, in place in the tensor attention reads, computing exactly what
`kvtrain.quant.uniform.dequantize` does: `(code - offset) * scale + zero` in the output's dtype, each
operation rounded on its own (compiled with -ffp-contract=off, so no fused multiply-add changes a bit;
tests/test_kv_codecs.py compares them bit for bit). A codebook codec (`nf`) passes its levels, and a
value is then `levels[code] * scale + zero`, as `kvtrain.quant.codebook.codebook_dequantize` computes
it. It runs on one thread. A decode step (`affine_decoder(...).prepare_step`, `run_steps`) also copies
the window and the new token after the decoded tokens and into the new window, for K and V in one
call that first checks the new token finite, so the cache's step is one call into C per layer.
`affine_encode` quantizes and packs float32 as `kvtrain.quant.uniform.quantize` and packing do, bit
for bit (each float32 operation in the same order, the float16 / bfloat16 rounding of the stored
parameters by hand), ~5x faster than the ~25 torch ops it replaces.

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
#include <math.h>
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
   head's tokens come `then_tokens` rows of `then` (heads `then_head` apart) and `next_tokens` rows of
   `next`, copied, and also into `tail` (heads `tail_head` apart) when it is given: a decode step's new
   window in the same pass. BITS divides 8.
   Each byte expands through a table to its PER codes (minus the symmetric offset: exact small
   integers), or to their `levels` when a codebook is given (levels[code]), then one vectorizable pass
   scales and shifts. DIM > 0 compiles a head size in and PC
   the grouping (the loops unroll: ~1.5x faster at 32), DIM 0 takes the head size at run time. */
#define DECODE(T, BITS, DIM, PC)                                                                        \
static void decode_##T##_b##BITS##_d##DIM##_##PC(                                                      \
        const uint8_t *codes, const void *scale, const void *zero, int kind, T *out, int64_t bh,       \
        int64_t tokens, int64_t stored, int64_t dim_, int64_t group, int symmetric, const T *levels,   \
        int64_t out_head, const T *then, int64_t then_tokens, int64_t then_head, const T *next,        \
        int64_t next_tokens, int64_t next_head, T *tail, int64_t tail_head) {                          \
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
        T *window = out + i * out_head + tokens * dim;                                                 \
        if (then_tokens)                                                                               \
            memcpy(window, then + i * then_head, then_tokens * dim * sizeof(T));                       \
        if (next_tokens)                                                                               \
            memcpy(window + then_tokens * dim, next + i * next_head, next_tokens * dim * sizeof(T));   \
        if (tail)                                                                                      \
            memcpy(tail + i * tail_head, window, (then_tokens + next_tokens) * dim * sizeof(T));       \
    }                                                                                                  \
}

#define SIZES(T, BITS, PC)                                                                             \
DECODE(T, BITS, 0, PC) DECODE(T, BITS, 32, PC) DECODE(T, BITS, 64, PC) DECODE(T, BITS, 128, PC)

#define PICK(T, BITS, PC) (dim == 32 ? decode_##T##_b##BITS##_d32_##PC : dim == 64 ? decode_##T##_b##BITS##_d64_##PC \
                           : dim == 128 ? decode_##T##_b##BITS##_d128_##PC : decode_##T##_b##BITS##_d0_##PC)

/* One struct per call: ctypes converts each argument of a call on its own (~0.15 us apiece), so a
   decoder fills the store's fields once and a call only the output's. Every field is 8 bytes; `entry`
   is the decoder's own function below (its dtype and width), `wide` 1 for double. */
typedef struct decode_args decode_args;
struct decode_args {
    const uint8_t *codes; const void *scale, *zero; int64_t kind, bh, stored, dim, group, per_channel, symmetric;
    const void *levels, *out; int64_t tokens, out_head;
    const void *then; int64_t then_tokens, then_head;
    const void *next; int64_t next_tokens, next_head;
    const void *tail; int64_t tail_head;
    int (*entry)(const decode_args *); int64_t wide;
};

#define ENTRY(T, BITS)                                                                                 \
SIZES(T, BITS, 0) SIZES(T, BITS, 1)                                                                    \
int decode_##T##_b##BITS(const decode_args *a) {                                                       \
    const int64_t dim = a->dim;                                                                        \
    void (*fn)(const uint8_t *, const void *, const void *, int, T *, int64_t, int64_t, int64_t,       \
               int64_t, int64_t, int, const T *, int64_t, const T *, int64_t, int64_t, const T *,      \
               int64_t, int64_t, T *, int64_t) =                                                       \
        a->per_channel ? PICK(T, BITS, 1) : PICK(T, BITS, 0);                                          \
    fn(a->codes, a->scale, a->zero, (int)a->kind, (T *)a->out, a->bh, a->tokens, a->stored, dim,      \
       a->group, (int)a->symmetric, (const T *)a->levels, a->out_head, (const T *)a->then,            \
       a->then_tokens, a->then_head, (const T *)a->next, a->next_tokens, a->next_head, (T *)a->tail,  \
       a->tail_head);                                                                                  \
    return 0;                                                                                          \
}

ENTRY(float, 1)
ENTRY(float, 2)
ENTRY(float, 4)
ENTRY(float, 8)
ENTRY(double, 1)
ENTRY(double, 2)
ENTRY(double, 4)
ENTRY(double, 8)

static int next_finite(const decode_args *a) {
    for (int64_t i = 0; i < a->bh; i++)
        for (int64_t k = 0; k < a->next_tokens * a->dim; k++)
            if (!isfinite(a->wide ? ((const double *)a->next)[i * a->next_head + k]
                                  : (double)((const float *)a->next)[i * a->next_head + k]))
                return 0;
    return 1;
}

/* A layer's decode step: K's and V's prepared decodes (`b` may be NULL), once both new tokens are
   checked finite (1: a's are not, 2: b's; nothing is written then). */
int decode_steps(const decode_args *a, const decode_args *b) {
    if (!next_finite(a)) return 1;
    if (b && !next_finite(b)) return 2;
    a->entry(a);
    if (b) b->entry(b);
    return 0;
}

/* ---- encoding float32 (the cache's tokens as they leave its window), as kvtrain.quant.uniform's
   quantize computes it, operation by operation in float32: each group's scale (max - min) / (2^b - 1)
   and zero point min (symmetric: absmax / (2^(b-1) - 1) and 0), clipped by `clip`, clamped to the
   storage type's range and rounded to it (round to nearest even), then the codes
   round_half_even((x - zero) / scale) (+ 2^(b-1) symmetric) clamped to [0, 2^b - 1] for the stored
   parameters, packed as the decoder reads them. (Comparisons, not fminf/fmaxf: those are library
   calls without -ffast-math; the inputs are finite, so the two agree.) */

static inline uint16_t half_from_float(float f) {
    /* round to nearest even, subnormals and overflow included (M. Maratyszcza's FP16, as c10 does) */
    const float to_inf = 0x1.0p+112f, to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * to_inf) * to_zero, rounded;
    uint32_t w, shl1_w, sign, bias, bits;
    memcpy(&w, &f, 4);
    shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    bits = (bias >> 1) + 0x07800000u;
    memcpy(&rounded, &bits, 4);
    base = rounded + base;
    memcpy(&bits, &base, 4);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu)));
}

static inline uint16_t bf16_from_float(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* store v at dst[at] as `kind` keeps it; returns it as float again */
static inline float store_param(float v, int kind, void *dst, int64_t at) {
    if (kind == 1) {
        uint16_t h = half_from_float(v < -65504.0f ? -65504.0f : v > 65504.0f ? 65504.0f : v);
        ((uint16_t *)dst)[at] = h;
        return half_to_float(h);
    }
    if (kind == 2) {
        uint16_t h = bf16_from_float(v < -0x1.fep+127f ? -0x1.fep+127f : v > 0x1.fep+127f ? 0x1.fep+127f : v);
        ((uint16_t *)dst)[at] = h;
        return bf16_to_float(h);
    }
    ((float *)dst)[at] = v;
    return v;
}

/* one group's stored scale and zero point from its min, max and absmax */
static inline void group_params(float lo, float hi, float amax, int bits, int symmetric, float clip, int kind,
                                void *scale, void *zero, int64_t at, float *s, float *z) {
    float sc, zr;
    if (symmetric) {
        sc = (amax * clip) / (float)((1 << (bits - 1)) - 1), zr = 0.0f;
    } else {
        if (clip != 1.0f) lo = lo * clip, hi = hi * clip;
        sc = (hi - lo) / (float)((1 << bits) - 1), zr = lo;
    }
    *s = store_param(sc, kind, scale, at);
    *z = store_param(zr, kind, zero, at);
}

/* the codes of one row of dim values for its parameters (a zero scale divides by 1): clamped
   before rounding (the same codes: the bounds are integers), so that adding and subtracting 1.5 * 2^23
   rounds half to even without a libm call, and the loop vectorizes */
static inline void codes_of(const float *x, const float *s, const float *z, int64_t dim, int bits, int symmetric,
                            uint8_t *c) {
    const float top = (float)((1 << bits) - 1), offset = symmetric ? (float)(1 << (bits - 1)) : 0.0f;
    const float magic = 0x1.8p+23f;
    for (int64_t d = 0; d < dim; d++) {
        float q = (x[d] - z[d]) / (s[d] == 0.0f ? 1.0f : s[d]);
        q = q + offset;
        q = q < 0.0f ? 0.0f : q > top ? top : q;
        c[d] = (uint8_t)((q + magic) - magic);
    }
}

/* x: bh heads (x_head apart) of n tokens (x_row apart) of dim contiguous floats. codes: per token
   and head ceil(dim * bits / 8) bytes; scale, zero: per-channel (bh, n / group, dim), per-token
   (bh, n, dim / group). bits divides 8. */
void encode_float(const float *x, int64_t bh, int64_t n, int64_t dim, int64_t x_head, int64_t x_row, int64_t bits,
                  int64_t group, int64_t per_channel, int64_t symmetric, float clip, int64_t kind, uint8_t *codes,
                  void *scale, void *zero) {
    const int64_t row_bytes = (dim * bits + 7) / 8;
    float s[dim], z[dim];
    uint8_t c[dim];
    memset(codes, 0, (size_t)(bh * n * row_bytes));
    for (int64_t i = 0; i < bh; i++) {
        const float *head = x + i * x_head;
        for (int64_t t0 = 0; t0 < n; t0 += per_channel ? group : 1) {
            if (per_channel) {
                for (int64_t d = 0; d < dim; d++) {
                    float lo = head[t0 * x_row + d], hi = lo, amax = fabsf(lo);
                    for (int64_t t = t0 + 1; t < t0 + group; t++) {
                        float v = head[t * x_row + d];
                        lo = v < lo ? v : lo, hi = v > hi ? v : hi, amax = fabsf(v) > amax ? fabsf(v) : amax;
                    }
                    group_params(lo, hi, amax, (int)bits, (int)symmetric, clip, (int)kind, scale, zero,
                                 (i * (n / group) + t0 / group) * dim + d, s + d, z + d);
                }
            } else {
                for (int64_t g = 0; g < dim / group; g++) {
                    const float *v = head + t0 * x_row + g * group;
                    float lo = v[0], hi = v[0], amax = fabsf(v[0]);
                    for (int64_t k = 1; k < group; k++)
                        lo = v[k] < lo ? v[k] : lo, hi = v[k] > hi ? v[k] : hi,
                        amax = fabsf(v[k]) > amax ? fabsf(v[k]) : amax;
                    group_params(lo, hi, amax, (int)bits, (int)symmetric, clip, (int)kind, scale, zero,
                                 (i * n + t0) * (dim / group) + g, s + g * group, z + g * group);
                    for (int64_t k = 1; k < group; k++) s[g * group + k] = s[g * group], z[g * group + k] = z[g * group];
                }
            }
            for (int64_t t = t0; t < t0 + (per_channel ? group : 1); t++) {
                uint8_t *row = codes + (i * n + t) * row_bytes;
                codes_of(head + t * x_row, s, z, dim, (int)bits, (int)symmetric, c);
                for (int64_t d = 0; d < dim; d++)
                    row[d * bits / 8] |= (uint8_t)(c[d] << (d * bits % 8));
            }
        }
    }
}
"""

FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
SINGLE_THREAD_LIMIT = 1 << 20  # values; above it, with several torch threads, torch decodes (not measured yet)
DTYPES = {torch.float32: "float", torch.float64: "double"}
PARAM_KINDS = {torch.float16: 1, torch.bfloat16: 2}  # 0: the output dtype
_POINTERS = {"codes", "scale", "zero", "levels", "out", "then", "next", "tail", "entry"}


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


class _Args(ctypes.Structure):
    """The C `decode_args`."""

    _fields_ = [(name, ctypes.c_void_p if name in _POINTERS else ctypes.c_int64) for name in (
        "codes", "scale", "zero", "kind", "bh", "stored", "dim", "group", "per_channel", "symmetric", "levels", "out",
        "tokens", "out_head", "then", "then_tokens", "then_head", "next", "next_tokens", "next_head", "tail",
        "tail_head", "entry", "wide")]


@functools.cache
def _functions() -> dict[tuple[torch.dtype, int], Any]:
    """The entry points by (output dtype, bits), and "steps" (`decode_steps`); empty without the library."""
    library = _library()
    functions = {}
    for dtype, name in DTYPES.items() if library is not None else ():
        for bits in (1, 2, 4, 8):
            fn = getattr(library, f"decode_{name}_b{bits}")
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p]
            functions[dtype, bits] = fn
    if library is not None:
        functions["steps"] = library.decode_steps
        functions["steps"].restype, functions["steps"].argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]
        functions["encode"] = library.encode_float
        functions["encode"].restype = None
        functions["encode"].argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 9 + [ctypes.c_float, ctypes.c_int64]
                                        + [ctypes.c_void_p] * 3)
    return functions


def affine_encode(x: torch.Tensor, bits: int, group: int, per_channel: bool, symmetric: bool, clip: float,
                  param_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes, scale, zero) of x (B, H, n, D) in the affine codec's payload layout, bit for bit what
    `kvtrain.quant.uniform.quantize` and packing give; None where the kernel does not apply (it
    takes float32 on the CPU, 1, 2, 4 or 8 bits, parameters in float16, bfloat16 or float32).
    Layout: codes (B, H, n / G, G, bytes) per-channel, (B, H, n, D / G, G * bits / 8) per-token;
    scale and zero (B, H, n / G, 1, D) per-channel, (B, H, n, D / G, 1) per-token."""
    encode, kind = _functions().get("encode"), 0 if param_dtype == torch.float32 else PARAM_KINDS.get(param_dtype)
    batch, heads, n, dim = x.shape
    if (encode is None or kind is None or x.dtype != torch.float32 or not x.is_cpu or bits not in (1, 2, 4, 8)
            or (n % group if per_channel else dim % group or group * bits % 8) or not n
            or x.stride(3) != 1 or (batch > 1 and x.stride(0) != heads * x.stride(1))):
        return None
    if per_channel:
        codes = torch.empty(batch, heads, n // group, group, (dim * bits + 7) // 8, dtype=torch.uint8)
        scale = torch.empty(batch, heads, n // group, 1, dim, dtype=param_dtype)
    else:
        codes = torch.empty(batch, heads, n, dim // group, group * bits // 8, dtype=torch.uint8)
        scale = torch.empty(batch, heads, n, dim // group, 1, dtype=param_dtype)
    zero = torch.empty_like(scale)
    encode(x.data_ptr(), batch * heads, n, dim, x.stride(1), x.stride(2), bits, group, per_channel, symmetric, clip,
           kind, codes.data_ptr(), scale.data_ptr(), zero.data_ptr())
    return codes, scale, zero


def run_steps(keys: Any, values: Any | None = None) -> int:
    """Run a layer's prepared decode steps (`decoder.prepare_step`'s last item), K's and V's, in one
    call, once both new tokens are checked finite: 0, or 1 / 2 when K's / V's hold NaN or inf (then
    nothing is written)."""
    return _functions()["steps"](keys, values)


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
    checked once, then `decode(out, then) -> bool` for any number of calls, and
    `decode.prepare_step(...)` for `run_steps` (a decode step's view and new window in one pass); None
    where the kernel does not apply. (The cache keeps it while its payload does not change: a decode step,
    which runs it for K and V of every layer, pays only for a few checks of its tensors.)"""
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
    args = _Args(codes=codes.data_ptr(), scale=scale.data_ptr(), zero=zero.data_ptr(), kind=kind, bh=batch * heads,
                 stored=stored, dim=dim, group=group, per_channel=per_channel, symmetric=symmetric,
                 levels=None if levels is None else levels.data_ptr())
    args.entry, args.wide = ctypes.cast(fn, ctypes.c_void_p).value, dtype == torch.float64
    reference = ctypes.byref(args)
    call = functools.partial(fn, reference)

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
        args.out, args.tokens, args.out_head, args.tail, args.next, args.next_tokens = (
            out.data_ptr(), tokens, out.stride(1), None, None, 0)
        args.then, args.then_tokens, args.then_head = (None, 0, 0) if then is None else (
            then.data_ptr(), then.shape[2], then.stride(1))
        call()
        return True

    def prepare_step(tokens: int, window: torch.Tensor, skip: int, new: torch.Tensor, room: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """A decode step in one pass, prepared for `run_steps`: `out`, whose rows after the first `room`
        (left to the caller) get the store's first `tokens` decoded, then window[skip:] and `new`;
        `tail`, a new tensor that gets window[skip:] and new's tokens; and the kernel's arguments.
        None where the kernel does not apply. (One decoder prepares one step at a time.)"""
        kept, n = window.shape[2] - skip, new.shape[2]
        if not (new.dtype == dtype == window.dtype and new.is_cpu and window.is_cpu and _rows(new) and _rows(window)):
            return None
        if (new.shape[:2] != (batch, heads) or window.shape[:2] != (batch, heads) or new.shape[3] != dim
                or window.shape[3] != dim or not (0 <= tokens <= stored and 0 <= skip <= window.shape[2])):
            raise ValueError(_mismatch(codes, scale, bits, group, shape, window, new))
        rows = room + tokens + kept + n
        if batch * heads * rows * dim > SINGLE_THREAD_LIMIT and torch.get_num_threads() > 1:
            return None
        out, tail = new.new_empty(batch, heads, rows, dim), new.new_empty(batch, heads, kept + n, dim)
        size = new.element_size()
        args.out, args.tokens, args.out_head = out.data_ptr() + room * dim * size, tokens, rows * dim
        args.then, args.then_tokens, args.then_head = window.data_ptr() + skip * dim * size, kept, window.stride(1)
        args.next, args.next_tokens, args.next_head = new.data_ptr(), n, new.stride(1)
        args.tail, args.tail_head = tail.data_ptr(), (kept + n) * dim
        return out, tail, reference

    decode.prepare_step = prepare_step
    decode.store = (codes, scale, zero, levels, args)  # what its pointers read stays alive with it
    return decode


def _rows(t: torch.Tensor) -> bool:
    """(B, H, T, D) with contiguous rows (one token needs no row stride: a model's new K/V are often
    a transposed view) and one stride between all (B, H) planes."""
    if t.is_contiguous():  # (as a model's one new token usually is: size-1 dims ignore their strides)
        return True
    plane, head, row, one = t.stride()
    return one == 1 and (row == t.shape[3] or t.shape[2] == 1) and (plane == t.shape[1] * head or t.shape[0] == 1)


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
