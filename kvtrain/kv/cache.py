"""QuantizedKVCache: a `transformers.Cache` that stores K/V compressed, in the tiers of the spec's window rule.

Per layer it holds, for each of K and V, the sink tokens (full precision), the compressed tokens (the
codec's payloads: packed codes, scales, ...) and a full-precision tail (the window plus any
incomplete unit). A token is encoded once, when the rule (`kvtrain.kv.window`) moves it out of the
window, and never re-encoded; the view attention reads is the codec's decoding of that payload, so
nothing is quantized twice.
`update` compresses what the new tokens complete and hands attention every token as stored, plus (to
the attached attention function, `kvtrain.kv.attention`) the tokens it just compressed as they
arrived, so every query of a prefill chunk gets its exact view. Use it on an attached model:

    attach(model, spec)
    model.generate(ids, past_key_values=QuantizedKVCache(spec), ...)
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from typing import Any, Callable

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, LinearAttentionLayer, get_layer_types_and_kwargs

from kvtrain.kv.codecs import Codec, Payload
from kvtrain.kv.eviction import Encoded, Survivors, attend, held_appended, held_mapped, held_nbytes, held_tensor
from kvtrain.kv.placement import KeysFirst, PreRope
from kvtrain.kv.selectors import Selector
from kvtrain.kv.spec import Spec, resolve_spec
from kvtrain.kv.window import WindowRule, left_pads, row_positions
from kvtrain.quant.native import run_steps


def _finite(key: torch.Tensor, value: torch.Tensor) -> bool:
    """No NaN or inf in K and V, at one host sync. A non-finite entry makes their dot product non-finite
    (NaN * x, inf * 0 and inf - inf are NaN; inf * x is inf), so a finite dot clears both at the cost of
    one op (a third of two sums, a fifth of isfinite().all()); finite values whose products overflow
    get the exact check."""
    if key.shape == value.shape and math.isfinite(torch.dot(key.reshape(-1), value.reshape(-1)).item()):
        return True
    return bool(torch.isfinite(key).all() and torch.isfinite(value).all())


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# Per-token codecs encode blocks of up to this many of the tail's oldest tokens in one call instead of
# one token per step (a call costs ~50 us of op overhead on CPU whatever its size); they stay in the
# tail in full precision until the window rule moves them, and their payload counts in nbytes() meanwhile.
ENCODE_AHEAD = 32


class PayloadStore:
    """The compressed tokens of K or V in one layer: the codec's payloads, in order. The tier holds
    the first `n` encoded tokens; the rest (fewer than ENCODE_AHEAD) were encoded ahead of the rule."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.payload: Payload | None = None
        self.n = 0
        self._decoder: tuple[Payload | None, Callable | None] = (None, None)  # the codec's, for this payload

    @property
    def encoded(self) -> int:
        return 0 if self.payload is None else self.payload.n

    def encode(self, x: torch.Tensor) -> None:
        """Encode x (B, H, k, D), k a whole number of the codec's units following those encoded, once."""
        new = self.codec.encode(x)
        self.payload = new if self.payload is None else Payload.cat([self.payload, new])

    def stored(self) -> Payload:
        """The payload of the tier's tokens."""
        return self.payload.head(self.n)

    def decode(self) -> torch.Tensor:
        return self.codec.decode(self.stored())

    def decode_into(self, out: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
        """The tier's tokens decoded into `out`, followed by `then` (the tail)."""
        return self._current_decoder()(out, then)

    def prepare_step(self, window: torch.Tensor, skip: int, new: torch.Tensor, room: int) -> tuple | None:
        """A decode step through the codec's kernel (`decoder(...).prepare_step`), to run with
        `native.run_steps`: (out, tail, kernel arguments), where `out` gets, after `room` rows left to
        the caller, the tier's tokens decoded, then window[skip:] and `new`, and `tail` (the new
        window) those last two. None where the codec has no kernel for it."""
        prepare = getattr(self._current_decoder(), "prepare_step", None)
        return None if prepare is None else prepare(self.n, window, skip, new, room)

    def _current_decoder(self) -> Callable:
        if self._decoder[0] is not self.payload:
            self._decoder = (self.payload, self.codec.decoder(self.payload))
        return self._decoder[1]

    def __getattr__(self, name: str) -> torch.Tensor:
        """The tier's payload tensors by name (`store.codes`, `store.scale`, ...)."""
        payload = self.__dict__.get("payload")
        if payload is not None and name in payload.tensors:
            return self.stored().tensors[name]
        raise AttributeError(f"{type(self).__name__} holds no {name!r}")

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.payload is not None:
            self.payload = self.payload.map(fn)

    def nbytes(self) -> int:
        return 0 if self.payload is None else self.payload.nbytes()


class CompressedTensor:
    """K or V of one layer in the window rule's tiers: full-precision sinks, compressed tokens, and a
    full-precision tail (the window plus any incomplete unit)."""

    def __init__(self, codec: Codec | None, rule: WindowRule | None, rope: PreRope | None = None):
        self.codec, self.rule, self.rope = codec, rule, rope
        self.packed = PayloadStore(codec) if codec is not None else None
        self.sinks: torch.Tensor | None = None
        self.tail: torch.Tensor | None = None
        self.arrived: tuple[int, torch.Tensor] | None = None  # (start, raw tokens) this update compressed
        # pre-RoPE: the positions (int32, B x n) the compressed and the tail tokens are rotated back with
        self.positions: torch.Tensor | None = None
        self.tail_positions: torch.Tensor | None = None

    @property
    def held(self) -> int:
        """Tokens in the sinks and the compressed tier."""
        return (0 if self.sinks is None else self.sinks.shape[-2]) + (self.packed.n if self.packed else 0)

    def update(self, new: torch.Tensor, keep_arrived: bool = False, positions: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Append `new` (at `positions`, needed pre-RoPE), compress what the rule compresses now, and
        return every token as stored: the view of a query decoded with all of them in the cache. With
        `keep_arrived` (a model's attention will read them), the tokens this call compressed stay
        available as they arrived (`take_arrived`) for the queries of a chunk that saw them before
        they were compressed."""
        tail = new if self.tail is None else torch.cat([self.tail, new], dim=-2)
        if self.rope is not None:
            self._add_positions(positions, new)
        start, self.tail, self.arrived = self.held, tail, None
        if self.codec is not None and self._compress(start + tail.shape[-2]) and keep_arrived:
            self.arrived = (start, tail)
        return self._assembled()

    def stepped(self, new: torch.Tensor) -> tuple | None:
        """A decode step's one token, prepared for the codec's kernel when the tokens the rule moves are
        all in the tail already (every step but a prefill's): (view, new tail, tokens moved, kernel
        arguments); the kernel writes the view and the new tail in one pass (`native.run_steps`),
        without the general path's copies. Tokens leaving the tail are encoded here if they were not
        ahead; nothing else changes until `commit`. None: take `update` (it computes the same)."""
        if (self.packed is None or self.packed.payload is None or self.rope is not None or self.tail is None
                or new.dtype != self.tail.dtype):
            return None
        sinks, window = (0 if self.sinks is None else self.sinks.shape[-2]), self.tail.shape[-2]
        total = sinks + self.packed.n + window + 1
        move = self.rule.end(total) - sinks - self.packed.n
        if self.rule.start(total) != sinks or move > window:
            return None
        ready = self.packed.encoded - self.packed.n
        if move > ready:  # the tail's oldest tokens are encoded now (and ahead), as `_encode` would
            take = self._ahead(self.packed.n + move, window + 1) - self.packed.encoded
            if ready + take > window:  # the block reaches the new token
                return None
            self.packed.encode(self.tail[..., ready:ready + take, :])
        self.packed.n += move  # (the tier the kernel decodes; `commit` keeps it)
        try:
            made = self.packed.prepare_step(self.tail, move, new, room=sinks)
        finally:
            self.packed.n -= move
        if made is None:
            return None
        if sinks:
            made[0].narrow(-2, 0, sinks).copy_(self.sinks)
        out, tail, kernel = made
        return out, tail, move, kernel

    def commit(self, stepped: tuple) -> None:
        """Hold what `stepped` prepared, once the kernel ran: no tokens arrive compressed (a single
        query sees every token as stored)."""
        _, self.tail, move, _ = stepped
        self.packed.n += move
        self.arrived = None

    def _assembled(self) -> torch.Tensor:
        """Every token as stored, in one new tensor: the sinks, the compressed tier decoded into its
        place, the tail."""
        sinks = 0 if self.sinks is None else self.sinks.shape[-2]
        packed = self.packed.n if self.packed is not None else 0
        batch, heads, tail, dim = self.tail.shape
        out = self.tail.new_empty(batch, heads, sinks + packed + tail, dim)
        if sinks:
            out.narrow(-2, 0, sinks).copy_(self.sinks)
        if packed and self.rope is None:
            self.packed.decode_into(out.narrow(-2, sinks, packed + tail) if sinks else out, then=self.tail)
            return out
        if packed:
            out.narrow(-2, sinks, packed).copy_(self.rope.rotate(self.packed.decode(), self.positions))
        out.narrow(-2, sinks + packed, tail).copy_(self.tail)
        return out

    def _add_positions(self, positions: torch.Tensor | None, new: torch.Tensor) -> None:
        if positions is None:
            raise ValueError("pre-RoPE keys need each token's position: QuantizedKVCache.update got no position_ids "
                             "(decode through the attached model's forward)")
        positions = positions.to(torch.int32).expand(new.shape[0], new.shape[-2])
        self.tail_positions = positions if self.tail_positions is None else torch.cat([self.tail_positions, positions], 1)

    def take_arrived(self, stored: torch.Tensor) -> torch.Tensor:
        """`stored` (what `update` returned) with the tokens that call compressed as they arrived."""
        if self.arrived is None:
            return stored
        (start, raw), self.arrived = self.arrived, None
        return torch.cat([stored[..., :start, :], raw], dim=-2)

    def _compress(self, total: int) -> bool:
        """Move tokens out of the tail as the rule says; True if any were compressed."""
        held = 0 if self.sinks is None else self.sinks.shape[-2]
        if held < self.rule.sinks and held < self.rule.start(total):  # the first tokens become sinks for good
            take = self.rule.start(total) - held
            head = self.tail[..., :take, :]
            self.sinks = head.clone() if self.sinks is None else torch.cat([self.sinks, head], dim=-2)
            self.tail, held = self.tail[..., take:, :].clone(), held + take
            if self.rope is not None:
                self.tail_positions = self.tail_positions[:, take:].clone()
        move = self.rule.end(total) - held - self.packed.n
        if move > 0:
            self._encode(move)
            self.tail = self.tail[..., move:, :].clone()  # do not keep the whole old tail alive
        return move > 0

    def _encode(self, move: int) -> None:
        """The tail's oldest `move` tokens join the compressed tier, encoded now unless they were ahead."""
        ready = self.packed.encoded - self.packed.n  # encoded ahead: the tail's oldest tokens
        if move > ready:
            take = self._ahead(self.packed.n + move) - self.packed.encoded
            units = self.tail[..., ready:ready + take, :]
            if self.rope is not None:
                units = self.rope.rotate(units, self.tail_positions[:, ready:ready + take], inverse=True)
            self.packed.encode(units)
        self.packed.n += move
        if self.rope is not None:
            moved, self.tail_positions = self.tail_positions[:, :move], self.tail_positions[:, move:].clone()
            self.positions = moved if self.positions is None else torch.cat([self.positions, moved], 1)

    def _ahead(self, tier: int, tail: int | None = None) -> int:
        """How many tokens to have encoded for a tier of `tier` tokens: the tier rounded up to a block
        of up to ENCODE_AHEAD tokens (its next tokens all leave the window in turn) when the window
        moves fewer at a time. A block is at most what the tail holds when a unit leaves it (the
        window and that unit), so what is held is a function of the number of tokens, however they
        arrived (one prefill or token by token). `tail`: the tail's length (default: as held)."""
        unit = self.codec.unit
        block = min(ENCODE_AHEAD, self.rule.residual + unit) // unit * unit
        if self.rule.flush or block <= self.rule.step:
            return tier
        reach = self.packed.n + (self.tail.shape[-2] if tail is None else tail) // unit * unit  # (never binds: see the docstring)
        return max(tier, min(-(-tier // block) * block, reach))

    def forget_arrived(self) -> None:
        self.arrived = None

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (reorder, repeat) the batch rows `index`."""
        self.map(lambda t: t.index_select(0, index.to(t.device)))

    def copy(self) -> "CompressedTensor":
        """An independent copy (its tensors are shared: every update replaces them, never writes into them)."""
        twin = copy.copy(self)
        twin.packed = copy.copy(self.packed)
        return twin

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.packed is not None:
            self.packed.map(fn)
        for name in ("sinks", "tail", "positions", "tail_positions"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        self.arrived = None

    def nbytes(self) -> int:
        """Everything held: tiers, tokens encoded ahead, pre-RoPE positions, and tokens kept as they
        arrived until attention took them."""
        raw = self.arrived[1] if self.arrived is not None else None
        held = _nbytes(self.sinks, self.tail, raw, self.positions, self.tail_positions)
        return (self.packed.nbytes() if self.packed is not None else 0) + held


class PaddedRows:
    """K or V of a batch with left-padded rows: one CompressedTensor per row, whose window rule holds
    the row's padding in full precision like sinks (`WindowRule.shifted`), so its groups and window
    count from its first real token and batched decoding equals decoding each row alone."""

    def __init__(self, template: CompressedTensor, pads: list[int]):
        self.rows = [CompressedTensor(template.codec, template.rule.shifted(p), template.rope) for p in pads]

    @property
    def packed(self) -> PayloadStore:
        """The compressed store of the row holding the most compressed tokens."""
        return max(self.rows, key=lambda row: row.packed.n).packed

    def update(self, new: torch.Tensor, keep_arrived: bool = False, positions: torch.Tensor | None = None
               ) -> torch.Tensor:
        return torch.cat([row.update(new[b:b + 1], keep_arrived, row_positions(positions, b)) for b, row in enumerate(self.rows)])

    def take_arrived(self, stored: torch.Tensor) -> torch.Tensor:
        return torch.cat([row.take_arrived(stored[b:b + 1]) for b, row in enumerate(self.rows)])

    def forget_arrived(self) -> None:
        for row in self.rows:
            row.forget_arrived()

    def select_rows(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i].copy() for i in index.tolist()]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """`fn` on every tensor of every row (device moves; select_rows changes rows)."""
        for row in self.rows:
            row.map(fn)

    def nbytes(self) -> int:
        return sum(row.nbytes() for row in self.rows)


class QuantizedKVLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, spec: Spec, layer: int, rope: PreRope | None = None,
                 codecs: tuple[Codec | None, Codec | None] | None = None):
        super().__init__()
        self.spec, self.layer, self.rope, self.codecs = spec, layer, rope, codecs
        keys, values = codecs or (spec.keys(layer), spec.values(layer))
        self.k = CompressedTensor(keys, spec.window(keys), rope)
        self.v = CompressedTensor(values, spec.window(values))
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, keep_arrived: bool = False,
               positions: torch.Tensor | None = None, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stepped = self._decode_step(key_states, value_states)
        if stepped is not None:
            return stepped
        # here, not when the token is quantized 100 steps later; one host sync per layer and step
        if not _finite(key_states, value_states):
            raise self._non_finite("values" if bool(torch.isfinite(key_states).all()) else "keys", key_states.shape[-2])
        if self.length == 0 and keep_arrived:  # a model's prefill: left-padded rows get their own windows
            pads = left_pads(positions, 0, key_states.shape[-2])
            if pads is not None:
                self._pad_rows(pads.tolist())
        self.length += key_states.shape[-2]
        return self._update(key_states, value_states, keep_arrived, positions)

    def _pad_rows(self, pads: list[int]) -> None:
        self.k, self.v = PaddedRows(self.k, pads), PaddedRows(self.v, pads)

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, keep_arrived: bool,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.update(key_states, keep_arrived, positions), self.v.update(value_states, keep_arrived)

    @property
    def tensors(self) -> list[CompressedTensor | PaddedRows]:
        return [self.k, self.v]

    def _decode_step(self, key_states: torch.Tensor, value_states: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K's and V's views after one token, where both step through their codec's kernel
        (`CompressedTensor.stepped`), in one call that first checks the new K and V finite; None otherwise."""
        if key_states.shape[-2] != 1 or type(self.k) is not CompressedTensor or type(self.v) is not CompressedTensor:
            return None
        keys = self.k.stepped(key_states)
        values = keys and self.v.stepped(value_states)
        if values is None:
            return None
        refused = run_steps(keys[3], values[3])
        if refused:  # nothing was written or committed
            raise self._non_finite("keys" if refused == 1 else "values", 1)
        self.k.commit(keys)
        self.v.commit(values)
        self.length += 1
        return keys[0], values[0]

    def _non_finite(self, name: str, tokens: int) -> ValueError:
        return ValueError(f"QuantizedKVCache: layer {self.layer} got non-finite {name} (NaN or inf) for cache positions "
                          f"{self.length}..{self.length + tokens - 1}; the model's activations overflowed")

    def forget_arrived(self) -> None:
        for t in self.tensors:
            t.forget_arrived()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx.long().cpu())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(torch.arange(self._batch()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(torch.arange(self._batch())[indices.cpu()])

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.length:  # an empty layer (generate expands the batch before the prefill) has no rows yet
            for t in self.tensors:
                t.select_rows(index)

    def _batch(self) -> int:
        if isinstance(self.k, PaddedRows):
            return len(self.k.rows)
        held = [t for t in (self.k.tail, self.k.sinks) if t is not None]
        return held[0].shape[0] if held else self.k.packed.payload.shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for t in self.tensors:
            t.map(fn)

    def offload(self):
        self.map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self.map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.__init__(self.spec, self.layer, self.rope, self.codecs)

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tensors)


class JointKVLayer(QuantizedKVLayer):
    """K and V of a layer that share one latent (`KVSpec.joint_kv`, MHA2MLA): one CompressedTensor (`k`)
    holds them side by side along the head axis, keys first, so one window rule moves both and one
    latent per token encodes them; pre-RoPE, only the keys are rotated (`KeysFirst`). The view builds
    the same concatenation (`kvtrain.kv.attention`), so what the cache takes as it arrived is its own."""

    def __init__(self, spec: Spec, layer: int, rope: PreRope | None = None,
                 codecs: tuple[Codec | None, Codec | None] | None = None):
        CacheLayerMixin.__init__(self)
        self.spec, self.layer, self.rope, self.codecs = spec, layer, rope, codecs
        joint = codecs[0] if codecs else spec.keys(layer)
        self.k = CompressedTensor(joint, spec.window(joint), rope and KeysFirst(rope.rotary, rope.apply))
        self.v = None  # (a decode step takes the general path: `_decode_step` steps two tensors)
        self.length = 0

    def _pad_rows(self, pads: list[int]) -> None:
        self.k = PaddedRows(self.k, pads)

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, keep_arrived: bool,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        both = self.k.update(torch.cat([key_states, value_states], dim=1), keep_arrived, positions)
        return both.split(key_states.shape[1], dim=1)

    @property
    def tensors(self) -> list[CompressedTensor | PaddedRows]:
        return [self.k]


class HeldKVLayer(CacheLayerMixin):
    """A layer that holds what each forward hands it as it arrives (an evicting layer's survivors, a
    latent layer's latents): the first update sets its dtype and device, every update refuses
    non-finite K/V, and `_map` moves what it holds."""

    is_sliding = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _arrive(self, key_states: torch.Tensor, value_states: torch.Tensor, seen: int) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not _finite(key_states, value_states):
            name = "values" if bool(torch.isfinite(key_states).all()) else "keys"
            raise ValueError(f"QuantizedKVCache: layer {self.layer} got non-finite {name} (NaN or inf) for cache "
                             f"positions {seen}..{seen + key_states.shape[-2] - 1}; the model's activations overflowed")

    @abstractmethod
    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor held by fn(it)."""

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._map(lambda t: t.to(self.device, non_blocking=True))


class EvictingKVLayer(HeldKVLayer):
    """K/V of one layer under token eviction (`kvtrain.kv.eviction`): per KV head, the tokens that
    survived every decision so far, as they arrived; what a decision drops is freed. `update` takes a
    forward's new tokens, the attached attention then attends to them (`attend`), making the decisions
    the schedule puts among them from the attention their queries pay. Under a spec that quantizes
    K/V the survivors are held encoded; with `retain` (MiKV) the evicted stay, encoded by its codec."""

    def __init__(self, spec: Spec, layer: int):
        super().__init__()
        self.spec, self.layer = spec, layer
        self.retain = spec.eviction.retention()  # the evicted tokens' codec (None: dropped)
        self.held: Survivors | None = None
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None  # the tokens of the forward in flight

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._arrive(key_states, value_states, self.seen)
        self.new = (key_states, value_states)
        return key_states, value_states

    def attend(self, query: torch.Tensor, selector: Selector, scaling: float, softcap: float | None = None,
               pads: torch.Tensor | None = None) -> torch.Tensor:
        """The output (B, n, Hq, D) of the queries of the new tokens; keeps what survives (`pads`: each
        row's left padding, read at the first forward, which holds the padded prompts)."""
        keys, values = self.new
        first = self.held is None  # the prompt comes in the first forward: its end is decided under interval 0
        held = Survivors.empty(keys, values, selector, retain=self.retain, stored=True, merge=self.spec.eviction.merge,
                               pads=pads, codecs=(self.spec.keys(self.layer), self.spec.values(self.layer))
                               ) if first else self.held
        out, self.held = attend(query, keys, values, held, self.spec.eviction, selector, scaling, softcap,
                                prompt=keys.shape[-2] if first else None)
        self.new = None
        return out

    @property
    def seen(self) -> int:
        return (0 if self.held is None else self.held.total) + (0 if self.new is None else self.new[0].shape[-2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # (the attached attention masks by the held tokens' positions)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx.long().cpu())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.held is not None:
            self._select_rows(torch.arange(self.held.keys.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.held is not None:
            self._select_rows(torch.arange(self.held.keys.shape[0])[indices.cpu()])

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.held is not None:
            self.held = self.held.rows(index)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.held is not None:
            self.held = self.held.map(fn)

    def reset(self) -> None:
        self.__init__(self.spec, self.layer)

    def nbytes(self) -> int:
        return 0 if self.held is None else self.held.nbytes()


class LatentKVLayer(HeldKVLayer):
    """A multi-head latent attention layer (`kvtrain.kv.latent`): transformers hands it each token's
    latent as keys (B, 1, T, kv_lora_rank), encoded once, on arrival, by the spec's key codec, and the
    RoPE'd key part as values (B, 1, T, rope dims), held in full precision. `update` hands back every
    token's latent decoded: the numbers the training view gives `kv_b_proj`."""

    def __init__(self, spec: Spec, layer: int):
        super().__init__()
        self.spec, self.layer, self.codec = spec, layer, spec.keys(layer)
        self.latent: Encoded | torch.Tensor | None = None
        self.rope_keys: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._arrive(key_states, value_states, self.get_seq_length())
        if self.latent is None:
            self.latent = key_states if self.codec is None else Encoded(self.codec, self.codec.encode(key_states))
            self.rope_keys = value_states
        else:
            self.latent = held_appended(self.latent, key_states)
            self.rope_keys = torch.cat([self.rope_keys, value_states], -2)
        return held_tensor(self.latent), self.rope_keys

    def get_seq_length(self) -> int:
        return 0 if self.rope_keys is None else self.rope_keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.latent is not None:
            self.latent, self.rope_keys = held_mapped(self.latent, fn), fn(self.rope_keys)

    def reset(self) -> None:
        self.__init__(self.spec, self.layer)

    def nbytes(self) -> int:
        return 0 if self.latent is None else held_nbytes(self.latent) + held_nbytes(self.rope_keys)


KV_LAYERS = (QuantizedKVLayer, EvictingKVLayer, LatentKVLayer)


class QuantizedKVCache(Cache):
    """A KV cache compressed by `spec` (a KVQuantSpec or preset name); layers are created lazily.
    Under a spec with `eviction`, its layers keep the tokens that survive (`EvictingKVLayer`).

    `nbytes()` is the real storage of every tensor it holds: packed codes, scales, zero points and
    the full-precision tails; under eviction, the held tokens with their positions and scores.
    """

    def __init__(self, spec: Spec | str = "kivi2", config: PretrainedConfig | None = None):
        self.spec = resolve_spec(spec)
        self.unviewed: int | None = None  # the layer whose K/V were handed out and not yet seen by the view
        self.checked: Spec | None = None  # the model spec `viewed` last found equal to this cache's
        self.layer_types: list[str] | None = None
        self.rope: PreRope | None = None
        self.codecs: Callable[[int], tuple[Codec | None, Codec | None]] | None = None  # the attached model's, per layer
        self.bound_to: PretrainedConfig | None = None
        super().__init__(layers=[])
        if config is not None:
            self.bind(config)

    def bind(self, config: PretrainedConfig, rope: PreRope | None = None,
             codecs: Callable[[int], tuple[Codec | None, Codec | None]] | None = None) -> None:
        """Lay the layers out as `config`'s decoder has them: attention layers compressed, a hybrid
        model's convolution and linear-attention layers with transformers' own state; a pre-RoPE spec
        gets the model's rotary embedding (`rope`), codecs with learnable state the attached model's
        (`codecs(layer)`: K's and V's codec). An attached model binds the cache it decodes with at its
        first forward (and every forward after: then this returns at once)."""
        if config is self.bound_to and (rope is None or self.rope is not None):
            return
        self.codecs = self.codecs or codecs
        types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        if self.layer_types is not None and types != self.layer_types:
            raise ValueError(f"this QuantizedKVCache holds layers {self.layer_types}, not those of a model with {types}")
        if self.layers and self.layer_types is None:
            raise ValueError("bind a QuantizedKVCache to a model before it holds any tokens")
        other = sorted({t for t in types if t not in (*ATTENTION_LAYERS, *STATE_LAYERS)})
        if other:
            raise ValueError(f"QuantizedKVCache does not support {other} layers yet (it compresses {ATTENTION_LAYERS} "
                             f"layers and keeps the state of {tuple(STATE_LAYERS)} layers)")
        self.layer_types, self.rope, self.bound_to = types, self.rope or rope, config
        if self.layers or (self.spec.placement == "pre_rope" and self.rope is None):
            return  # laid out already, or waiting for the model's rotary embedding
        self.layers = [self._layer(i) if t in ATTENTION_LAYERS else STATE_LAYERS[t](**kw)
                       for i, (t, kw) in enumerate(zip(types, kwargs))]

    def _layer(self, idx: int) -> QuantizedKVLayer | EvictingKVLayer | LatentKVLayer:
        if getattr(self.bound_to and self.bound_to.get_text_config(decoder=True), "kv_lora_rank", None):
            return LatentKVLayer(self.spec, idx)
        if self.spec.eviction is not None and (self.layer_types is None or self.layer_types[idx] != "sliding_attention"):
            return EvictingKVLayer(self.spec, idx)  # (a sliding layer attends within its window, evicting nothing)
        if self.spec.placement == "pre_rope" and self.rope is None:
            raise ValueError("a QuantizedKVCache of a pre_rope spec rotates keys with the model's rotary embedding: "
                             "decode through the attached model (it binds the cache), not by calling update by hand")
        layer = JointKVLayer if self.spec.joint_kv else QuantizedKVLayer
        return layer(self.spec, idx, self.rope, self.codecs(idx) if self.codecs else None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.unviewed is not None:
            raise ValueError(
                f"QuantizedKVCache: layer {self.unviewed} attended to this cache without kvtrain's view, so its prefill "
                "saw full-precision K/V that training never saw; attach(model, spec) (or use kvtrain.attached) "
                "before decoding with it")
        while len(self.layers) <= layer_idx:
            self.layers.append(self._layer(len(self.layers)))
        if not isinstance(self.layers[layer_idx], KV_LAYERS):
            raise ValueError(f"layer {layer_idx} is a {self.layer_types[layer_idx]} layer: it holds no keys and values")
        by_model = bool(args or kwargs)  # a model's attention passes its cache kwargs; filling it by hand does not
        if by_model and not isinstance(self.layers[layer_idx], LatentKVLayer):  # (which hands back the view itself)
            self.unviewed = layer_idx
        model_kwargs = kwargs.get("kwargs") or (args[0] if args and isinstance(args[0], dict) else {})
        return self.layers[layer_idx].update(key_states, value_states, keep_arrived=by_model,
                                             positions=model_kwargs.get("position_ids"))

    def viewed(self, layer: int, spec: Spec) -> None:
        """Called by the attached attention with the model's spec: the cache must hold that spec."""
        if spec is not self.checked and spec != self.spec:
            raise ValueError(f"the model is attached with {spec} but decodes with a QuantizedKVCache of {self.spec}: "
                             "use QuantizedKVCache(attached_spec(model))")
        self.checked = spec  # (comparing nested specs costs ~2 us, at every layer of every step)
        if layer == self.unviewed:
            self.unviewed = None

    def nbytes(self) -> int:
        """Every tensor held: the compressed layers' tiers and the other layers' own states."""
        return sum(layer.nbytes() if isinstance(layer, KV_LAYERS) else _state_nbytes(layer) for layer in self.layers)


ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention")
# layers without per-token keys and values keep transformers' own cache layer
STATE_LAYERS = {"conv": LinearAttentionLayer, "linear_attention": LinearAttentionLayer, "dummy": DummyLayer}


def _state_nbytes(layer: object) -> int:
    states = [*getattr(layer, "conv_states", {}).values(), *getattr(layer, "recurrent_states", {}).values()]
    return _nbytes(*states)
