"""The Walsh-Hadamard transform in plain torch (CPU and GPU, differentiable through autograd).

`hadamard_transform(x)` is the unnormalized H_d x along the last axis (H_d H_d = d I), computed by the
iterative butterfly: at step h (1, 2, 4, ...) every pair (a, b) of entries h apart becomes
(a + b, a - b). This is the order of additions of vLLM's PyTorch path (`fast_hadamard_transform`),
so float32 results match it bit for bit.
"""

from __future__ import annotations

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
