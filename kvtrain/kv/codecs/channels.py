"""The channel-pruning stage: ThinK's key-channel pruning, storing only the kept channels
(`prune_channels:` in a TensorPolicy).

ThinK scores each channel j of a KV head by how much it can move q . k: E[q_j^2] E[k_j^2], the query
energy averaged over the query heads that read the KV head, and prunes the lowest-scoring fraction.
kvpress's ThinK press zeroes those channels in a full-size cache and saves no bytes; here the inner
codec stores only the kept channels of each token (`raw` at 16 bits: ThinK itself; a quantizing codec
on the kept channels composes with it), and decoding puts zeros back where the pruned ones were, so
attention reads K at its own size. Values, which no query scores, are scored by their energy E[v_j^2].

ThinK chooses the channels per prompt from its last queries; a choice made at prefill would have to
be replayed exactly by the training view, so here it is one fixed set per layer and KV head (the state,
`ChannelScores`, saved and exported with the model): scored on calibration text by `kvtrain calibrate`
(the queries as the layer's attention receives them, rotated back for pre-RoPE keys), and before that
from the weights alone (the channels whose k_proj / v_proj rows are largest). Training against it is
exact: the kept channels get their gradient through the inner codec, the pruned ones none.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from kvtrain.kv.codecs import Payload, Stage, build_codec


def pruned_count(head_dim: int, fraction: float) -> int:
    """Channels of a head that `prune_channels=fraction` leaves out (as kvpress counts them)."""
    return int(head_dim * fraction)


class ChannelScores(nn.Module):
    """The kept channels of one layer's K or V (`kept`: kv_heads x kept, ascending), the inner codec's
    state beside them, and while `observed` is a dict (calibration) the channel energies seen:
    E[x_j^2] of the tensor and, for keys, E[q_j^2] of the queries (kv_heads x head_dim each)."""

    def __init__(self, kept: torch.Tensor, head_dim: int, inner: nn.Module | None = None):
        super().__init__()
        self.register_buffer("kept", kept.long().sort(-1).values.contiguous())
        self.head_dim = head_dim
        self.inner = inner
        self.observed: dict[str, Any] | None = None

    @classmethod
    def of_weight(cls, weight: torch.Tensor, kv_heads: int, head_dim: int, keep: int,
                  inner: nn.Module | None = None) -> "ChannelScores":
        """Before calibration: each head's `keep` channels whose projection rows are largest."""
        energy = weight.detach().double().cpu().square().sum(-1).view(kv_heads, head_dim)
        return cls(energy.topk(keep, -1).indices, head_dim, inner)

    def start_observing(self) -> None:
        heads = self.kept.shape[0]
        zeros = torch.zeros(heads, self.head_dim, dtype=torch.float64)
        self.observed = {"tensor": zeros, "tokens": 0, "queries": zeros.clone(), "query_tokens": 0}

    def observe(self, x: torch.Tensor) -> None:
        """x (B, kv_heads, n, head_dim) as the stage receives it."""
        self.observed["tensor"] += x.detach().double().cpu().square().sum((0, 2))
        self.observed["tokens"] += x.shape[0] * x.shape[2]

    def observe_queries(self, query: torch.Tensor) -> None:
        """query (B, heads, T, head_dim), heads = kv_heads x the query heads that read each KV head."""
        grouped = query.detach().double().cpu().unflatten(1, (self.kept.shape[0], -1))
        self.observed["queries"] += grouped.square().sum((0, 2, 3)) / grouped.shape[2]
        self.observed["query_tokens"] += query.shape[0] * query.shape[2]

    def scores(self) -> torch.Tensor:
        """ThinK's score per KV head and channel from what was observed (values: their energy)."""
        seen = self.observed
        score = seen["tensor"] / max(seen["tokens"], 1)
        return score * (seen["queries"] / seen["query_tokens"]) if seen["query_tokens"] else score

    @torch.no_grad()
    def fit(self) -> dict[str, Any]:
        """`kept` set to each head's top-scoring channels; the share of the score pruned before and after."""
        score = self.scores()
        before = self.pruned_share(score)
        self.kept.copy_(score.topk(self.kept.shape[-1], -1).indices.sort(-1).values)
        return {"values": self.observed["tokens"] * self.head_dim * self.kept.shape[0], "error_before": before,
                "error_after": self.pruned_share(score)}

    def pruned_share(self, score: torch.Tensor) -> float:
        """The part of the summed score in the channels not kept."""
        kept = score.gather(-1, self.kept.to(score.device)).sum()
        return float(1 - kept / score.sum().clamp(min=1e-300))


@dataclass(frozen=True)
class ChannelPruned(Stage):
    """`inner` on each head's kept channels, zeros in the others (module docstring)."""

    fraction: float
    state: ChannelScores | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "ChannelPruned":
        return cls(build_codec(replace(policy, prune_channels=0.0), bits), policy.prune_channels)

    def _kept_count(self, head_dim: int) -> int:
        pruned = pruned_count(head_dim, self.fraction)
        if not 0 < pruned < head_dim:
            raise ValueError(f"prune_channels={self.fraction} prunes {pruned} of a head's {head_dim} channels: it must "
                             f"prune at least 1 and keep at least 1 (a fraction in [{1 / head_dim:.4g}, "
                             f"{(head_dim - 1) / head_dim:.4g}] for head_dim {head_dim})")
        return head_dim - pruned

    def make_state(self, head_dim: int, kv_heads: int = 1, weight: torch.Tensor | None = None) -> ChannelScores:
        keep = self._kept_count(head_dim)
        if weight is None:
            raise ValueError("channel pruning starts from the layer's k_proj / v_proj weight (then `kvtrain calibrate` "
                             "scores the channels on text), and this attention layer has neither")
        return ChannelScores.of_weight(weight, kv_heads, head_dim, keep, self.inner.make_state(keep, kv_heads))

    def bound(self, state: nn.Module) -> "ChannelPruned":
        return self.holding(state)

    def _kept(self) -> torch.Tensor:
        if self.state is None:
            raise ValueError("channel pruning reads its kept channels from the model it is attached to: use the cache "
                             "through the attached model's forward (attach(model, spec) registers them)")
        return self.state.kept

    def _index(self, x: torch.Tensor) -> torch.Tensor:
        kept = self._kept().to(x.device)
        return kept[None, :, None, :].expand(x.shape[0], -1, x.shape[2], -1)

    def _restored(self, kept: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return kept.new_zeros(shape).scatter(-1, self._index(kept), kept)

    def encode(self, x: torch.Tensor) -> Payload:
        return replace(self.inner.encode(x.gather(-1, self._index(x))), shape=tuple(x.shape))

    def decode(self, payload: Payload) -> torch.Tensor:
        inner = self.inner.decode(replace(payload, shape=(*payload.shape[:3], self._kept().shape[-1])))
        return self._restored(inner, payload.shape)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The inner codec's simulation of the kept channels (its gradient), zeros in the others.
        While calibration observes, x passes through (the full-precision model's statistics)."""
        if self.state is not None and self.state.observed is not None:
            self.state.observe(x)
            return x
        return self._restored(self.inner.simulate(x.gather(-1, self._index(x))), tuple(x.shape))

    def check_model(self, head_dim: int, where: str, model_name: str) -> None:
        kept = self._kept_count(head_dim)
        try:
            self.inner.check_model(kept, where, model_name)
        except ValueError as error:  # (its head_dim is the kept channels: say so)
            raise ValueError(f"{error} (the codec sees the {kept} channels that prune_channels={self.fraction} keeps "
                             f"of head_dim {head_dim})") from None
