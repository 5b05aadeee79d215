"""Token eviction: which tokens of K/V a layer keeps, decided once for the training view and the cache.

The schedule: a decision every `interval` tokens, when the layer has seen a multiple of it, whether
those tokens came in a prefill or one by one (a prefill longer than the interval is attended in
segments with a decision between them, as a chunked prefill would be); or (interval 0) one decision
when the prompt ends, as SnapKV compresses a prompt: the cache decides after its first forward (the
prompt comes in one), training at each row's prompt length (`set_prompt_lengths`). At a decision
with `total` tokens seen, each KV head keeps

    the sinks (positions < sinks) and the newest `recent` tokens, always,
    then the best-scored of the rest (the selector's score), up to kept(total) tokens in all:
    budget tokens (an int), or ceil(budget * total) (a float in (0, 1]).

Evicted tokens never come back, or, with `retain` (MiKV), stay at low precision: the codec encodes
them once, when a decision evicts them, and every later query attends to them as decoded; or, with
`merge` (EMS, D2O), each is averaged into the survivor whose key is most like its own. Under a spec
that also quantizes K and V (a token-wise codec, every token on arrival), the cache holds the
survivors encoded (`Encoded`) and the training view attends to the codec's simulation of every token.
A query at position p attends to the survivors of the last decision before it and every token since,
itself included. `attend` computes exactly that for a run of new
tokens after the survivors held so far; the training view calls it with nothing held and the whole
sequence, the cache with what it holds and the tokens of each forward, so both make the same
decisions from the same attention (tests/test_kv_eviction.py confirms it on every selector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from kvtrain.kv.codecs import Codec, Payload
from kvtrain.kv.selectors import Selector, build_selector, check_count


@dataclass
class EvictionPolicy:
    """Which tokens survive (a spec's `eviction`, `KVSpec(eviction=...)`).

    Args:
        selector: a registered selector (`kvtrain.kv.selectors.SELECTORS`): "streaming_llm", "snapkv",
            "h2o", "tova", "dms" (learned: it trains with straight_through).
        budget: tokens each KV head keeps at a decision: a count (int >= 1) or a fraction of the
            tokens seen (float in (0, 1]); the sinks and the recent window count in it.
        interval: a decision every `interval` tokens seen (1: at every token, as H2O and TOVA decode);
            0: one decision, at the end of the prompt (SnapKV's schedule).
        sinks: the first `sinks` tokens always survive (attention sinks).
        recent: the newest `recent` tokens at a decision always survive.
        options: the selector's own settings (snapkv: window, kernel).
        straight_through: in training, a temperature > 0 gives the selection a gradient: the view
            keeps every token, an evicted one weighted 0 in the forward (exactly the cache's
            attention) and sigmoid((score - the budget's boundary) / (temperature * the mean score))
            in the backward, so the loss reaches the attention the selector scores with
            (which a hard top-k never passes on). 0: off.
        noise: with straight_through, training ranks by each score plus logistic noise (the
            difference of two Gumbel samples, DMS's Gumbel-sigmoid) of `noise` times the mean score,
            so a learned selector explores; decoding ranks by the scores alone. 0: off.
        retain: a `TensorPolicy` (or a dict of its fields) for K and V of the tokens a decision
            evicts, which stay in the cache at its bits instead of being dropped (MiKV: the important
            tokens in full precision, the rest at 2 bits); a token-wise codec (per_token(G),
            per_token_head). None: evicted tokens are dropped.
        merge: evict-then-merge (EMS, D2O): each evicted token's key and value are averaged into the
            survivor (not a sink) whose key has the highest cosine similarity to its key, weighted by
            the tokens each already holds, so a survivor stands for the tokens merged into it, and
            attention counts it that many times (its logit plus log of its mass, ToMe's proportional
            attention).
        merge_above: merge only evicted tokens whose nearest survivor's cosine similarity exceeds
            this (D2O's threshold; the rest are dropped); -1 merges every one.
    """

    selector: str = "snapkv"
    budget: int | float = 0.25
    interval: int = 64
    sinks: int = 0
    recent: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    straight_through: float = 0.0
    noise: float = 0.0
    retain: Any = None  # TensorPolicy | None (kvtrain.kv.spec imports this module)
    merge: bool = False
    merge_above: float = -1.0

    def __post_init__(self) -> None:
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or (
                isinstance(budget, int) and budget < 1) or (isinstance(budget, float) and not 0 < budget <= 1):
            raise ValueError(f"budget must be a token count (int >= 1) or a kept fraction (float in (0, 1]), got {budget!r}")
        check_count("interval (tokens between eviction decisions; 0: once, at the end of the prompt)", self.interval, 0)
        check_count("sinks (tokens that always survive)", self.sinks, 0)
        check_count("recent (newest tokens that always survive)", self.recent, 0)
        if isinstance(self.straight_through, bool) or not isinstance(self.straight_through, (int, float)) or (
                self.straight_through < 0):
            raise ValueError(f"straight_through must be a temperature >= 0 (0: off), got {self.straight_through!r}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or self.noise < 0 or (
                self.noise and not self.straight_through):
            raise ValueError(f"noise must be >= 0 and needs straight_through > 0 (it perturbs the straight-through "
                             f"selection in training), got noise={self.noise!r} with straight_through="
                             f"{self.straight_through!r}")
        if isinstance(budget, int) and budget < self.sinks + self.recent:
            raise ValueError(f"a budget of {budget} tokens cannot hold sinks={self.sinks} and recent={self.recent}")
        self.build().check(self.interval)
        self._check_retain()
        if not isinstance(self.merge, bool):
            raise ValueError(f"merge must be true or false, got {self.merge!r}")
        if isinstance(self.merge_above, bool) or not isinstance(self.merge_above, (int, float)) or not (
                -1 <= self.merge_above <= 1):
            raise ValueError(f"merge_above must be a cosine similarity in [-1, 1], got {self.merge_above!r}")
        if self.merge and (self.retain is not None or self.straight_through):
            raise ValueError("merge averages the evicted tokens into the survivors: it does not combine with retain "
                             "(which keeps them) or straight_through (which weighs them 0) yet")

    def build(self) -> Selector:
        return build_selector(self.selector, self.options)

    def retention(self) -> Codec | None:
        """The codec of the evicted tokens kept at low precision (None: they are dropped)."""
        return None if self.retain is None else self.retain.codec_at(-1)

    def _check_retain(self) -> None:
        from kvtrain.kv.spec import TensorPolicy

        if isinstance(self.retain, dict):
            self.retain = TensorPolicy(**self.retain)
        elif self.retain is not None and not isinstance(self.retain, TensorPolicy):
            raise ValueError(f"retain must be a TensorPolicy, a dict of its fields or None, got {self.retain!r}")
        if self.retain is None:
            return
        check_token_wise(self.retain, "retain encodes the tokens a decision evicts")
        if self.retain.layer_bits:
            raise ValueError(f"retain has one bit width for every layer, got layer_bits={self.retain.layer_bits}")
        if self.straight_through:
            raise ValueError("straight_through with retain is not supported yet: the gate weighs evicted tokens 0, "
                             "retain keeps them at low precision")

    def kept(self, total: int) -> int:
        """Tokens a head keeps at a decision with `total` seen (at least the sinks and recent window)."""
        budget = self.budget if isinstance(self.budget, int) else math.ceil(round(self.budget * total, 9))
        return min(total, max(budget, min(total, self.sinks + self.recent)))

    def segments(self, past: int, n: int, prompt: int | None = None) -> list[tuple[int, int]]:
        """The n new tokens after `past`, cut after every decision: [(start, end)) offsets into them
        (`prompt`: the prompt's length, for interval 0; None once it has been decided)."""
        if self.interval:
            cuts = list(range((past // self.interval + 1) * self.interval - past, n, self.interval))
        else:
            cuts = [prompt - past] if prompt is not None and 0 < prompt - past < n else []
        bounds = [0, *cuts, n]
        return list(zip(bounds[:-1], bounds[1:]))

    def decides(self, total: int, prompt: int | None = None) -> bool:
        """Whether a decision follows the token that makes `total` seen."""
        return total % self.interval == 0 if self.interval else total == prompt

    def observes(self, positions: torch.Tensor, selector: Selector, prompt: int | None = None) -> torch.Tensor:
        """Which queries at `positions` the selector's score reads: the last `observed` before the
        decision that follows each (a query at p is decoded with p + 1 tokens seen)."""
        if selector.observed is None:
            return torch.ones_like(positions, dtype=torch.bool)
        if self.interval:
            upcoming = (positions // self.interval + 1) * self.interval  # the decision after p + 1 tokens
        else:
            upcoming = torch.full_like(positions, -1 if prompt is None else prompt)
        return (positions >= upcoming - selector.observed) & (positions < upcoming)

    def survivors(self, scores: torch.Tensor, positions: torch.Tensor, total: int,
                  pads: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (B, H, kept) into the held tokens, in position order, of those that survive a
        decision with `total` seen (`pads`: each row's left padding, evicted first)."""
        n = min(self.kept(total), scores.shape[-1])
        return self._ranked(scores, positions, total, pads).topk(n, dim=-1, sorted=False).indices.sort(-1).values

    def gate(self, scores: torch.Tensor, positions: torch.Tensor, total: int, alive: torch.Tensor,
             pads: torch.Tensor | None = None) -> torch.Tensor:
        """The straight-through form of `survivors` over every token (`alive`: the gate of the decisions
        before, 1 or 0 in the forward): 1 for the survivors, 0 for the rest in the forward; the
        gradient of sigmoid((score - boundary) / (temperature * the mean score)), the boundary halfway
        between the last survivor's score and the next one's."""
        living = alive.detach() > 0.5
        # in units of the living scores' mean magnitude (their spread can vanish on a head that scores alike)
        scale = scores.detach().masked_fill(~living, 0).abs().sum(-1, keepdim=True) / living.sum(-1, keepdim=True)
        if self.noise:
            u = torch.rand_like(scores).clamp(1e-6, 1 - 1e-6)
            scores = scores + self.noise * scale * (u.log() - (-u).log1p())
        ranked = self._ranked(scores, positions, total, pads).masked_fill(~living, -math.inf)
        n = min(self.kept(total), int(living.sum(-1).min()))
        top = ranked.topk(min(n + 1, ranked.shape[-1]), dim=-1)
        hard = torch.zeros_like(alive).scatter(-1, top.indices[..., :n], 1.0)
        ends = top.values.clamp(min=-1e30, max=1e30)  # (protected tokens rank at inf)
        boundary = ends[..., n - 1:n + 1].mean(-1, keepdim=True)
        soft = torch.sigmoid((scores - boundary) / (scale * self.straight_through + 1e-12))
        protected = self._protected(positions, total, pads)
        return alive * torch.where(protected, torch.ones_like(soft), hard + soft - soft.detach())

    def _protected(self, positions: torch.Tensor, total: int, pads: torch.Tensor | None = None) -> torch.Tensor:
        """The sinks (a left-padded row's first tokens after its pads) and the recent window."""
        first = positions if pads is None else positions - pads[:, None, None]
        return ((first >= 0) & (first < self.sinks)) | (positions >= total - self.recent)

    def _ranked(self, scores: torch.Tensor, positions: torch.Tensor, total: int,
                pads: torch.Tensor | None = None) -> torch.Tensor:
        ranked = scores.detach().masked_fill(self._protected(positions, total, pads), math.inf)
        return ranked if pads is None else ranked.masked_fill(positions < pads[:, None, None], -math.inf)


def check_token_wise(policy: Any, what: str) -> None:
    """Errors for a TensorPolicy that eviction encodes token by token (`what` says where): a decision
    keeps or evicts any tokens, scattered over the sequence, so a codec may not group tokens."""
    if policy.codec_at(-1).unit != 1:
        raise ValueError(f"{what}, token by token: its granularity must be per_token(G) or per_token_head, got "
                         f"{policy.granularity}")
    if policy.learnable or policy.rotation == "learned" or policy.rank:
        raise ValueError(f"{what}: codecs with learnable state (learnable, rotation 'learned', rank) are not "
                         "supported under eviction yet")


@dataclass
class Survivors:
    """What a layer holds under eviction: per KV head, the tokens that survived (in position order)
    with their positions and the attention the selector has observed them get, and the count seen."""

    keys: "torch.Tensor | Encoded"  # (B, H, L, D), or encoded by the spec's codec in a cache
    values: "torch.Tensor | Encoded"
    positions: torch.Tensor  # (B, H, L) int32
    attention: torch.Tensor | None  # (B, H, L), None for selectors that observe no queries
    total: int = 0
    gate: torch.Tensor | None = None  # (B, H, L) with a straight-through selection: every token held, 1 / 0
    retained: "Retained | None" = None  # the evicted tokens kept at low precision (EvictionPolicy.retain)
    mass: torch.Tensor | None = None  # (B, H, L) int32 under merge: the tokens each survivor stands for
    pads: torch.Tensor | None = None  # (B,) each row's left padding (slots no query attends to but its own)

    @classmethod
    def empty(cls, keys: torch.Tensor, values: torch.Tensor, selector: Selector, gated: bool = False,
              retain: Codec | None = None, stored: bool = False, merge: bool = False,
              pads: torch.Tensor | None = None, codecs: tuple[Codec | None, Codec | None] = (None, None)
              ) -> "Survivors":
        """Nothing held yet; `retain`: the codec of the evicted tokens (`stored`: encoded, in a cache);
        `merge`: the evicted are merged into the survivors; `pads`: each row's left padding; `codecs`:
        K's and V's (a cache holds the survivors encoded by them)."""
        b, h, _, d = keys.shape
        attention = None if selector.observed == 0 else keys.new_zeros(b, h, 0, dtype=_score_dtype(keys.dtype))
        gate = keys.new_zeros(b, h, 0, dtype=_score_dtype(keys.dtype)) if gated else None
        positions = torch.zeros(b, h, 0, dtype=torch.int32, device=keys.device)
        def none_yet(codec, t):
            return Encoded(codec, codec.encode(t[..., :0, :])) if codec is not None and stored else t[..., :0, :]

        retained = None if retain is None else Retained(retain, none_yet(retain, keys), none_yet(retain, values))
        return cls(none_yet(codecs[0], keys), none_yet(codecs[1], values), positions, attention, 0, gate, retained,
                   positions.clone() if merge else None, pads)

    def appended(self, keys: torch.Tensor, values: torch.Tensor) -> "Survivors":
        b, h, n, _ = keys.shape
        new = torch.arange(self.total, self.total + n, dtype=torch.int32, device=keys.device).expand(b, h, n)
        attention = None if self.attention is None else torch.cat([self.attention, self.attention.new_zeros(b, h, n)], -1)
        gate = None if self.gate is None else torch.cat([self.gate, self.gate.new_ones(b, h, n)], -1)
        mass = None if self.mass is None else torch.cat([self.mass, self.mass.new_ones(b, h, n)], -1)
        return replace(self, keys=held_appended(self.keys, keys), values=held_appended(self.values, values),
                       positions=torch.cat([self.positions, new], -1), attention=attention, total=self.total + n, gate=gate,
                       mass=mass)

    def kept(self, index: torch.Tensor, reset: bool, sinks: int = 0, merge_above: float = -1.0) -> "Survivors":
        """The tokens at `index` (B, H, n); `reset`: the selector observes afresh for the next decision;
        the others retained or merged into the survivors past the `sinks` where the policy says so."""
        def take(t, at=index):
            return t.take(at) if isinstance(t, Encoded) else t.gather(2, at[..., None].expand(*at.shape, t.shape[-1]))

        attention = None if self.attention is None else self.attention.gather(2, index)
        kept = replace(self, keys=take(self.keys), values=take(self.values), positions=self.positions.gather(2, index),
                       attention=attention.zero_() if reset and attention is not None else attention,
                       mass=None if self.mass is None else self.mass.gather(2, index))
        length = self.keys.shape[-2]
        if (self.retained is None and self.mass is None) or index.shape[-1] == length:
            return kept
        others = torch.ones(self.positions.shape, dtype=torch.int8, device=index.device).scatter(-1, index, 0)
        evicted = others.sort(dim=-1, descending=True, stable=True).indices[..., :length - index.shape[-1]]
        keys, values = take(self.keys, evicted), take(self.values, evicted)
        real = None if self.pads is None else self.positions.gather(2, evicted) >= self.pads[:, None, None]
        if self.retained is not None:  # the others stay, at low precision (an evicted pad seen by no query)
            return replace(kept, retained=self.retained.added(held_tensor(keys), held_tensor(values), real))
        return _merged(kept, keys, values, self.mass.gather(2, evicted) * (1 if real is None else real), sinks,
                       merge_above)

    def rows(self, index: torch.Tensor) -> "Survivors":
        """Batch rows `index` (beam search, batch selection)."""
        return self.map(lambda t: t.index_select(0, index.to(t.device)))

    def map(self, fn) -> "Survivors":
        """`fn` applied to every tensor held (select batch rows, move devices)."""
        return replace(self, **{name: held_mapped(getattr(self, name), fn) for name in (*HELD, "pads")
                                if getattr(self, name) is not None},
                       retained=None if self.retained is None else self.retained.map(fn))

    def nbytes(self) -> int:
        return sum(held_nbytes(getattr(self, name)) for name in (*HELD, "pads") if getattr(self, name) is not None) + (
            0 if self.retained is None else self.retained.nbytes())


HELD = ("keys", "values", "positions", "attention", "mass")  # the tensors a layer holds per token and head


@dataclass
class Encoded:
    """K or V of the held tokens as the cache stores them under a spec that quantizes them (a
    token-wise codec, each token encoded once, on arrival): gathered at decisions in their encoded
    form, decoded for each attention (the training view holds the codec's simulation instead)."""

    codec: Codec
    payload: Payload

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.payload.shape)

    def tensor(self) -> torch.Tensor:
        return self.codec.decode(self.payload)

    def appended(self, x: torch.Tensor) -> "Encoded":
        return replace(self, payload=Payload.cat([self.payload, self.codec.encode(x)]))

    def take(self, index: torch.Tensor) -> "Encoded":
        """The tokens at `index` (B, H, n) of each head."""
        def gather(t: torch.Tensor) -> torch.Tensor:  # token-wise payloads: (B, H, tokens, ...)
            return t.gather(2, index.view(*index.shape, *[1] * (t.dim() - 3)).expand(*index.shape, *t.shape[3:]))

        tensors = {name: gather(t) for name, t in self.payload.tensors.items()}
        return replace(self, payload=replace(self.payload, tensors=tensors,
                                             shape=(*self.payload.shape[:2], index.shape[-1], self.payload.shape[3])))

    def map(self, fn) -> "Encoded":
        return replace(self, payload=self.payload.map(fn))

    def nbytes(self) -> int:
        return self.payload.nbytes()


def held_appended(held: "torch.Tensor | Encoded", new: torch.Tensor) -> "torch.Tensor | Encoded":
    return held.appended(new) if isinstance(held, Encoded) else torch.cat([held, new], -2)


def held_tensor(t: "torch.Tensor | Encoded") -> torch.Tensor:
    return t.tensor() if isinstance(t, Encoded) else t


def held_mapped(t: "torch.Tensor | Encoded", fn) -> "torch.Tensor | Encoded":
    return t.map(fn) if isinstance(t, Encoded) else fn(t)


def held_nbytes(t: "torch.Tensor | Encoded") -> int:
    return t.nbytes() if isinstance(t, Encoded) else t.numel() * t.element_size()


def _merged(held: Survivors, keys: torch.Tensor, values: torch.Tensor, mass: torch.Tensor, sinks: int,
            above: float = -1.0) -> Survivors:
    """The survivors with evicted tokens (K/V (B, H, m, D), each standing for `mass` tokens, 0 for a
    pad) averaged into the survivor past the sinks whose key is most like each one's (cosine), weighted by mass;
    an evicted token whose best similarity is not above `above` is dropped (as every one is on a head
    whose survivors are all sinks)."""
    similarity = F.normalize(keys, dim=-1) @ F.normalize(held.keys, dim=-1).transpose(-1, -2)
    first = 0 if held.pads is None else held.pads[:, None, None]  # each row's first real token
    open_ = held.positions - first >= sinks  # (a pad is never a target; an evicted one comes with mass 0)
    best = similarity.masked_fill(~open_[:, :, None, :], -math.inf).max(-1)  # (B, H, m)
    target = best.indices
    weight = mass * ((best.values > above) if above > -1 else open_.any(-1, keepdim=True))
    total = held.mass.scatter_add(-1, target, weight)

    def average(kept: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        at = target[..., None].expand(*target.shape, kept.shape[-1])
        summed = (kept * held.mass[..., None]).scatter_add(2, at, new * weight[..., None].to(new.dtype))
        return summed / total[..., None]

    return replace(held, keys=average(held.keys, keys), values=average(held.values, values), mass=total)


@dataclass
class Retained:
    """The tokens decisions evicted, kept at low precision instead of dropped (MiKV): per KV head, in
    the order they were evicted; every later query attends to them (they precede it). The cache holds
    them `Encoded`, the training view as the codec simulates them: equal in the forward."""

    codec: Codec
    keys: "torch.Tensor | Encoded"
    values: "torch.Tensor | Encoded"
    real: torch.Tensor | None = None  # (B, H, m) in a left-padded batch: False for the pads, which no query sees

    def added(self, keys: torch.Tensor, values: torch.Tensor, real: torch.Tensor | None = None) -> "Retained":
        """With the (B, H, m, D) K/V of newly evicted tokens, encoded once (`real`: which are not pads)."""
        def joined(held, new):
            return held_appended(held, new if isinstance(held, Encoded) else self.codec.simulate(new))

        if real is not None:
            real = torch.cat([self.real if self.real is not None else real.new_ones(*real.shape[:2], 0), real], -1)
        return replace(self, keys=joined(self.keys, keys), values=joined(self.values, values), real=real)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as attention reads them."""
        return held_tensor(self.keys), held_tensor(self.values)

    def map(self, fn) -> "Retained":
        return replace(self, keys=held_mapped(self.keys, fn), values=held_mapped(self.values, fn),
                       real=None if self.real is None else fn(self.real))

    def nbytes(self) -> int:
        return held_nbytes(self.keys) + held_nbytes(self.values) + (0 if self.real is None else held_nbytes(self.real))


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, held: Survivors, policy: EvictionPolicy,
           selector: Selector, scaling: float, softcap: float | None = None, dropout: float = 0.0,
           prompt: int | None = None) -> tuple[torch.Tensor, Survivors]:
    """Attention of the queries of n new tokens (B, Hq, n, D) whose K/V (B, H, n, D) follow `held`,
    segment by segment, with the decisions the schedule makes between them (module docstring;
    `prompt`: the prompt's length under interval 0, None when it was decided before these tokens).
    Returns the output (B, n, Hq, D) and what survives after the last of them."""
    outs = []
    for s0, s1 in policy.segments(held.total, keys.shape[-2], prompt):
        held = held.appended(keys[..., s0:s1, :], values[..., s0:s1, :])
        out, probs = _segment_attention(query[..., s0:s1, :], held, scaling, softcap, dropout)
        outs.append(out)
        if held.attention is not None:  # what the queries paid: a path for gradients only through a gate
            positions = torch.arange(held.total - (s1 - s0), held.total, device=query.device)
            observed = policy.observes(positions, selector, prompt).to(probs.dtype)
            paid = probs if held.gate is not None else probs.detach()
            held.attention = held.attention + torch.einsum("bhgql,q->bhl", paid, observed) / probs.shape[2]
        if policy.decides(held.total, prompt):
            held = _decide(held, policy, selector)
    return torch.cat(outs, dim=1), held


def _decide(held: Survivors, policy: EvictionPolicy, selector: Selector) -> Survivors:
    reset = selector.observed is not None
    if held.gate is not None:  # straight-through: every token stays, the gate says which survive
        attention = None if held.attention is None else held.attention * (0 if reset else 1)
        held = replace(held, gate=policy.gate(_living_scores(held, selector), held.positions, held.total, held.gate,
                                              held.pads),
                       attention=attention)
    else:
        scores = selector.score(held.attention, held.positions, held_tensor(held.values) if selector.reads_values else None)
        index = policy.survivors(scores, held.positions, held.total, held.pads)
        held = held.kept(index, reset, policy.sinks, policy.merge_above)
    if not policy.interval:  # the prompt's decision is the last: nothing to observe for any more
        held.attention = None
    return held


def _living_scores(held: Survivors, selector: Selector) -> torch.Tensor:
    """The selector's scores of the gated tokens still alive, computed over them alone as the cache
    holds them (a score may pool neighbours), -inf for the evicted."""
    living = held.gate.detach() > 0.5
    index = living.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[..., :int(living.sum(-1).min())]
    index = index.sort(-1).values  # every head holds as many (one budget for all)
    attention = None if held.attention is None else held.attention.gather(-1, index)
    values = held.values.gather(2, index[..., None].expand(*index.shape, held.values.shape[-1])) if (
        selector.reads_values) else None
    scores = selector.score(attention, held.positions.gather(-1, index), values)
    return torch.full(held.gate.shape, -math.inf, dtype=scores.dtype, device=scores.device).scatter(-1, index, scores)


def _segment_attention(query: torch.Tensor, held: Survivors, scaling: float, softcap: float | None,
                       dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention of a segment's queries (the last of the held tokens) over the held tokens each
    may see (the earlier ones and itself) and the retained ones: output (B, n, Hq, D) and the survivors'
    probabilities (B, H, group, n, L)."""
    b, hq, n, d = query.shape
    keys, values = held_tensor(held.keys), held_tensor(held.values)
    first = held.total - n
    slots = torch.arange(first, held.total, device=query.device)[:, None]  # the queries' (n, 1)
    visible = held.positions[:, :, None, None, :] <= slots
    if held.pads is not None:  # a pad is seen by no query but its own (which then sees only itself)
        real = held.positions >= held.pads[:, None, None]
        visible = visible & (real[:, :, None, None, :] | (held.positions[:, :, None, None, :] == slots))
    low = None if held.retained is None else held.retained.tensors()
    if low is not None:  # the evicted tokens at low precision, before every query
        keys, values = torch.cat([low[0], keys], -2), torch.cat([low[1], values], -2)
        seen = visible.new_ones(*visible.shape[:-1], low[0].shape[-2]) if held.retained.real is None else (
            held.retained.real[:, :, None, None, :].expand(*visible.shape[:-1], -1))
        visible = torch.cat([seen, visible], -1)
    h, length = keys.shape[1], keys.shape[-2]
    grouped = query.reshape(b, h, hq // h * n, d)
    scores = (grouped @ keys.transpose(-1, -2)).reshape(b, h, hq // h, n, length) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if held.mass is not None:  # a merged token counts as the tokens it stands for (ToMe's proportional attention)
        scores = scores + held.mass.log().to(scores.dtype)[:, :, None, None, :]
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1, dtype=_score_dtype(query.dtype))
    every = probs
    if held.gate is not None:  # the evicted weigh 0 in the forward: the softmax over the survivors
        probs = probs * held.gate.detach()[:, :, None, None, :]
        probs = probs / probs.sum(-1, keepdim=True)
    dropped = torch.nn.functional.dropout(probs, dropout) if dropout else probs
    out = dropped.to(query.dtype).reshape(b, h, hq // h * n, length) @ values
    if held.gate is not None and held.gate.requires_grad:
        out = out + _gate_gradient(every, held, out)
    return out.reshape(b, hq, n, d).transpose(1, 2).contiguous(), probs[..., length - held.keys.shape[-2]:]


def _gate_gradient(every: torch.Tensor, held: Survivors, out: torch.Tensor) -> torch.Tensor:
    """Zero, with the gate's gradient: keeping token j moves a query's output by the secant
    c (v_j - out), c = p_j / (S + p_j) (p_j its attention among all tokens, S the survivors' share), so
    d out / d gate_j is that, bounded by |v_j - out| where the derivative of the renormalized softmax,
    p_j (v_j - out) / S, explodes when the survivors hold little of the query's attention."""
    b, h, g, n, length = every.shape
    share = (every * held.gate.detach()[:, :, None, None, :]).sum(-1, keepdim=True)
    secant = (every / (share + every)).detach() * (held.gate - held.gate.detach())[:, :, None, None, :]
    secant = secant.reshape(b, h, g * n, length).to(out.dtype)
    return secant @ held.values - secant.sum(-1, keepdim=True) * out.detach()
