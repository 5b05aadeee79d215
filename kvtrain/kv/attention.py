"""attach/detach: make any HF decoder's attention see K/V exactly as the compressed cache would.

kvtrain registers an attention function ("kvtrain") in transformers' AttentionInterface and switches
the model to it; no model code is copied. Per layer, the function builds the streaming view of K
and V (`kvtrain.kv.view`) and, when queries of one chunk see different tokens quantized (training,
prefill), runs attention with a per-query choice between the quantized and full-precision version of
each key and value. When all queries see the same view (single-token decode), it runs the model's
usual SDPA on the mixed tensors. Gradients flow through the straight-through fake-quant.

A forward pre-hook records the `past_key_values` of each call, so the function knows whether the
tokens it receives are already quantized (a `QuantizedKVCache` hands back dequantized tokens for
everything it holds compressed) or all full precision (training, or any other cache).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvtrain.kv.spec import KVQuantSpec, TensorQuant
from kvtrain.kv.view import compressed_view, quantized_mask, seen_quantized, uniform_view

ATTN_NAME = "kvtrain"


@dataclass
class AttachState:
    spec: KVQuantSpec
    original_attn: str
    hook: Any = None
    cache: Any = None  # the past_key_values of the forward in flight
    modules: list[nn.Module] = field(default_factory=list)


def _prepared(x: torch.Tensor, quant: TensorQuant | None, residual: int, past: int, quantized_prefix: bool):
    """(view tensor, quant) for K or V: fake-quant what the cache would have compressed by chunk end."""
    if quant is None:
        return x, None
    done = quant.quantized_len(past, residual) if quantized_prefix else 0
    return compressed_view(x, quant, residual, done)[0], quant


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
    from kvtrain.kv.cache import QuantizedKVCache

    spec, layer = state.spec, module.layer_idx
    q_len, total = query.shape[-2], key.shape[-2]
    past = total - q_len
    prefix = isinstance(state.cache, QuantizedKVCache)
    k_hat, kq = _prepared(key, spec.keys(layer), spec.residual, past, prefix)
    v_hat, vq = _prepared(value, spec.values(layer), spec.residual, past, prefix)
    scaling = module.scaling if scaling is None else scaling
    one_view = all(q is None or uniform_view(q, spec.residual, past, q_len) for q in (kq, vq))
    if kwargs.get("softcap") is not None:  # SDPA cannot softcap: exact eager attention
        out, probs = _per_query_attention(module, query, (key, k_hat, kq), (value, v_hat, vq), attention_mask,
                                          scaling, dropout, past, kwargs["softcap"])
    elif one_view:
        out, probs = sdpa_attention_forward(module, query, k_hat, v_hat, attention_mask, dropout=dropout,
                                            scaling=scaling)
    else:
        out, probs = _region_attention(module, query, (key, k_hat, kq), (value, v_hat, vq), attention_mask, scaling,
                                       dropout, past), None
    return _zero_padding_queries(out, attention_mask, total), probs


QUERY_CHUNK = 128


def _region_attention(module, query, keys, values, attention_mask, scaling, dropout, past) -> torch.Tensor:
    """Fused SDPA where each query sees each token quantized or not, as the cache would hold it then.

    For query p, token j falls in one of three regions: j < lo(p) seen with quantized K and V,
    lo(p) <= j < hi(p) with one of them quantized (the tensor with the finer unit is quantized
    further), j >= hi(p) full precision. Concatenating the regions' K/V along the key axis and masking
    each query to its own regions gives every (query, token) pair exactly once, so one SDPA call per
    chunk of queries computes the exact view without materializing attention weights. Chunking keeps
    regions short: a chunk only needs tokens up to its last position, and the full-precision regions
    only span the residual window plus one group.
    """
    (key, k_hat, kq), (value, v_hat, vq) = keys, values
    spec, q_len = module.kvtrain_state.spec, query.shape[-2]
    positions = torch.arange(past, past + q_len, device=query.device)
    nk, nv = (seen_quantized(q, spec.residual, positions) for q in (kq, vq))
    keys_ahead = bool((nk >= nv).all())  # units are fixed per layer, so one tensor leads at every position
    lo, hi = torch.minimum(nk, nv), torch.maximum(nk, nv)
    mixed = (k_hat, value) if keys_ahead else (key, v_hat)
    chunks = []
    for c0 in range(0, q_len, QUERY_CHUNK):
        c1 = min(q_len, c0 + QUERY_CHUNK)
        spans = [(0, int(lo[c1 - 1])), (int(lo[c0]), int(hi[c1 - 1])), (int(hi[c0]), past + c1)]
        k = torch.cat([t[..., a:b, :] for t, (a, b) in zip((k_hat, mixed[0], key), spans)], dim=-2)
        v = torch.cat([t[..., a:b, :] for t, (a, b) in zip((v_hat, mixed[1], value), spans)], dim=-2)
        mask = _region_mask(spans, lo[c0:c1], hi[c0:c1], positions[c0:c1], attention_mask, c0, query.dtype)
        chunks.append(F.scaled_dot_product_attention(
            query[..., c0:c1, :], k, v, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
            enable_gqa=True,
        ))
    return torch.cat(chunks, dim=-2).transpose(1, 2).contiguous()


def _region_mask(spans, lo, hi, positions, attention_mask, c0, dtype) -> torch.Tensor:
    """Additive mask (B or 1, 1, chunk, columns) for the concatenated regions of one query chunk."""
    device = lo.device
    cols = torch.cat([torch.arange(a, b, device=device) for a, b in spans])
    region = torch.cat([torch.full((max(0, b - a),), r, device=device) for r, (a, b) in enumerate(spans)])
    j, lo, hi = cols[None, :], lo[:, None], hi[:, None]
    allowed = torch.where(region == 0, j < lo, torch.where(region == 1, (j >= lo) & (j < hi), j >= hi))
    if attention_mask is None:
        return torch.where(allowed & (j <= positions[:, None]), 0.0, torch.finfo(dtype).min).to(dtype)
    base = attention_mask[:, :, c0:c0 + len(positions)].index_select(-1, cols)
    return torch.where(allowed, base, torch.finfo(base.dtype).min)


def _zero_padding_queries(out: torch.Tensor, attention_mask: torch.Tensor | None, total: int) -> torch.Tensor:
    """Zero the output of queries that may attend to nothing (left padding).

    Softmax over a fully masked row is uniform over however many keys the chunk has, so a padding
    token's output, and with it its K/V in the next layer, would depend on how the sequence was cut
    into chunks. Those K/V share per-channel quantization groups with real tokens, so they must be
    the same in training and in every decode schedule: zero makes them a function of the token alone.
    """
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return out
    dead = attention_mask[..., :total].amax(-1, keepdim=True) <= torch.finfo(attention_mask.dtype).min / 2  # (B, 1, q, 1)
    return out.masked_fill(dead.transpose(1, 2), 0)


def _per_query_attention(module, query, keys, values, attention_mask, scaling, dropout, past, softcap):
    """Eager attention where query i sees token j quantized iff the cache would hold it so at i."""
    spec, groups = module.kvtrain_state.spec, module.num_key_value_groups
    q_len, total = query.shape[-2], keys[0].shape[-2]

    def mask(quant):
        return quantized_mask(quant, spec.residual, past, q_len, total, query.device)

    key, k_hat, kq = keys
    scores = query @ repeat_kv(key, groups).transpose(2, 3)
    if kq is not None:
        scores = torch.where(mask(kq), query @ repeat_kv(k_hat, groups).transpose(2, 3), scores)
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., :total]
    # softmax in at least fp32 (bf16 rows would lose mass), never below the model's dtype: a float64
    # mask's -1.8e308 cast to fp32 is -inf, and a fully padded row of -inf is NaN
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    value, v_hat, vq = values
    if vq is None:
        out = probs @ repeat_kv(value, groups)
    else:
        m = mask(vq)
        out = (probs * ~m) @ repeat_kv(value, groups) + (probs * m) @ repeat_kv(v_hat, groups)
    return out.transpose(1, 2).contiguous(), probs


ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, kv_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, eager_mask)


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


def _capture_cache(state: AttachState):
    def hook(module, args, kwargs):
        state.cache = kwargs.get("past_key_values")

    return hook


def attach(model: nn.Module, spec: KVQuantSpec | str) -> KVQuantSpec:
    """Make `model`'s attention see K/V as a cache compressed by `spec` would hand them back.

    Re-attaching replaces the previous spec. Returns the resolved spec.
    """
    spec = KVQuantSpec.resolve(spec)
    target = hf_model(model)
    if getattr(target, "kvtrain_state", None) is not None:
        detach(target)
    config = target.config.get_text_config(decoder=True)
    name = type(target).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; kvtrain attaches to decoder-only models")
    spec.check_model(config.num_hidden_layers, _head_dim(config), name)
    mods = attention_modules(target)
    state = AttachState(spec, target.config._attn_implementation or "sdpa", modules=mods)
    try:
        target.set_attn_implementation(ATTN_NAME)
    except (ValueError, ImportError) as e:
        raise ValueError(f"{name} does not let kvtrain set its attention implementation: {e}") from e
    for m in mods:
        m.kvtrain_state = state
    state.hook = target.register_forward_pre_hook(_capture_cache(state), with_kwargs=True)
    target.kvtrain_state = state
    return spec


def detach(model: nn.Module) -> None:
    """Undo `attach`: the model computes exactly what it did before (bit for bit)."""
    target = hf_model(model)
    state: AttachState | None = getattr(target, "kvtrain_state", None)
    if state is None:
        return
    state.hook.remove()
    for m in state.modules:
        del m.kvtrain_state
    del target.kvtrain_state
    target.set_attn_implementation(state.original_attn)


def attached_spec(model: nn.Module) -> KVQuantSpec | None:
    state = getattr(hf_model(model), "kvtrain_state", None)
    return state.spec if state else None


@contextmanager
def attached(model: nn.Module, spec: KVQuantSpec | str) -> Iterator[KVQuantSpec]:
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
