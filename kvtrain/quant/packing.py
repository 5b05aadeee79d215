"""Bit packing of b-bit codes (1 <= b <= 8) into uint8 or int32 words, and exact unpacking.

Codes along the last axis are laid end to end as a little-endian bit stream (code i occupies bits
[i*b, (i+1)*b)), padded with zeros to a whole number of words. Every width packs densely, including
3, 5, 6 and 7 bits whose codes straddle word boundaries.
"""

from __future__ import annotations

import functools
import sys

import torch

from kvtrain.quant.uniform import check_bits

WORD_BITS = {torch.uint8: 8, torch.int32: 32}


def packed_length(n: int, bits: int, word: torch.dtype = torch.uint8) -> int:
    """Number of words that hold n codes of `bits` bits."""
    w = WORD_BITS[word]
    return (n * bits + w - 1) // w


def pack(codes: torch.Tensor, bits: int, word: torch.dtype = torch.uint8) -> torch.Tensor:
    """Pack codes (integers in [0, 2^bits)) along the last axis into words of dtype `word`."""
    check_bits(bits)
    if word not in WORD_BITS:
        raise ValueError(f"word must be torch.uint8 or torch.int32, got {word}")
    w, n = WORD_BITS[word], codes.shape[-1]
    if word == torch.uint8 and 8 % bits == 0:
        return _pack_bytes(codes, bits)
    shifts = torch.arange(bits, device=codes.device)
    stream = (codes.long().unsqueeze(-1) >> shifts) & 1  # (..., n, bits)
    stream = stream.flatten(-2)
    pad = packed_length(n, bits, word) * w - stream.shape[-1]
    stream = torch.nn.functional.pad(stream, (0, pad))
    words = (stream.unflatten(-1, (-1, w)) << torch.arange(w, device=codes.device)).sum(-1)
    if word == torch.int32:
        words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement of the top bit
    return words.to(word)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first n codes (uint8) of the bit stream in `words` (the inverse of `pack`)."""
    check_bits(bits)
    w = WORD_BITS[words.dtype]
    if words.shape[-1] != packed_length(n, bits, words.dtype):
        raise ValueError(f"{words.shape[-1]} words cannot hold exactly {n} codes of {bits} bits")
    if words.dtype == torch.uint8 and 8 % bits == 0:
        return _unpack_bytes(words, bits, n)
    stream = (words.long().unsqueeze(-1) >> torch.arange(w, device=words.device)) & 1
    stream = stream.flatten(-2)[..., : n * bits].unflatten(-1, (n, bits))
    return (stream << torch.arange(bits, device=words.device)).sum(-1).to(torch.uint8)


def unpack_int(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first n codes as integers for arithmetic that promotes them (dequantization): the same values
    as `unpack`, as int32 when rows of 1, 2 or 4-bit codes fill whole 32-bit words (shifting words on
    CPU is ~3x faster than shifting bytes, and the cache unpacks its whole store every decode step),
    the bytes themselves at 8 bits, uint8 from `unpack` otherwise. Do not write into the result."""
    if words.dtype == torch.uint8 and bits == 8 and words.shape[-1] == n:
        return words
    if bits in (1, 2, 4) and words.dtype == torch.uint8 and n * bits == words.shape[-1] * 8 and sys.byteorder == "little":
        try:
            as_words = words.view(torch.int32)  # needs whole words per row and word-aligned strides
        except RuntimeError:
            return unpack(words, bits, n)
        # little-endian: byte i of a word is its bits [8i, 8i + 8), so the codes come out in stream order
        shifted = as_words.unsqueeze(-1) >> _word_shifts(bits, words.device)
        return shifted.bitwise_and_(2**bits - 1).flatten(-2)
    return unpack(words, bits, n)


@functools.cache
def _word_shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


# Fast paths for 1, 2, 4 and 8 bits in bytes: whole codes per byte, so shift codes instead of bits
# (the same bit stream as the general path; the cache unpacks its whole store every decode step).


def _pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte, n = 8 // bits, codes.shape[-1]
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-n) % per_byte))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (padded.unflatten(-1, (-1, per_byte)) << shifts).sum(-1, dtype=torch.uint8)


def _unpack_bytes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)[..., :n]


TRIT_POWERS = (1, 3, 9, 27, 81)  # five base-3 digits per byte: 3^5 = 243 <= 256, 1.6 bits per code


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes (integers in {0, 1, 2}) along the last axis, five per byte (the row padded with
    zeros to a multiple of five): byte = sum of code_i * 3^i."""
    pad = -codes.shape[-1] % len(TRIT_POWERS)
    digits = torch.nn.functional.pad(codes.long(), (0, pad)).unflatten(-1, (-1, len(TRIT_POWERS)))
    return (digits * torch.tensor(TRIT_POWERS, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n ternary codes (uint8) of each row packed by `pack_trits`."""
    if packed.shape[-1] != -(-n // len(TRIT_POWERS)):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold exactly {n} ternary codes (5 per byte)")
    digits = packed.long().unsqueeze(-1) // torch.tensor(TRIT_POWERS, device=packed.device) % 3
    return digits.flatten(-2)[..., :n].to(torch.uint8)
