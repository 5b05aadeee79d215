"""The low-rank stage: K or V projected onto `rank` learned directions, the latent stored by the inner
codec (CSKV, Palu; `rank:` in a TensorPolicy).

The heads of a layer are cut into groups of `latent_heads` consecutive KV heads (0: all of them, as
CSKV projects the whole k_proj / v_proj output; Palu's G-LRD uses groups of 4); a token's group of
g heads, g * head_dim numbers, is stored as its latent z = x P (`rank` numbers) and read back as
z Q. The cache holds the latents (through the inner codec: `raw` keeps them in the cache's dtype,
`affine` quantizes them, KIVI-style, as CSKV does); with the pre-RoPE placement the keys are the
k_proj output and the model's rotary embedding is applied after reconstruction, as CSKV and Palu do.

P (g * head_dim x rank) and Q (rank x g * head_dim) per layer and group are learnable state
(`LowRankFactors`): initialized from the truncated SVD of the layer's projection weight (W_j = U S V^T
for the group's rows of k_proj or v_proj: P = U_r, Q = U_r^T, so z Q = x U_r U_r^T is X times the best
rank-r approximation of W_j^T, what CSKV's A B = U_r S_r V_r^T computes), refitted to data by
`kvtrain calibrate` (the principal directions of the observed x, which minimize the reconstruction
error on them: SVD-LLM's and Palu's whitened SVD, computed from the activations), and trained
end to end with the model (the gradient of z Q reaches P, Q and x exactly: no straight-through).
Parameterizing the latent as x P rather than hidden x A keeps the stage a codec of K or V; for a frozen
projection it is A = W^T P, and for reconstruction it loses nothing (the best rank-r approximation of
X W^T lies in that family).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from kvtrain.kv.codecs import Payload, Stage, build_codec, group_heads, ungroup_heads


def _times(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x (B, groups, n, k) times m (groups, k, r), each row's sum in one order whatever the number of
    rows: a matmul's order depends on its shape, and the cache projects blocks of tokens where the
    view projects all of them at once, so their latents would differ in the last bits (~10x a
    matmul's time in training: small next to the model's)."""
    return (x.unsqueeze(-1) * m.unsqueeze(-3)).sum(-2)


class LowRankFactors(nn.Module):
    """P ("down", groups x width x rank) and Q ("up", groups x rank x width) of one layer's K or V, the
    inner codec's state beside them, and while `observed` is a tensor (calibration: `kvtrain.kv.calibrate`)
    the second moment of the grouped values the stage saw (groups x width x width, float64) and the
    sum of their squared LM-loss gradients (`sensitivity`, a diagonal Fisher estimate over the layer's
    K or V: how much a reconstruction error there costs, for per-layer rank budgets)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, inner: nn.Module | None = None):
        super().__init__()
        # contiguous copies: a slice or a transpose is not, and ZeRO views each weight's bytes
        self.down = nn.Parameter(down.float().clone(memory_format=torch.contiguous_format))
        self.up = nn.Parameter(up.float().clone(memory_format=torch.contiguous_format))
        self.inner = inner
        self.observed: torch.Tensor | None = None
        self.values = 0

    def start_observing(self) -> None:
        groups, width, _ = self.down.shape
        self.observed, self.values = torch.zeros(groups, width, width, dtype=torch.float64), 0
        self.sensitivity, self.gradients = 0.0, 0

    def observe(self, grouped: torch.Tensor) -> None:
        flat = grouped.detach().double().cpu().transpose(0, 1).flatten(1, 2)  # (groups, B * n, width)
        self.observed += flat.transpose(1, 2) @ flat
        self.values += grouped.numel()

    def observe_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """x, whose gradient backward adds to `sensitivity` (x made a leaf when nothing before it needs a
        gradient: calibration freezes the weights, so the first layer's K/V are the first to)."""
        if not torch.is_grad_enabled():
            return x
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        x.register_hook(self._add_gradient)
        return x

    def _add_gradient(self, grad: torch.Tensor) -> None:
        self.sensitivity += float(grad.detach().double().square().sum())
        self.gradients += grad.numel()

    def spectrum(self) -> torch.Tensor:
        """The observed second moment's eigenvalues per group, largest first, per observed token: what
        each further direction of the latent would recover of E|x|^2."""
        tokens = max(self.values // self.observed.shape[-1] // self.observed.shape[0], 1)
        return torch.linalg.eigvalsh(self.observed).flip(-1).clamp(min=0) / tokens

    @torch.no_grad()
    def fit(self) -> dict[str, Any]:
        """P and Q set to the observed values' top principal directions (Q = P^T: the rank-r projection
        with the least squared error on them); the relative error before and after."""
        moment, rank = self.observed, self.down.shape[-1]
        before = self.error(moment)
        directions = torch.linalg.eigh(moment).eigenvectors.flip(-1)[..., :rank]  # (eigh: ascending)
        self.down.copy_(directions)
        self.up.copy_(directions.transpose(-1, -2))
        return {"values": self.values, "error_before": before, "error_after": self.error(moment), "rank": rank}

    def error(self, moment: torch.Tensor) -> float:
        """E|x - x P Q|^2 / E|x|^2 over the values whose second moment is `moment`."""
        residual = torch.eye(moment.shape[-1], dtype=moment.dtype) - self.down.double() @ self.up.double()
        lost = (residual.transpose(-1, -2) @ moment @ residual).diagonal(dim1=-2, dim2=-1).sum()
        return float(lost / moment.diagonal(dim1=-2, dim2=-1).sum().clamp(min=1e-300))


@dataclass(frozen=True)
class LowRank(Stage):
    """`inner` on the latent x P of each group of `latent_heads` heads (module docstring)."""

    rank: int
    latent_heads: int = 0
    state: LowRankFactors | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "LowRank":
        return cls(build_codec(replace(policy, rank=0, latent_heads=0, layer_rank={}), bits), policy.rank, policy.latent_heads)

    def make_state(self, head_dim: int, kv_heads: int = 1, weight: torch.Tensor | None = None) -> LowRankFactors:
        """P and Q from the truncated SVD of `weight`, the layer's projection (kv_heads * head_dim rows)."""
        group = self._heads(kv_heads) * head_dim
        if self.rank >= group:
            raise ValueError(f"rank={self.rank} keeps all of a latent's {group} numbers ({self._heads(kv_heads)} heads of "
                             f"{head_dim}): a low-rank latent needs rank < {group}")
        if weight is None:
            raise ValueError("a low-rank latent starts from the SVD of the layer's k_proj / v_proj weight, and this "
                             "attention layer has neither (nor Phi-3's fused qkv_proj)")
        groups = kv_heads // self._heads(kv_heads)
        u = torch.linalg.svd(weight.detach().double().cpu().unflatten(0, (groups, group)), full_matrices=False)[0]
        down = u[..., :self.rank]
        return LowRankFactors(down, down.transpose(-1, -2), self.inner.make_state(self.rank, groups))

    def _heads(self, kv_heads: int) -> int:
        heads = self.latent_heads or kv_heads
        if kv_heads % heads:
            raise ValueError(f"latent_heads={self.latent_heads} must divide the layer's {kv_heads} KV heads")
        return heads

    def bound(self, state: nn.Module) -> "LowRank":
        return self.holding(state)

    def _factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state is None:
            raise ValueError("a low-rank stage reads its factors from the model it is attached to: use the cache "
                             "through the attached model's forward (attach(model, spec) registers them)")
        dtype = x.dtype
        return self.state.down.to(dtype), self.state.up.to(dtype)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return group_heads(x, self._heads(x.shape[1]))

    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        return _times(self._grouped(x), self._factors(x)[0])

    def encode(self, x: torch.Tensor) -> Payload:
        """The inner codec's payload of the latent, carrying the block's own (B, H, n, D) shape."""
        return replace(self.inner.encode(self._latent(x)), shape=tuple(x.shape))

    def decode(self, payload: Payload) -> torch.Tensor:
        batch, heads, n, dim = payload.shape
        latent = self.inner.decode(replace(payload, shape=(batch, heads // self._heads(heads), n, self.rank)))
        return ungroup_heads(_times(latent, self._factors(latent)[1]), dim)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The inner codec's simulation of the latent, reconstructed: the gradient reaches P, Q and x.
        While calibration observes, x passes through (its statistics are the full-precision model's)."""
        if self.state is not None and self.state.observed is not None:
            self.state.observe(self._grouped(x))
            return self.state.observe_gradient(x)
        return ungroup_heads(_times(self.inner.simulate(self._latent(x)), self._factors(x)[1]), x.shape[-1])

    def check_model(self, head_dim: int, where: str, model_name: str) -> None:
        self.inner.check_model(self.rank, where, model_name)
