"""Pre-RoPE placement (kvtrain.kv.placement): keys compressed before the model's rotary embedding and
rotated with each token's position after decoding. Parity on every family and codec runs in
tests/test_kv_codecs.py; here: generate with left padding, the stored positions, and the refusals."""

import pytest
import torch
from test_kv_parity import build

from kvtrain import KVQuantSpec, QuantizedKVCache, attach, detach
from kvtrain.kv.attention import attached_spec
from kvtrain.kv.placement import pre_rope_of

SPEC = KVQuantSpec(key_group_size=16, value_group_size=16, residual=16, placement="pre_rope")


def test_rotating_back_and_forth_is_the_identity():
    model = build("phi3")
    rope = pre_rope_of(model, model.model.layers[0].self_attn, model.config)
    k = torch.randn(2, 2, 9, 32, dtype=torch.float64)
    positions = torch.arange(3, 12)[None]
    back = rope.rotate(k, positions, inverse=True)
    assert (back - k).abs().max() > 1e-2  # RoPE moved it
    # the model computes cos and sin in float32, so cos^2 + sin^2 = 1 only to float32 precision
    torch.testing.assert_close(rope.rotate(back, positions), k, rtol=0, atol=1e-6)


def test_sampling_with_left_padding_matches_the_training_view_pre_rope():
    """The cache rotates each decoded key with the position generate gave it (left padding shifts them)."""
    model = build("llama")
    attach(model, SPEC)
    torch.manual_seed(1)
    prompt = torch.randint(1, 512, (3, 12))
    mask = torch.ones_like(prompt)
    mask[0, :5] = 0
    cache = QuantizedKVCache(SPEC)
    out = model.generate(prompt, attention_mask=mask, past_key_values=cache, max_new_tokens=60, do_sample=True,
                         top_p=0.9, temperature=0.8, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    # row 0's 5 pads stay in full precision like sinks; its key groups start at its first real token
    padded, plain = cache.layers[0].k.rows[0], cache.layers[0].k.rows[1]
    assert plain.packed.n == 48 and plain.positions.tolist() == [list(range(48))]
    assert plain.positions.dtype == torch.int32 and plain.sinks is None
    assert padded.sinks.shape[-2] == 5 and padded.packed.n == 48 and padded.positions.tolist() == [list(range(48))]
    full_mask = torch.cat([mask, torch.ones(3, 60, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(logits[:, 11:-1].float(), torch.stack(out.logits, dim=1), rtol=0, atol=1e-5)
    rows = [row for layer in cache.layers for row in layer.k.rows]
    position_bytes = sum(4 * row.positions.numel() + 4 * row.tail_positions.numel() for row in rows)
    held = sum(row.packed.nbytes() + (row.tail.numel() + (0 if row.sinks is None else row.sinks.numel())) * 8
               for row in rows)
    assert cache.nbytes() == held + position_bytes + sum(layer.v.nbytes() for layer in cache.layers)
    detach(model)


def test_pre_rope_needs_the_model():
    with pytest.raises(ValueError, match="decode through the attached model .* not by calling update by hand"):
        QuantizedKVCache(SPEC).update(*torch.randn(2, 1, 2, 4, 32), 0)
    with pytest.raises(ValueError, match=r"placement must be one of \('post_rope', 'pre_rope'\), got 'rope'"):
        KVQuantSpec(placement="rope")
    model = build("llama")
    attach(model, SPEC)
    assert attached_spec(model).placement == "pre_rope" and SPEC.to_v2().placement == "pre_rope"
    detach(model)
