"""RotateKV's channel reordering (`reorder_channels:` in a TensorPolicy, behind a rotation).

After the Hadamard rotation each channel of a token is a signed sum of all the group's channels, so a
channel's mean over tokens (its offset) survives the rotation and lands in some rotated channels and not
others. The inner codec quantizes each head's channels of a token together (per-token groups), so a group
mixing channels of very different offsets spends its range on the offsets. RotateKV sorts the rotated
channels of a layer by their signed mean over calibration text and hands the quantizer the sorted order,
so each quantization group holds channels of similar offset; decoding puts them back before undoing the
rotation. Here the order is per layer and group of `rotation_heads` heads (`ChannelOrder`, an int
buffer saved and exported with the model), the identity until `kvtrain calibrate` fits it, and the stage
stores nothing per token: its bytes are the inner codec's.

With each head rotated alone and a per-token group as wide as the head, a permutation inside the head
changes no group's range: the order matters for grouped heads (RotateKV) and groups narrower than a head.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from kvtrain.kv.codecs import Payload, Stage, build_codec, group_heads, ungroup_heads


class ChannelOrder(nn.Module):
    """The channel order of one layer's K or V (`order`: groups x width, a permutation per group of
    heads: the codec's channel i is the rotated channel order[i]), the inner codec's state beside it, and
    while `observed` is a dict (calibration) the sum of each rotated channel over the tokens seen."""

    def __init__(self, groups: int, width: int, head_dim: int, inner: nn.Module | None = None):
        super().__init__()
        self.register_buffer("order", torch.arange(width).repeat(groups, 1))
        self.head_dim = head_dim
        self.inner = inner
        self.observed: dict[str, Any] | None = None

    def start_observing(self) -> None:
        self.observed = {"sums": torch.zeros(self.order.shape, dtype=torch.float64), "tokens": 0}

    def observe(self, grouped: torch.Tensor) -> None:
        """grouped (B, groups, n, width): the rotated channels as the stage receives them."""
        self.observed["sums"] += grouped.detach().double().cpu().sum((0, 2))
        self.observed["tokens"] += grouped.shape[0] * grouped.shape[2]

    @torch.no_grad()
    def fit(self) -> dict[str, Any]:
        """`order` set to the channels sorted by their signed mean (RotateKV's argsort; stable, so equal
        means keep their order); the spread of the channel means inside each head before and after."""
        means = self.observed["sums"] / max(self.observed["tokens"], 1)
        before = self.spread_within_heads(means)
        self.order.copy_(means.argsort(dim=-1, stable=True))
        return {"values": self.observed["tokens"] * self.order.numel(), "error_before": before,
                "error_after": self.spread_within_heads(means)}

    def spread_within_heads(self, means: torch.Tensor) -> float:
        """The share of the channel means' variance (about each group's mean) left between the channels
        of one head in the current order: what a per-token group as wide as a head still has to span."""
        ordered = means.gather(-1, self.order.to(means.device)).unflatten(-1, (-1, self.head_dim))
        within = (ordered - ordered.mean(-1, keepdim=True)).square().sum()
        total = (means - means.mean(-1, keepdim=True)).square().sum()
        return float(within / total.clamp(min=1e-300))


@dataclass(frozen=True)
class Reordered(Stage):
    """`inner` on each group of `heads` heads' channels in the calibrated order (module docstring)."""

    heads: int = 1  # KV heads whose channels are ordered together (the rotation's groups); 0: all of a layer's
    state: ChannelOrder | None = field(default=None, compare=False, repr=False)

    def make_state(self, head_dim: int, kv_heads: int = 1, weight: torch.Tensor | None = None) -> ChannelOrder:
        per = self.heads or kv_heads
        if kv_heads % per:
            raise ValueError(f"rotation_heads={self.heads} must divide the layer's {kv_heads} KV heads")
        return ChannelOrder(kv_heads // per, per * head_dim, head_dim, self.inner.make_state(head_dim, kv_heads, weight))

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "Reordered":
        """The order of a rotated policy's channels (the rotation stage builds it, behind itself)."""
        return cls(build_codec(without_rotation(policy), bits), policy.rotation_heads)

    def bound(self, state: nn.Module) -> "Reordered":
        return self.holding(state)

    def _permuted(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if self.state is None:
            raise ValueError("a channel order is read from the model it is attached to: use the cache through the "
                             "attached model's forward (attach(model, spec) registers it)")
        grouped = group_heads(x, self.heads or x.shape[1])
        index = self.state.order.to(x.device)[None, :, None, :].expand(grouped.shape[0], -1, grouped.shape[2], -1)
        # (back: channel i goes to order[i], a scatter by the same index; no inverse permutation to compute)
        moved = torch.empty_like(grouped).scatter(-1, index, grouped) if inverse else grouped.gather(-1, index)
        return ungroup_heads(moved, x.shape[-1])

    def encode(self, x: torch.Tensor) -> Payload:
        return self.inner.encode(self._permuted(x))

    def decode(self, payload: Payload) -> torch.Tensor:
        return self._permuted(self.inner.decode(payload), inverse=True)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The inner codec's simulation in the order, put back (its gradient too). While calibration
        observes, x passes through (the full-precision model's statistics, as RotateKV calibrates)."""
        if self.state is not None and self.state.observed is not None:
            self.state.observe(group_heads(x, self.heads or x.shape[1]))
            return x
        return self._permuted(self.inner.simulate(self._permuted(x)), inverse=True)


def without_rotation(policy: Any) -> Any:
    """The policy of what a rotation stage (and its channel order) encodes with."""
    heads = {"rotation_heads": 1} if getattr(policy, "rotation_heads", 1) != 1 else {}
    order = {"reorder_channels": False} if getattr(policy, "reorder_channels", False) else {}
    return replace(policy, rotation="none", **heads, **order)
