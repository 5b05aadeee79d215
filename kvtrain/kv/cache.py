"""QuantizedKVCache: a `transformers.Cache` that stores K/V packed, in the tiers of the spec's window rule.

Per layer it holds, for each of K and V, the sink tokens (full precision), the quantized tokens
(packed codes + per-group scale and zero point) and a full-precision tail (the window plus any
incomplete unit). A token is quantized once, when the rule (`kvtrain.kv.window`) moves it out of the
window, and never re-quantized.
`update` hands attention the tokens as stored (dequantized where compressed) before compressing the
units the new tokens complete, so the attached attention function (`kvtrain.kv.attention`) can give
every query of the chunk its exact view. Use it on an attached model:

    attach(model, spec)
    model.generate(ids, past_key_values=QuantizedKVCache(spec), ...)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvtrain.kv.spec import KVQuantSpec, TensorQuant
from kvtrain.kv.window import WindowRule
from kvtrain.quant.packing import pack, unpack
from kvtrain.quant.uniform import QuantizedTensor, dequantize, quantize


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PackedTokens:
    """The quantized tokens of K or V in one layer: packed codes, scales and zero points (in the
    spec's scale_dtype)."""

    def __init__(self, quant: TensorQuant):
        self.quant = quant
        self.axis = 2 if quant.axis == "channel" else 3  # of (B, H, T, D)
        self.cat_dim = 3 if quant.axis == "channel" else 2  # the token dim of the grouped layout
        self.codes = self.scale = self.zero = None
        self.n = 0

    def append(self, x: torch.Tensor) -> None:
        """Quantize x (B, H, n, D), n a whole number of units, and store it packed."""
        q = self.quant
        try:
            qt = quantize(x, q.bits, q.group_size, self.axis, q.symmetric, q.clip_ratio, q.param_dtype)
        except ValueError as e:
            raise ValueError(f"QuantizedKVCache: {e}") from e
        packed = pack(qt.codes, q.bits)
        if self.codes is None:
            self.codes, self.scale, self.zero = packed, qt.scale, qt.zero
        else:
            self.codes = torch.cat([self.codes, packed], self.cat_dim)
            self.scale = torch.cat([self.scale, qt.scale], self.cat_dim)
            self.zero = torch.cat([self.zero, qt.zero], self.cat_dim)
        self.n += x.shape[2]
        self.shape, self.dtype = (*x.shape[:2], self.n, x.shape[3]), x.dtype

    def dequantize(self) -> torch.Tensor:
        codes = unpack(self.codes, self.quant.bits, self.quant.group_size)
        qt = QuantizedTensor(codes, self.scale, self.zero, self.quant.bits, self.axis, torch.Size(self.shape),
                             self.quant.symmetric, self.dtype)
        return dequantize(qt)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.codes is not None:
            self.codes, self.scale, self.zero = fn(self.codes), fn(self.scale), fn(self.zero)
            self.shape = (self.codes.shape[0], *self.shape[1:])

    def nbytes(self) -> int:
        return _nbytes(self.codes, self.scale, self.zero)


class CompressedTensor:
    """K or V of one layer in the window rule's tiers: full-precision sinks, quantized tokens, and a
    full-precision tail (the window plus any incomplete unit)."""

    def __init__(self, quant: TensorQuant | None, rule: WindowRule | None):
        self.quant, self.rule = quant, rule
        self.packed = PackedTokens(quant) if quant is not None else None
        self.sinks: torch.Tensor | None = None
        self.tail: torch.Tensor | None = None

    def update(self, new: torch.Tensor) -> torch.Tensor:
        """Append `new`; return all tokens as stored before this call's compression, plus `new`."""
        stored = [self.packed.dequantize()] if self.packed is not None and self.packed.n else []
        tail = new if self.tail is None else torch.cat([self.tail, new], dim=-2)
        view = torch.cat([*([self.sinks] if self.sinks is not None else []), *stored, tail], dim=-2)
        self.tail = tail
        if self.quant is not None:
            self._compress(view.shape[-2])
        return view

    def _compress(self, total: int) -> None:
        held = 0 if self.sinks is None else self.sinks.shape[-2]
        if held < self.rule.start(total):  # the first tokens become sinks for good
            take = self.rule.start(total) - held
            head = self.tail[..., :take, :]
            self.sinks = head.clone() if self.sinks is None else torch.cat([self.sinks, head], dim=-2)
            self.tail, held = self.tail[..., take:, :].clone(), held + take
        move = self.rule.end(total) - held - self.packed.n
        if move > 0:
            self.packed.append(self.tail[..., :move, :])
            self.tail = self.tail[..., move:, :].clone()  # do not keep the whole old tail alive

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.packed is not None:
            self.packed.map(fn)
        for name in ("sinks", "tail"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def nbytes(self) -> int:
        return (self.packed.nbytes() if self.packed is not None else 0) + _nbytes(self.sinks, self.tail)


class QuantizedKVLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, spec: KVQuantSpec, layer: int):
        super().__init__()
        self.spec, self.layer = spec, layer
        keys, values = spec.keys(layer), spec.values(layer)
        self.k, self.v = CompressedTensor(keys, spec.window(keys)), CompressedTensor(values, spec.window(values))
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # here, not when the token is quantized 100 steps later; one check (one host sync) per layer and step
        if not (torch.isfinite(key_states).all() & torch.isfinite(value_states).all()):
            name = "values" if torch.isfinite(key_states).all() else "keys"
            raise ValueError(f"QuantizedKVCache: layer {self.layer} got non-finite {name} (NaN or inf) for cache positions "
                             f"{self.length}..{self.length + key_states.shape[-2] - 1}; the model's activations overflowed")
        self.length += key_states.shape[-2]
        return self.k.update(key_states), self.v.update(value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map(lambda t: t[indices, ...])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.k.map(fn)
        self.v.map(fn)

    def offload(self):
        self.map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self.map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.__init__(self.spec, self.layer)

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


class QuantizedKVCache(Cache):
    """A KV cache compressed by `spec` (a KVQuantSpec or preset name); layers are created lazily.

    `nbytes()` is the real storage of every tensor it holds: packed codes, scales, zero points and
    the full-precision tails.
    """

    def __init__(self, spec: KVQuantSpec | str = "kivi2"):
        self.spec = KVQuantSpec.resolve(spec)
        self.unviewed: int | None = None  # the layer whose K/V were handed out and not yet seen by the view
        super().__init__(layers=[])

    def _layer(self, idx: int) -> QuantizedKVLayer:
        return QuantizedKVLayer(self.spec, idx)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.unviewed is not None:
            raise ValueError(
                f"QuantizedKVCache: layer {self.unviewed} attended to this cache without kvtrain's view, so its prefill "
                "saw full-precision K/V that training never saw; attach(model, spec) (or use kvtrain.attached) "
                "before decoding with it")
        while len(self.layers) <= layer_idx:
            self.layers.append(self._layer(len(self.layers)))
        if args or kwargs:  # a model's attention passes its cache kwargs; filling the cache by hand does not
            self.unviewed = layer_idx
        return self.layers[layer_idx].update(key_states, value_states)

    def viewed(self, layer: int, spec: KVQuantSpec) -> None:
        """Called by the attached attention with the model's spec: the cache must hold that spec."""
        if spec != self.spec:
            raise ValueError(f"the model is attached with {spec} but decodes with a QuantizedKVCache of {self.spec}: "
                             "use QuantizedKVCache(attached_spec(model))")
        if layer == self.unviewed:
            self.unviewed = None

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
