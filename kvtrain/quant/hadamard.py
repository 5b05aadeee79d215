"""The Walsh-Hadamard transform in plain torch (CPU and GPU, differentiable through autograd).

`hadamard_transform(x)` is the unnormalized H_d x along the last axis (H_d H_d = d I), computed by the
iterative butterfly: at step h (1, 2, 4, ...) every pair (a, b) of entries h apart becomes
(a + b, a - b). This is the order of additions of vLLM's PyTorch path (`fast_hadamard_transform`),
so float32 results match it bit for bit. `rotate` is the orthonormal, optionally sign-randomized,
block-diagonal version that KV rotations (QuaRot, RotateKV) apply to each head.
"""

from __future__ import annotations

import functools
import math

import torch


def check_power_of_two(d: int, what: str) -> None:
    if d < 1 or d & (d - 1):
        raise ValueError(f"{what} must be a power of two for a Hadamard transform, got {d}")


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """H_d x along the last axis (unnormalized: apply twice and divide by d to get x back)."""
    d = x.shape[-1]
    check_power_of_two(d, "the transformed size")
    h = 1
    while h < d:
        pairs = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(*x.shape[:-1], d)
        h *= 2
    return x


def random_signs(d: int, seed: int) -> torch.Tensor:
    """A deterministic +-1 vector of length d (float32): Bernoulli(1/2) draws of a CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return 2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=generator) - 1.0


def hadamard_block(d: int) -> int:
    """The largest power of two dividing d: the Hadamard block a vector of size d is rotated in
    (all of it when d is a power of two; 32 for a head of 96, as vLLM blocks sizes that are not)."""
    return d & -d


@functools.cache
def _block_signs(block: int, seed: int) -> torch.Tensor:
    return random_signs(block, seed)


def rotate(x: torch.Tensor, seed: int | None = None, inverse: bool = False) -> torch.Tensor:
    """R x along the last axis, R orthonormal: the Hadamard transform in blocks of `hadamard_block(d)`,
    scaled by 1/sqrt(block), after a seeded +-1 sign per block entry (R = H S / sqrt(b)) when `seed` is
    given; `inverse` applies R^T = S H / sqrt(b). Computed in x's dtype, differentiable."""
    d = x.shape[-1]
    block = hadamard_block(d)
    if block == 1:
        raise ValueError(f"a Hadamard rotation needs an even size, got {d}")
    blocks = x.reshape(*x.shape[:-1], d // block, block)
    signs = None if seed is None else _block_signs(block, seed).to(x.device, x.dtype)
    if signs is not None and not inverse:
        blocks = blocks * signs
    y = hadamard_transform(blocks) * (1 / math.sqrt(block))
    if signs is not None and inverse:
        y = y * signs
    return y.reshape(x.shape)


def cayley(weight: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix (I - A)^-1 (I + A) of the skew-symmetric A = W - W^T (the identity at W = 0),
    differentiable in W: a rotation that trains by unconstrained steps on W (SpinQuant's learned R2
    is one; its Cayley SGD updates R directly)."""
    a = weight - weight.T
    eye = torch.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device)
    return torch.linalg.solve(eye - a, eye + a)
