"""attach/detach: make any HF decoder's attention see K/V exactly as the compressed cache would.

kvtrain registers an attention function ("kvtrain") in transformers' AttentionInterface and switches
the model to it; no model code is copied. Per layer, the function builds the view of K and V
(`kvtrain.kv.view`) and, when queries of one chunk see different tokens compressed (training,
prefill), runs attention over the window rule's tiers (`kvtrain.kv.window`), each query reading each
token from the tier the cache held it in when that query was decoded. When all queries see the same
view (single-token decode), it runs the model's usual SDPA on the mixed tensors. Gradients flow
through the codecs' `simulate` (straight-through, or the codec's own). Under a spec with eviction,
attention goes through `kvtrain.kv.eviction.attend` instead, in training and over the evicting cache.

A forward pre-hook records the `past_key_values` of each call, so the function knows whether the
tokens it receives are already as stored (a `QuantizedKVCache` hands back the decoded payloads of
everything it holds compressed) or all full precision (training, or any other cache); it binds a
`QuantizedKVCache` to the model's layer types (and rotary embedding, pre-RoPE) and starts the
forward's left-padding reading afresh (`kvtrain.kv.window.left_pads`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvtrain.kv.cache import QuantizedKVCache
from kvtrain.kv.codecs import Codec
from kvtrain.kv.eviction import Survivors, attend
from kvtrain.kv.latent import check_latent_spec, latent_hooks
from kvtrain.kv.placement import KeysFirst, PreRope, pre_rope_of
from kvtrain.kv.selectors import Selector
from kvtrain.kv.spec import Spec, codec_state_file, resolve_spec
from kvtrain.kv.view import compressed_view
from kvtrain.kv.window import WindowRule, left_pads, row_positions

ATTN_NAME = "kvtrain"


@dataclass
class AttachState:
    spec: Spec
    original_attn: str
    text_key: str | None  # the text decoder's sub-config in a multimodal model (None: the model is the decoder)
    rope: PreRope | None = None  # the model's rotary embedding, for a pre-RoPE spec
    pads: torch.Tensor | None = None  # the left padding of the forward in flight, once its first layer read it
    pads_known: bool = False
    dead: tuple[torch.Tensor, int, torch.Tensor | None] | None = None  # (mask, total, dead queries) of the forward
    hook: Any = None
    cache: Any = None  # the past_key_values of the forward in flight
    modules: list[nn.Module] = field(default_factory=list)
    layers: dict[int, tuple] = field(default_factory=dict)  # per layer: codec and window rule of K, of V
    states: dict[int, nn.ModuleDict] = field(default_factory=dict)  # per layer: learnable codec state
    selector: Selector | None = None  # the spec's eviction selector
    retention: Codec | None = None  # and the codec of the evicted tokens it keeps (None: dropped)
    prompts: list[int] | None = None  # each row's prompt length, for eviction at the prompt's end (training)
    latent_hooks: list = field(default_factory=list)  # a latent cache's (kvtrain.kv.latent): the view of the latent
    # calibration's (kvtrain.kv.calibrate): (module, query, position_ids) of each viewed attention call
    query_observer: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], None] | None = None

    def plan(self, layer: int) -> tuple[Codec | None, WindowRule | None, Codec | None, WindowRule | None]:
        """(key codec, key rule, value codec, value rule) of a layer, worked out at its first forward;
        codecs with learnable state read the layer's."""
        if layer not in self.layers:
            own = self.states.get(layer, {})
            keys, values = (c.bound(own[name]) if name in own else c
                            for name, c in (("key", self.spec.keys(layer)), ("value", self.spec.values(layer))))
            self.layers[layer] = (keys, self.spec.window(keys), values, self.spec.window(values))
        return self.layers[layer]

    def selector_at(self, layer: int) -> Selector:
        """The eviction selector of a layer, reading the layer's learned state (a learned selector's)."""
        own = self.states.get(layer, {})
        return self.selector.bound(own["selector"]) if "selector" in own else self.selector

    def codecs(self, layer: int) -> tuple[Codec | None, Codec | None]:
        """The codecs of K and V at a layer, as the view uses them (for the cache it decodes with)."""
        keys, _, values, _ = self.plan(layer)
        return keys, values


@dataclass
class TensorView:
    """K or V of one layer as attention needs it: its view (`hat`: the compressed tier as the cache
    hands it back), the window rule saying which query sees which tokens compressed, and the tokens
    as they arrived (`full`, built only when a chunk's queries see different views)."""

    hat: torch.Tensor
    rule: WindowRule | None  # None: the tensor stays in full precision
    arrived: Callable[[], torch.Tensor]
    pads: torch.Tensor | None = None  # each row's left padding (`kvtrain.kv.window.left_pads`)

    @cached_property
    def full(self) -> torch.Tensor:
        return self.arrived()

    def seen(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rule is None:
            return positions + 1, positions + 1  # an empty compressed tier at the top
        return self.rule.seen(positions, self.pads)

    def uniform(self, past: int, q_len: int) -> bool:
        return self.rule is None or self.rule.uniform(past, q_len, self.pads)

    def mask(self, past: int, q_len: int, total: int, device) -> torch.Tensor:
        return self.rule.mask(past, q_len, total, device, self.pads)


def _prepared(x: torch.Tensor, codec: Codec | None, rule: WindowRule | None, stored, pads: torch.Tensor | None,
              rope: PreRope | None = None, positions: torch.Tensor | None = None) -> TensorView:
    """The view of K or V. From a QuantizedKVCache (`stored`), x is already the view of the chunk's
    last query and the cache keeps what it compressed as it arrived; otherwise x is all full
    precision and the units the rule compresses by the chunk's end are simulated here (around the
    rotary embedding for pre-RoPE keys; row by row when rows are left-padded)."""
    if codec is None:
        return TensorView(x, None, lambda: x)
    if stored is not None:
        return TensorView(x, rule, lambda: stored.take_arrived(x), pads)
    if pads is None:
        return TensorView(compressed_view(x, codec, rule, rope, positions), rule, lambda: x)
    rows = [compressed_view(x[b:b + 1], codec, rule.shifted(pad), rope, row_positions(positions, b))
            for b, pad in enumerate(pads.tolist())]
    return TensorView(torch.cat(rows), rule, lambda: x, pads)


def _prepared_jointly(key: torch.Tensor, value: torch.Tensor, codec: Codec | None, rule: WindowRule | None, stored,
                      pads: torch.Tensor | None, rope: PreRope | None, positions: torch.Tensor | None
                      ) -> tuple[TensorView, TensorView]:
    """The views of K and V that share one latent (`KVSpec.joint_kv`): both side by side along the head
    axis, keys first, as the cache's JointKVLayer holds them, prepared as one tensor and split."""
    heads = key.shape[1]
    both = _prepared(torch.cat([key, value], dim=1), codec, rule, stored and stored.k, pads,
                     rope and KeysFirst(rope.rotary, rope.apply), positions)
    return tuple(TensorView(hat, rule, lambda part=part: both.full.split(heads, dim=1)[part], pads)
                 for part, hat in enumerate(both.hat.split(heads, dim=1)))


def _pads(state: AttachState, position_ids: torch.Tensor | None, past: int, q_len: int) -> torch.Tensor | None:
    """`left_pads` of this forward's positions, worked out by its first attention layer for all of them
    (it reads the positions on the host); the model's forward pre-hook starts each forward afresh."""
    if not state.pads_known:
        state.pads, state.pads_known = left_pads(position_ids, past, q_len), True
    return state.pads


def kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    state: AttachState = module.kvtrain_state
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{type(module).__name__} uses attention sinks (s_aux), which kvtrain's KV view does not support")
    if state.selector is not None and kwargs.get("sliding_window") is None:  # (a sliding layer holds its window)
        return _evicting_attention(module, state, query, key, value, module.scaling if scaling is None else scaling,
                                   dropout, **kwargs)
    spec, layer = state.spec, module.layer_idx
    q_len, total = query.shape[-2], key.shape[-2]
    stored = None
    if isinstance(state.cache, QuantizedKVCache):
        state.cache.viewed(layer, spec)
        stored = state.cache.layers[layer]
    scaling = module.scaling if scaling is None else scaling
    if stored is not None and q_len == 1 and kwargs.get("softcap") is None:
        # a decode step: its one query sees every token as the cache holds it, which is what it handed over
        out, probs = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    else:
        attention_mask = _additive(attention_mask, query.dtype)
        out, probs = _viewed_attention(module, state, stored, query, key, value, attention_mask, scaling, dropout,
                                       **kwargs)
    if stored is not None:
        stored.forget_arrived()  # attention has its view: the cache holds only its tiers again
    return _zero_padding_queries(out, _dead_queries(state, attention_mask, total)), probs


def _evicting_attention(module, state: AttachState, query, key, value, scaling, dropout, **kwargs
                        ) -> tuple[torch.Tensor, None]:
    """Attention under token eviction (`kvtrain.kv.eviction.attend`): over what an evicting cache
    holds and the forward's new tokens, or, in training, over the whole sequence with the decisions
    that cache would make."""
    name, q_len, layer = type(module).__name__, query.shape[-2], None
    selector = state.selector_at(module.layer_idx)
    if isinstance(state.cache, QuantizedKVCache):
        state.cache.viewed(module.layer_idx, state.spec)  # the cache's spec is the attached one: its layers evict
        layer = state.cache.layers[module.layer_idx]
    past = key.shape[-2] - q_len if layer is None else layer.seen - q_len
    pads, policy = left_pads(kwargs.get("position_ids"), past, q_len), state.spec.eviction
    dropout = dropout if module.training else 0.0
    if layer is not None:
        return layer.attend(query, selector, scaling, kwargs.get("softcap"), pads), None
    if past:
        raise ValueError(f"{name}: eviction decides from the attention of the queries as they arrive, so a "
                         f"{type(state.cache).__name__} holding {past} tokens cannot replay it: decode with "
                         "QuantizedKVCache(spec) of the attached spec")
    softcap = kwargs.get("softcap")
    key, value = (t if codec is None else codec.simulate(t)  # quantized as each token arrives, as the cache encodes it
                  for codec, t in ((state.spec.keys(module.layer_idx), key), (state.spec.values(module.layer_idx), value)))
    gated = policy.straight_through > 0 and torch.is_grad_enabled()  # the selection's gradient, in training
    if policy.interval:
        held = Survivors.empty(key, value, selector, gated, state.retention, merge=policy.merge, pads=pads)
        return attend(query, key, value, held, policy, selector, scaling, softcap, dropout)[0], None
    if state.prompts is None or len(state.prompts) != query.shape[0]:
        raise ValueError(f"{name}: eviction at the end of the prompt (interval 0) needs each row's prompt length in "
                         f"training: batches with a loss_mask (KVQuantCallback reads it) or set_prompt_lengths(model, "
                         f"lengths); got {state.prompts} for {query.shape[0]} rows")
    if len(set(state.prompts)) == 1:  # one call for the batch (a task's prompts often share a length)
        rows = [(query, key, value, state.prompts[0], pads)]
    else:
        rows = [(query[b:b + 1], key[b:b + 1], value[b:b + 1], p, None if pads is None else pads[b:b + 1])
                for b, p in enumerate(state.prompts)]
    return torch.cat([attend(q, k, v, Survivors.empty(k, v, selector, gated, state.retention, merge=policy.merge,
                                                      pads=row_pads),
                             policy, selector, scaling, softcap, dropout, prompt)[0]
                      for q, k, v, prompt, row_pads in rows]), None


def set_prompt_lengths(model: nn.Module, lengths: list[int] | torch.Tensor | None) -> None:
    """Each row's prompt length for the training forwards that follow, under an eviction spec that
    decides at the end of the prompt (interval 0): the cache decides after the prompt's forward, the
    training view at these positions (KVQuantCallback sets them from each batch's loss_mask)."""
    state: AttachState | None = getattr(hf_model(model), "kvtrain_state", None)
    if state is None:
        raise ValueError("attach an eviction spec before setting prompt lengths")
    state.prompts = None if lengths is None else [int(n) for n in lengths]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (`kv_mask` gives one query sdpa's) as the additive float mask the tiers index."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, torch.tensor(0.0, dtype=dtype, device=mask.device), torch.finfo(dtype).min)


def _viewed_attention(module, state: AttachState, stored, query, key, value, attention_mask, scaling, dropout,
                      **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of a chunk of queries over the view of K and V (training, prefill): one SDPA call
    when every query sees the same view, the tiers otherwise, eager attention to softcap."""
    q_len, past = query.shape[-2], key.shape[-2] - query.shape[-2]
    kq, k_rule, vq, v_rule = state.plan(module.layer_idx)
    position_ids = kwargs.get("position_ids")
    if state.rope is not None and stored is None and position_ids is None:
        raise ValueError(f"{type(module).__name__} passed no position_ids to attention; pre-RoPE keys need them")
    pads = _pads(state, position_ids, past, q_len)
    if state.query_observer is not None:
        state.query_observer(module, query, position_ids)
    if state.spec.joint_kv:
        keys, values = _prepared_jointly(key, value, kq, k_rule, stored, pads, state.rope, position_ids)
    else:
        keys = _prepared(key, kq, k_rule, stored and stored.k, pads, state.rope, position_ids)
        values = _prepared(value, vq, v_rule, stored and stored.v, pads)
    if kwargs.get("softcap") is not None:  # SDPA cannot softcap: exact eager attention
        return _per_query_attention(module, query, keys, values, attention_mask, scaling, dropout, past,
                                    kwargs["softcap"])
    if keys.uniform(past, q_len) and values.uniform(past, q_len):
        return sdpa_attention_forward(module, query, keys.hat, values.hat, attention_mask, dropout=dropout,
                                      scaling=scaling)
    positions = torch.arange(past, past + q_len, device=query.device)
    return _tiered_attention(module, query, _tiers(keys, values, positions), attention_mask, scaling, dropout,
                             positions), None


QUERY_CHUNK = 128

Tier = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (K source, V source, lo, hi)


def _tiers(keys: TensorView, values: TensorView, positions: torch.Tensor) -> list[Tier]:
    """For each query position p, the tokens [lo(p), hi(p)) it reads from each pair of sources, as
    the cache holds them when p is decoded: sinks (full precision), both compressed, one of them
    compressed (the tensor whose tier reaches further), and the full-precision window."""
    (ks, ke), (vs, ve) = keys.seen(positions), values.seen(positions)
    start, lo, hi = torch.minimum(ks, vs), torch.minimum(ke, ve), torch.maximum(ke, ve)
    return [
        (keys.full, values.full, torch.zeros_like(start), start),
        (keys.hat, values.hat, start, lo),
        (keys.hat, values.full, lo, ke),  # empty where the values' tier reaches as far
        (keys.full, values.hat, lo, ve),  # empty where the keys' tier reaches as far
        (keys.full, values.full, hi, positions + 1),
    ]


def _tiered_attention(module, query, tiers: list[Tier], attention_mask, scaling, dropout, positions) -> torch.Tensor:
    """Fused SDPA where each query reads each token from the tier the cache held it in at that query.

    The tiers of a query partition its tokens [0, p], so concatenating each tier's K/V along the key
    axis and masking each query to its own [lo, hi) gives every (query, token) pair exactly once: one
    SDPA call per chunk of queries computes the exact view without materializing attention weights.
    Chunking keeps the tiers short: a chunk only needs the columns its own queries read.
    """
    chunks = []
    for c0 in range(0, query.shape[-2], QUERY_CHUNK):
        c1 = min(query.shape[-2], c0 + QUERY_CHUNK)
        spans = [_span(lo[..., c0:c1], hi[..., c0:c1]) for *_, lo, hi in tiers]
        k = torch.cat([t[0][..., a:b, :] for t, (a, b) in zip(tiers, spans)], dim=-2)
        v = torch.cat([t[1][..., a:b, :] for t, (a, b) in zip(tiers, spans)], dim=-2)
        mask = _tier_mask(spans, [(lo[..., c0:c1], hi[..., c0:c1]) for *_, lo, hi in tiers], attention_mask, c0,
                          c1 - c0, query.dtype)
        chunks.append(F.scaled_dot_product_attention(
            query[..., c0:c1, :], k, v, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
            enable_gqa=True,
        ))
    return torch.cat(chunks, dim=-2).transpose(1, 2).contiguous()


def _span(lo: torch.Tensor, hi: torch.Tensor) -> tuple[int, int]:
    """The columns a chunk's queries read from one tier (none when they read nothing from it)."""
    lo, hi = torch.broadcast_tensors(lo, hi)  # (n,) or (B, n) per row
    read = hi > lo
    if not read.any():
        return 0, 0
    return int(lo[read].min()), int(hi[read].max())


def _tier_mask(spans, bounds, attention_mask, c0, n, dtype) -> torch.Tensor:
    """Additive mask (B or 1, 1, n, columns) for the concatenated tiers of one query chunk; bounds are
    (n,) per query, or (B, n) per row and query when rows are left-padded."""
    device = bounds[0][0].device
    cols = [torch.arange(a, b, device=device) for a, b in spans]
    allowed = torch.cat([(c >= lo[..., None]) & (c < hi[..., None]) for c, (lo, hi) in zip(cols, bounds)], dim=-1)
    if allowed.dim() == 3:
        allowed = allowed[:, None]  # (B, 1, n, columns)
    if attention_mask is None:
        return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    base = attention_mask[:, :, c0:c0 + n].index_select(-1, torch.cat(cols))
    return torch.where(allowed, base, torch.finfo(base.dtype).min)


def _zero_padding_queries(out: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """Zero the output of queries that may attend to nothing (left padding).

    Softmax over a fully masked row is uniform over however many keys the chunk has, so a padding
    token's output, and with it its K/V in the next layer, would depend on how the sequence was cut
    into chunks. Those K/V share per-channel quantization groups with real tokens, so they must be
    the same in training and in every decode schedule: zero makes them a function of the token alone.
    """
    return out if dead is None else out.masked_fill(dead.transpose(1, 2), 0)


def _dead_queries(state: AttachState, attention_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """(B, 1, q, 1) True where a query may attend to nothing, None when none may: read once per mask
    (the layers of a forward share it; the model's forward pre-hook starts afresh)."""
    if attention_mask is None:
        return None
    if state.dead is None or state.dead[0] is not attention_mask or state.dead[1] != total:
        mask = attention_mask[..., :total]
        dead = ~mask.any(-1, keepdim=True) if mask.dtype == torch.bool else (
            mask.amax(-1, keepdim=True) <= torch.finfo(mask.dtype).min / 2)
        state.dead = (attention_mask, total, dead if bool(dead.any()) else None)
    return state.dead[2]


def _per_query_attention(module, query, keys: TensorView, values: TensorView, attention_mask, scaling, dropout, past,
                         softcap):
    """Eager attention where query i sees token j compressed iff the cache would hold it so at i."""
    groups, q_len, total = module.num_key_value_groups, query.shape[-2], keys.full.shape[-2]
    scores = query @ repeat_kv(keys.full, groups).transpose(2, 3)
    if keys.rule is not None:
        seen = keys.mask(past, q_len, total, query.device)
        scores = torch.where(seen, query @ repeat_kv(keys.hat, groups).transpose(2, 3), scores)
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., :total]
    # softmax in at least fp32 (bf16 rows would lose mass), never below the model's dtype: a float64
    # mask's -1.8e308 cast to fp32 is -inf, and a fully padded row of -inf is NaN
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if values.rule is None:
        out = probs @ repeat_kv(values.full, groups)
    else:
        m = values.mask(past, q_len, total, query.device)
        out = (probs * ~m) @ repeat_kv(values.full, groups) + (probs * m) @ repeat_kv(values.hat, groups)
    return out.transpose(1, 2).contiguous(), probs


ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, kv_attention)


def kv_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask of a forward: sdpa's for a decode step (None when its query sees every key, as plain
    SDPA then runs fastest), eager's additive float mask for a chunk, whose tiers index it."""
    q_length = kwargs["q_length"] if "q_length" in kwargs else args[1]
    return sdpa_mask(*args, **kwargs) if q_length == 1 else eager_mask(*args, **kwargs)


ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, kv_mask)


def hf_model(model: nn.Module) -> PreTrainedModel:
    """The outermost transformers PreTrainedModel inside `model` (a PeftModel, a LightningModule, ...)."""
    if isinstance(model, PreTrainedModel):
        return model
    found = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if found is None:
        raise TypeError(f"{type(model).__name__} holds no transformers PreTrainedModel; kvtrain attaches to HF decoders")
    return found


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not mods:
        raise ValueError(
            f"{type(model).__name__}: found no attention modules with `layer_idx` and `num_key_value_groups`, "
            "so kvtrain cannot hook its attention (it supports decoders built on transformers' attention interface)"
        )
    return mods


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _text_config_key(config, text_config) -> str | None:
    """The sub-config holding a multimodal model's text decoder; None when the model is the decoder."""
    if text_config is config:
        return None
    return next(key for key in config.sub_configs if getattr(config, key, None) is text_config)


def _for_text(implementation: str, text_key: str | None) -> str | dict[str, str]:
    """An attention implementation for the text decoder only: a vision tower keeps its own."""
    return implementation if text_key is None else {text_key: implementation}


def _capture_cache(state: AttachState):
    def hook(module, args, kwargs):
        # transformers 5 renamed the argument to `cache`; generate and older callers still pass past_key_values
        state.cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state.pads_known, state.dead = False, None
        if isinstance(state.cache, QuantizedKVCache):
            # a hybrid model's non-attention layers keep their own state; pre-RoPE keys need the rotary
            # embedding, learnable codecs the layer's state
            state.cache.bind(module.config, state.rope, state.codecs)

    return hook


def attach(model: nn.Module, spec: Spec | str, codec_state: str | Path | None = None) -> Spec:
    """Make `model`'s attention see K/V as a cache compressed by `spec` would hand them back.

    Re-attaching replaces the previous spec. Returns the resolved spec. `codec_state`: a
    kv_codec_state.safetensors to load into the spec's learnable codec state (`kvtrain calibrate`
    and exports write one), by default the one beside `spec` when it names a folder or spec file.
    Without one, a spec given as an object re-attaches the state this model learned under it (kept
    by `detach`), while a spec named by a string starts where its codecs start: a saved spec means
    what its folder holds, whatever the model attached before.
    """
    source, spec = spec, resolve_spec(spec)
    target = hf_model(model)
    if getattr(target, "kvtrain_state", None) is not None:
        detach(target)
    config = target.config.get_text_config(decoder=True)
    name = type(target).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; kvtrain attaches to decoder-only models")
    latent = getattr(config, "kv_lora_rank", None)  # DeepSeek-V2/V3, ...: the cache holds a latent (kvtrain.kv.latent)
    if latent:
        check_latent_spec(spec, config.num_hidden_layers, latent, name)
    else:
        spec.check_model(config.num_hidden_layers, _head_dim(config), name)
    mods = attention_modules(target)
    if spec.eviction is not None and all(_slides(m) for m in mods):
        raise ValueError(f"every attention layer of {name} attends within a sliding window, which eviction leaves "
                         f"to the window: this spec's eviction would apply to no layer")
    text_key = _text_config_key(target.config, config)
    rope = pre_rope_of(target, mods[0], config) if spec.placement == "pre_rope" else None
    states = _codec_states(target, mods, spec, _head_dim(config), reuse=not isinstance(source, str))
    state = AttachState(spec, config._attn_implementation or "sdpa", text_key, rope, modules=mods, states=states,
                        selector=None if spec.eviction is None else spec.eviction.build(),
                        retention=None if spec.eviction is None else spec.eviction.retention())
    if latent:  # the latent is compressed before kv_b_proj expands it: attention itself stays the model's
        state.latent_hooks = latent_hooks(state, mods)
    else:
        try:
            target.set_attn_implementation(_for_text(ATTN_NAME, text_key))
        except (ValueError, ImportError) as e:
            raise ValueError(f"{name} does not let kvtrain set its attention implementation: {e}") from e
    for m in mods:
        m.kvtrain_state = state
    state.hook = target.register_forward_pre_hook(_capture_cache(state), with_kwargs=True)
    target.kvtrain_state = state
    codec_state = codec_state or codec_state_file(source)
    if codec_state is not None:
        load_codec_state(target, load_file(str(codec_state)), source=codec_state)
    return spec


CODEC_STATE = "kv_codec_state"  # the attribute of an attention module holding its learnable codec state


def _codec_states(target: PreTrainedModel, mods: list[nn.Module], spec: Spec, head_dim: int, reuse: bool = True
                  ) -> dict[int, nn.ModuleDict]:
    """Each attention layer's learnable codec state (`Codec.make_state`, and a learned eviction
    selector's, `Selector.make_state`, under "selector"), registered on its module as
    `kv_codec_state`, so it trains, checkpoints and shards with the weights; with `reuse`, what an
    earlier attach of the same spec learned on this model (detach keeps it aside) is attached again."""
    kept = getattr(target, "_kvtrain_codec_states", None)
    if reuse and kept is not None and kept[0] == spec:
        states = kept[1]
    else:
        states = {}
        for m in mods:
            made = {name: s for name, codec in (("key", spec.keys(m.layer_idx)), ("value", spec.values(m.layer_idx)))
                    if codec is not None and (s := _state(codec, m, name, head_dim, spec.joint_kv)) is not None}
            evicts = spec.eviction is not None and not _slides(m)  # (a sliding layer evicts nothing: no unused logits)
            if evicts and (s := spec.eviction.build().make_state(head_dim, _kv_heads(m))) is not None:
                made["selector"] = s  # a learned selector's logits
            if made:
                weight = next(m.parameters(), None)
                states[m.layer_idx] = nn.ModuleDict(made).to(weight.device if weight is not None else "cpu")
    for m in mods:
        if m.layer_idx in states:
            m.add_module(CODEC_STATE, states[m.layer_idx])
    return states


def _state(codec: Codec, module: nn.Module, tensor: str, head_dim: int, joint: bool = False) -> nn.Module | None:
    """`codec.make_state` for the key or value tensor of an attention layer, given its projection;
    `joint`: for keys and values side by side (`KVSpec.joint_kv`), given both projections stacked."""
    kv_heads = _kv_heads(module)
    if not joint:
        return codec.make_state(head_dim, kv_heads, projection(module, tensor, head_dim, kv_heads))
    weights = [projection(module, t, head_dim, kv_heads) for t in ("key", "value")]
    if any(w is None for w in weights):
        return codec.make_state(head_dim, 2 * kv_heads, None)  # (its error names the layouts it knows)
    if weights[0].shape != weights[1].shape:
        raise ValueError(f"joint_kv=True holds keys and values side by side, but {type(module).__name__}'s key and "
                         f"value projections differ in shape ({tuple(weights[0].shape)} vs {tuple(weights[1].shape)})")
    return codec.make_state(head_dim, 2 * kv_heads, torch.cat(weights))


def _slides(module: nn.Module) -> bool:
    """Whether an attention layer attends within a sliding window (Gemma 2/3's sliding layers)."""
    return get_layer_types_and_kwargs(module.config)[0][module.layer_idx] == "sliding_attention"


def _kv_heads(module: nn.Module) -> int:
    return module.config.num_attention_heads // module.num_key_value_groups


def projection(module: nn.Module, tensor: str, head_dim: int, kv_heads: int) -> torch.Tensor | None:
    """The weight whose output is a layer's keys or values (kv_heads * head_dim rows): k_proj / v_proj,
    or their rows of Phi-3's fused qkv_proj (queries, keys, values stacked); None for other layouts."""
    own = getattr(module, "k_proj" if tensor == "key" else "v_proj", None)
    if isinstance(own, nn.Linear):
        return own.weight
    fused = getattr(module, "qkv_proj", None)
    if not isinstance(fused, nn.Linear):
        return None
    start = module.config.num_attention_heads * head_dim + (0 if tensor == "key" else kv_heads * head_dim)
    return fused.weight[start:start + kv_heads * head_dim]


def detach(model: nn.Module) -> None:
    """Undo `attach`: the model computes exactly what it did before (bit for bit)."""
    target = hf_model(model)
    state: AttachState | None = getattr(target, "kvtrain_state", None)
    if state is None:
        return
    state.hook.remove()
    for hook in state.latent_hooks:
        hook.remove()
    for m in state.modules:
        del m.kvtrain_state
        if hasattr(m, CODEC_STATE):
            delattr(m, CODEC_STATE)
    del target.kvtrain_state
    if state.states:  # kept (out of the state_dict) for the next attach of the same spec
        target._kvtrain_codec_states = (state.spec, state.states)
    target.set_attn_implementation(_for_text(state.original_attn, state.text_key))


def codec_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's learnable codec state (of its attached spec, or kept aside by `detach`) as flat
    tensors named "<layer>.<key or value>.<name>": what an export writes to kv_codec_state.safetensors."""
    target = hf_model(model)
    state = getattr(target, "kvtrain_state", None)
    states = state.states if state is not None else getattr(target, "_kvtrain_codec_states", (None, {}))[1]
    return {f"{layer}.{name}": t.detach().cpu().contiguous()
            for layer, module in states.items() for name, t in module.state_dict().items()}


def load_codec_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: object = "the codec state") -> None:
    """Load what `codec_state_dict` gave (read from `source`) into the codec state of the spec attached to `model`."""
    state: AttachState | None = getattr(hf_model(model), "kvtrain_state", None)
    if state is None:
        raise ValueError("attach the spec the codec state was trained with before loading it")
    expected = codec_state_dict(model)
    if set(tensors) != set(expected):
        raise ValueError(f"{source} holds {sorted(tensors)}, the attached spec {state.spec} learns {sorted(expected)}")
    for layer, module in state.states.items():
        module.load_state_dict({name: tensors[f"{layer}.{name}"] for name in module.state_dict()})


def attached_spec(model: nn.Module) -> Spec | None:
    state = getattr(hf_model(model), "kvtrain_state", None)
    return state.spec if state else None


@contextmanager
def attached(model: nn.Module, spec: Spec | str) -> Iterator[Spec]:
    """`with attached(model, "kivi2"): ...` restores the model's previous state on exit."""
    previous = attached_spec(model)
    resolved = attach(model, spec)
    try:
        yield resolved
    finally:
        detach(model)
        if previous is not None:
            attach(model, previous)


@contextmanager
def suspended(model: nn.Module) -> Iterator[None]:
    """Run `model` with full-precision KV for a while (e.g. as its own distillation teacher)."""
    spec = attached_spec(model)
    if spec is None:
        yield
        return
    detach(model)
    try:
        yield
    finally:
        attach(model, spec)
