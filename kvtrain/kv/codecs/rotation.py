"""A rotation stage in front of any codec: QuaRot's and RotateKV's orthogonal Hadamard rotation of
each head's K or V before quantization.

Outlier channels set the range of every group they fall in; an orthogonal rotation spreads them
over the head, so a per-token group's range shrinks toward the typical entry. The stage encodes
R x with the inner codec and decodes R^T of the inner decoding, so attention reads K and V in their
own basis: q.k and the attention output are unchanged by construction and no weight is touched (QuaRot
instead rotates the query with the same R and folds R into v_proj and o_proj, which saves R^T at
decode; the stored codes are the same). R is the orthonormal Hadamard transform in blocks of the
largest power of two dividing head_dim (`kvtrain.quant.hadamard.rotate`), after seeded random signs
for "random_hadamard". It stores nothing per token, so bytes are the inner codec's.

RotateKV's grouped-head rotation (`rotation_heads`): one Hadamard over the concatenated channels of
`heads` consecutive KV heads (0: all of a layer's), so an outlier channel of one head is spread over
the group; decoding undoes it exactly, so attention still reads each head's own K/V (RotateKV applies
it pre-RoPE: `placement: pre_rope`). Its channel reordering (`reorder_channels`,
`kvtrain.kv.codecs.reorder`) sits between the rotation and the inner codec.

"learned" (SpinQuant's trained R2, per layer and tensor): R = C H, with H the random Hadamard above and
C = (I - A)^-1 (I + A) the Cayley transform of a skew-symmetric A = W - W^T, W a trained parameter
(`LearnedRotation`, zero at the start, so training starts from the random Hadamard): orthogonal for any
W, so the rotation stays exactly undoable while the gradient through the inner codec's simulation moves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from kvtrain.kv.codecs import Payload, Stage, build_codec, group_heads, ungroup_heads
from kvtrain.kv.codecs.reorder import Reordered, without_rotation
from kvtrain.quant.hadamard import cayley, rotate

Rotation = Literal["none", "hadamard", "random_hadamard", "learned"]
ROTATIONS = ("none", "hadamard", "random_hadamard", "learned")


class LearnedRotation(nn.Module):
    """A learned rotation's parameter in one attention layer (W, its Cayley transform's generator),
    and the inner codec's own state when it has one."""

    def __init__(self, head_dim: int, inner: nn.Module | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(head_dim, head_dim))
        self.inner = inner


@dataclass(frozen=True)
class Rotated(Stage):
    """`inner` applied to R x (module docstring); `seed` picks the random signs of random_hadamard."""

    rotation: Rotation
    seed: int = 0
    heads: int = 1  # KV heads rotated together (RotateKV's grouped-head rotation); 0: all of a layer's
    state: LearnedRotation | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "Rotated":
        if policy.rotation not in ROTATIONS[1:]:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {policy.rotation!r}")
        reordered = getattr(policy, "reorder_channels", False)
        inner = Reordered.from_policy(policy, bits) if reordered else build_codec(without_rotation(policy), bits)
        return cls(inner, policy.rotation, policy.rotation_seed, getattr(policy, "rotation_heads", 1))

    def make_state(self, head_dim: int, kv_heads: int = 1, weight: torch.Tensor | None = None) -> nn.Module | None:
        if kv_heads % (self.heads or kv_heads):  # (attach asks every codec for its state: the model's heads, here)
            raise ValueError(f"rotation_heads={self.heads} must divide the layer's {kv_heads} KV heads")
        if self.rotation != "learned":
            return super().make_state(head_dim, kv_heads, weight)
        width = head_dim * (self.heads or kv_heads)
        return LearnedRotation(width, self.inner.make_state(head_dim, kv_heads, weight))

    def bound(self, state: nn.Module) -> "Rotated":
        if self.rotation != "learned":
            return super().bound(state)
        return self.holding(state)

    def _rotate(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """R x (R^T x) of each head, or of each group of `heads` heads' channels side by side."""
        if self.heads == 1:
            return self._rotate_rows(x, inverse)
        return ungroup_heads(self._rotate_rows(group_heads(x, self.heads or x.shape[1]), inverse), x.shape[-1])

    def _rotate_rows(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if self.rotation != "learned":
            return rotate(x, self.seed if self.rotation == "random_hadamard" else None, inverse)
        if self.state is None:
            raise ValueError("a learned rotation reads its parameter from the model it is attached to: use the cache "
                             "through the attached model's forward (attach(model, spec) registers it)")
        c = cayley(self.state.weight.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)
        if inverse:  # (C H)^T y = H^T C^T y: with row vectors, y C, then H^T
            return rotate(x @ c, self.seed, inverse=True)
        return rotate(x, self.seed) @ c.T

    def encode(self, x: torch.Tensor) -> Payload:
        return self.inner.encode(self._rotate(x))

    def decode(self, payload: Payload) -> torch.Tensor:
        return self._rotate(self.inner.decode(payload), inverse=True)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The inner codec's simulation between R and R^T: its gradient, rotated back."""
        return self._rotate(self.inner.simulate(self._rotate(x)), inverse=True)

    def check_model(self, head_dim: int, where: str, model_name: str) -> None:
        super().check_model(head_dim, where, model_name)
        if head_dim % 2:
            raise ValueError(f"a Hadamard rotation needs an even head_dim; {model_name} has head_dim={head_dim}")
