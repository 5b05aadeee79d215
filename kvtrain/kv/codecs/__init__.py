"""Codecs: what happens to a block of K or V (DESIGN.md, "The compression pipeline").

A codec turns a block of tokens of K or V, shaped (batch, kv_heads, tokens, head_dim) with a whole
number of `unit`s of tokens, into a `Payload` (what the cache stores) and back:

    encode(x) -> Payload      the cache calls it once per block, when the window rule compresses it
    decode(payload) -> x_hat  in x's dtype (`decode_into` writes it into the cache's output)
    simulate(x) -> x_hat      the training view: equal to decode(encode(x)) in the forward (bit for
                              bit: parity rests on it, tests/test_kv_codecs.py checks it for every
                              registered codec), with a straight-through or the codec's own gradient

Codecs register by name (`@register("affine")`); a spec names one per tensor (`TensorPolicy.codec`)
and `build_codec` makes it for a layer. Adding one is a file here and one import line below.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from kvtrain.kv.registry import registrar


@dataclass
class Payload:
    """The stored form of a block of K or V: its tensors (codes, scales, ...), each with its token
    axis (`token_dims`, for concatenation), and the (B, H, n, D) shape and dtype of the block."""

    tensors: dict[str, torch.Tensor]
    token_dims: dict[str, int]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def n(self) -> int:
        """Tokens held."""
        return self.shape[2]

    def nbytes(self) -> int:
        """The real storage: every tensor's elements times their size."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Payload":
        """`fn` applied to every tensor (select or reorder batch rows, move devices)."""
        tensors = {name: fn(t) for name, t in self.tensors.items()}
        batch = next(iter(tensors.values())).shape[0]
        return replace(self, tensors=tensors, shape=(batch, *self.shape[1:]))

    def head(self, n: int) -> "Payload":
        """The first n tokens (a whole number of the tensors' token-axis entries), as views."""
        if n == self.n:
            return self
        tensors = {name: t.narrow(self.token_dims[name], 0, n * t.shape[self.token_dims[name]] // self.n)
                   for name, t in self.tensors.items()}
        return Payload(tensors, self.token_dims, (*self.shape[:2], n, self.shape[3]), self.dtype)

    @staticmethod
    def cat(parts: list["Payload"]) -> "Payload":
        """Payloads of consecutive blocks as one."""
        first = parts[0]
        if len(parts) == 1:
            return first
        tensors = {name: torch.cat([p.tensors[name] for p in parts], dim) for name, dim in first.token_dims.items()}
        shape = (*first.shape[:2], sum(p.n for p in parts), first.shape[3])
        return replace(first, tensors=tensors, shape=shape)


class Codec(ABC):
    """The codec protocol (module docstring). Subclasses are frozen dataclasses of their settings."""

    name: ClassVar[str]
    # True for codecs whose `make_state` gives learnable state when the policy says `learnable`
    learnable_state: ClassVar[bool] = False
    # TensorPolicy fields of a few settings that the registry-driven tests run (parity on every
    # architecture, encode/decode round trips), so a new codec is tested without a new test
    examples: ClassVar[tuple[dict[str, Any], ...]]

    @property
    @abstractmethod
    def unit(self) -> int:
        """Tokens that are compressed together."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Payload:
        """x (B, H, n, D), n a multiple of `unit` and finite (the cache checks K/V as they arrive)."""

    @abstractmethod
    def decode(self, payload: Payload) -> torch.Tensor:
        """The block as stored, in the dtype it was encoded from."""

    def decode_into(self, payload: Payload, out: torch.Tensor, then: torch.Tensor | None = None) -> torch.Tensor:
        """The payload's first tokens decoded into `out` (a (B, H, n, D) view of the tensor the cache
        hands attention), bit for bit `decode`, followed by the m tokens of `then` (the cache's
        full-precision window) when given: n - m of the payload's tokens are decoded."""
        tokens = out.shape[-2] - (0 if then is None else then.shape[-2])
        self._decode_into(payload.head(tokens), out.narrow(-2, 0, tokens))
        if then is not None:
            out.narrow(-2, tokens, then.shape[-2]).copy_(then)
        return out

    def decoder(self, payload: Payload) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """`decode_into` bound to one payload: the cache makes it once per payload and calls it every
        decode step (a codec with a kernel checks the payload and prepares the kernel here, once, and
        the decoder may offer `prepare_step`, the cache's one-pass decode step: see `kvtrain.quant.native`)."""
        return functools.partial(self.decode_into, payload)

    def _decode_into(self, payload: Payload, out: torch.Tensor) -> None:
        """decode(payload) written into `out`; override to decode in place without the intermediate tensor."""
        out.copy_(self.decode(payload))

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) with a straight-through gradient (override for the codec's own)."""
        return _StraightThrough.apply(x, self)

    def check_model(self, head_dim: int, where: str, model_name: str) -> None:
        """Errors that need the model's head size (e.g. a group that does not divide it); `where`
        names the setting in the message."""

    def make_state(self, head_dim: int, kv_heads: int = 1, weight: torch.Tensor | None = None) -> nn.Module | None:
        """The codec's learnable state for one attention layer, initialized (None: it has none), for
        `kv_heads` heads of `head_dim`; `weight`: the projection that makes this tensor (k_proj's or
        v_proj's, kv_heads * head_dim rows) where the state starts from it (the low-rank stage).
        `attach` registers it in the model, so it trains, checkpoints and shards with the weights;
        the view and the cache both read it through `bound`."""
        return None

    def bound(self, state: nn.Module) -> "Codec":
        """This codec reading `state` (what make_state made, as trained); codecs with state hold it
        in a `state` field that equality ignores."""
        return replace(self, state=state)

    @classmethod
    @abstractmethod
    def from_policy(cls, policy: Any, bits: int) -> "Codec":
        """The codec a spec's `TensorPolicy` describes, at `bits` (the layer's bits)."""


@dataclass(frozen=True)
class Stage(Codec):
    """A codec in front of another (`inner`, built from the same policy without this stage): it
    transforms K or V before the inner codec encodes and undoes it after it decodes, and passes the
    inner codec's unit, learnable state and model checks through (DESIGN.md, "Stages")."""

    inner: Codec

    @property
    def unit(self) -> int:
        return self.inner.unit

    def make_state(self, head_dim: int, kv_heads: int = 1, weight: torch.Tensor | None = None) -> nn.Module | None:
        return self.inner.make_state(head_dim, kv_heads, weight)

    def bound(self, state: nn.Module) -> "Stage":
        return replace(self, inner=self.inner.bound(state))

    def holding(self, state: nn.Module) -> "Stage":
        """`bound` for a stage with state of its own: it reads `state`, and the inner codec the state
        `state.inner` holds for it (None: the inner codec has none)."""
        return replace(self, state=state, inner=self.inner if state.inner is None else self.inner.bound(state.inner))

    def check_model(self, head_dim: int, where: str, model_name: str) -> None:
        self.inner.check_model(head_dim, where, model_name)


def group_heads(x: torch.Tensor, per: int) -> torch.Tensor:
    """(B, H, n, D) -> (B, H / per, n, per * D): each group of `per` consecutive heads' channels side by
    side (what a grouped rotation, a channel order or a low-rank latent acts on)."""
    batch, heads, n, dim = x.shape
    if heads % per:
        raise ValueError(f"groups of {per} KV heads must divide the {heads} KV heads")
    return x.unflatten(1, (heads // per, per)).transpose(2, 3).reshape(batch, heads // per, n, per * dim)


def ungroup_heads(grouped: torch.Tensor, dim: int) -> torch.Tensor:
    """`group_heads` undone: (B, groups, n, per * dim) -> (B, groups * per, n, dim)."""
    batch, groups, n, width = grouped.shape
    per = width // dim
    return grouped.unflatten(-1, (per, dim)).transpose(2, 3).reshape(batch, groups * per, n, dim)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codec):
        return codec.decode(codec.encode(x))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


CODECS: dict[str, type[Codec]] = {}


register = registrar(CODECS, "codec", "TensorPolicy fields")


def build_codec(policy: Any, bits: int) -> Codec:
    """The registered codec `policy.codec` for one layer at `bits`, behind the policy's stages: the
    kept channels, a low-rank latent, a rotation, then the outliers kept aside (each stage builds what
    follows it without itself, so the rotation and the outliers act on the latent)."""
    if policy.codec not in CODECS:
        raise ValueError(f"unknown codec {policy.codec!r}; registered: {sorted(CODECS)}")
    if getattr(policy, "prune_channels", 0):
        return ChannelPruned.from_policy(policy, bits)
    if getattr(policy, "rank", 0):
        return LowRank.from_policy(policy, bits)
    if getattr(policy, "rotation", "none") != "none":
        return Rotated.from_policy(policy, bits)
    if getattr(policy, "outliers", 0):
        return Outliers.from_policy(policy, bits)
    return CODECS[policy.codec].from_policy(policy, bits)


from kvtrain.kv.codecs import affine, codebook, mixed, raw, ternary, vllm  # noqa: E402,F401  (registers them)
from kvtrain.kv.codecs.channels import ChannelPruned  # noqa: E402
from kvtrain.kv.codecs.lowrank import LowRank  # noqa: E402
from kvtrain.kv.codecs.outliers import Outliers  # noqa: E402
from kvtrain.kv.codecs.rotation import Rotated  # noqa: E402
