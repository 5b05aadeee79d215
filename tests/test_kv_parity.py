"""DESIGN.md invariant 1, the product's central guarantee: one training-mode forward with a spec
attached gives the same logits as decoding with QuantizedKVCache(spec), token by token or after any
prefill split, to fp32 tolerance. Also invariant 5: detach restores the model bit for bit."""

import pytest
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config,
    Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from kvtrain import KVQuantSpec, QuantizedKVCache, attach, attached, detach

SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=32)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**SHAPE, pad_token_id=0)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**SHAPE, head_dim=32)),
    # attention logit softcapping (the exact eager path) and sliding-window layers
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**SHAPE, head_dim=32, sliding_window=48)),
}
SPECS = {  # (spec, sequence length): lengths are not multiples of the group size
    "2bit-R0-G16": (KVQuantSpec(key_bits=2, value_bits=2, key_group_size=16, value_group_size=16, residual=0), 75),
    "4bit-R16-G32": (KVQuantSpec(key_bits=4, value_bits=4, residual=16), 83),
    "kivi2-R128": (KVQuantSpec.preset("kivi2"), 203),
}
# The models run in float64. Quantization is discontinuous: the batched and the one-token K/V
# projections differ in the last float32 bits, and an element that sits on a rounding boundary then
# flips to the neighbouring code (observed: ~1e-4 in the logits, once per few thousand elements).
# That is float noise, not a view mismatch; float64 removes it, so any mismatch of the streaming view
# shows up far above this tolerance (tighter than fp32 tolerance).
TOL = dict(rtol=1e-6, atol=1e-6)


def build(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().double().eval()
    # Random init gives near-uniform attention; larger q/k weights make attention (and so the
    # quantization of keys) matter to the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(proj in name for proj in ("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(4)
    return model


@torch.no_grad()
def decode(model, ids, spec, splits):
    """Logits of feeding `ids` through QuantizedKVCache in chunks ending at `splits`, then one by one."""
    cache, logits, start = QuantizedKVCache(spec), [], 0
    bounds = [*splits, *range((splits[-1] if splits else 0) + 1, ids.shape[1] + 1)]
    for end in bounds:
        logits.append(model(ids[:, start:end], past_key_values=cache, use_cache=True).logits)
        start = end
    return torch.cat(logits, 1), cache


def training_views(model, ids, spec, **inputs):
    """(full-precision logits, logits of one training-mode forward with `spec` attached); the model
    stays attached, in eval mode."""
    with torch.no_grad():
        full_precision = model(ids, use_cache=False, **inputs).logits
    attach(model, spec)
    model.train()
    with torch.no_grad():
        trained_view = model(ids, use_cache=False, **inputs).logits
    model.eval()
    return full_precision, trained_view


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec_name", SPECS)
def test_training_forward_equals_incremental_decoding(arch, spec_name):
    spec, length = SPECS[spec_name]
    model = build(arch)
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_precision = model(ids, use_cache=False).logits
    attach(model, spec)
    model.train()
    with torch.no_grad():
        trained_view = model(ids, use_cache=False).logits
    model.eval()
    assert (trained_view - full_precision).abs().max() > 1e-3, "the spec did not change the forward"
    for splits in ([], [length // 2], [17, 64]):
        decoded, cache = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, trained_view, **TOL, msg=f"prefill splits {splits}")
    assert cache.get_seq_length() == length
    layer = cache.layers[0]
    assert layer.k.packed.n == spec.keys(0).quantized_len(length, spec.residual) > 0
    assert layer.v.packed.n == spec.values(0).quantized_len(length, spec.residual)
    detach(model)


def test_detach_restores_outputs_bit_for_bit():
    model = build("llama")
    ids = torch.randint(0, 512, (2, 40))
    before = model(ids).logits
    with attached(model, KVQuantSpec(residual=0, key_group_size=8)):
        assert not torch.equal(model(ids).logits, before)
    assert torch.equal(model(ids).logits, before)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "kvtrain_state") for m in model.modules())


def test_per_channel_keys_are_quantized_during_decode():
    """Keys alone at 2 bits (values 8-bit): decoding one token at a time must still change the output,
    because key groups of G tokens are quantized once complete (a 1-token key group would be lossless)."""
    model = build("llama")
    ids = torch.randint(0, 512, (1, 70), generator=torch.Generator().manual_seed(2))
    spec = KVQuantSpec(key_bits=2, value_bits=8, key_group_size=16, residual=0)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
    attach(model, spec)
    decoded, cache = decode(model, ids, spec, [])
    assert cache.layers[0].k.packed.n == 64 and cache.layers[0].k.tail.shape[-2] == 6
    # Before the first key group completes (position 15), decode is nearly full precision (values
    # are 8-bit); after it, 2-bit keys move the logits.
    early = (decoded[:, :15] - reference[:, :15]).abs().max()
    late = (decoded[:, 16:] - reference[:, 16:]).abs().max()
    assert early < 2e-2 and late > 10 * early


def test_left_padded_batch_decoding_matches_training_view():
    model = build("qwen2")
    spec = KVQuantSpec(residual=8, key_group_size=16, value_group_size=16)
    ids = torch.randint(0, 512, (2, 60), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # row 1 is left-padded by 11 tokens
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    attach(model, spec)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        cache = QuantizedKVCache(spec)
        steps = [model(ids[:, :20], attention_mask=mask[:, :20], position_ids=positions[:, :20],
                       past_key_values=cache).logits]
        for t in range(20, 60):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                               past_key_values=cache).logits)
    decoded = torch.cat(steps, 1)
    real = mask.bool()
    torch.testing.assert_close(decoded[real], full[real], **TOL)


def test_generate_greedy_with_quantized_cache_matches_teacher_forcing():
    model = build("mistral")
    spec = KVQuantSpec(residual=16, key_group_size=16, value_group_size=16)
    prompt = torch.randint(1, 512, (1, 30), generator=torch.Generator().manual_seed(4))  # no pad id (0) inside
    attach(model, spec)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=QuantizedKVCache(spec),
                         max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 70)
    with torch.no_grad():
        logits = model(out, use_cache=False).logits
    torch.testing.assert_close(logits[0, 29:-1].argmax(-1), out[0, 30:])


def test_generate_sampling_batch_left_padding_matches_the_training_view():
    model = build("llama")
    attach(model, "kivi2")
    torch.manual_seed(1)
    prompt = torch.randint(1, 512, (3, 12))
    mask = torch.ones_like(prompt)
    mask[0, :5] = 0
    cache = QuantizedKVCache("kivi2")
    out = model.generate(prompt, attention_mask=mask, past_key_values=cache, max_new_tokens=150, do_sample=True,
                         top_p=0.9, temperature=0.8, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (3, 162)
    assert cache.layers[0].k.packed.n == 32  # 161 cached tokens, 128 in the window: one 32-token key group
    assert cache.layers[0].v.packed.n == 161 - 128
    # every sampled step's logits, left padding and all, are the training forward's on the sampled sequence
    full_mask = torch.cat([mask, torch.ones(3, 150, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    # (generate hands its logits out in fp32)
    torch.testing.assert_close(logits[:, 11:-1].float(), torch.stack(out.logits, dim=1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 0.1221), (torch.bfloat16, 0.2129)])
def test_kivi2_bytes_at_4096_tokens_against_dynamic_cache(dtype, ratio):
    """Honest memory: bytes of the tensors each cache holds, kvtrain-ref's shapes (4 layers, 2 KV heads, head_dim 32).
    Per element: 3968 quantized tokens x 0.375 byte (2-bit code + fp16 scale and zero per 32 elements, whatever
    the model's dtype) + the 128-token window in the model's dtype, over 4096 tokens in the model's dtype:
    fp32 (1488 + 512) / 16384 = 0.1221, bf16 (1488 + 256) / 8192 = 0.2129."""
    from transformers import DynamicCache

    from kvtrain.eval import cache_nbytes

    ours, full = QuantizedKVCache("kivi2"), DynamicCache()
    for layer in range(4):
        k, v = torch.randn(2, 1, 2, 4096, 32, dtype=dtype)
        ours.update(k, v, layer)
        full.update(k, v, layer)
    assert ours.nbytes() / cache_nbytes(full) == pytest.approx(ratio, abs=1e-4)
    packed = ours.layers[0].k.packed
    assert packed.scale.dtype == packed.zero.dtype == torch.float16


def test_a_decode_step_gets_sdpas_mask_and_a_chunk_an_additive_one():
    """kv_mask: one query that sees every key needs no mask (the decode step is plain SDPA), a padded
    row's step gets sdpa's boolean mask, a chunk of queries eager's additive mask (the tiers index it)."""
    from kvtrain.kv.attention import kv_mask

    assert kv_mask(batch_size=1, q_length=1, kv_length=10, q_offset=9) is None
    padding = torch.tensor([[0, 0] + [1] * 8]).bool()
    step = kv_mask(batch_size=1, q_length=1, kv_length=10, q_offset=9, attention_mask=padding)
    assert step.dtype == torch.bool and step[0, 0, 0].tolist() == [False, False] + [True] * 8
    chunk = kv_mask(batch_size=1, q_length=3, kv_length=10, q_offset=7, dtype=torch.float32)
    assert chunk[0, 0, 0].tolist() == [0.0] * 8 + [torch.finfo(torch.float32).min] * 2


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: the eager softcap path, per-row masks
def test_a_left_padded_row_decodes_as_it_would_alone(arch):
    """Groups and the window count from each row's first real token (its padding stays in full
    precision like sinks), so batched generation equals generating each prompt alone."""
    model = build(arch)
    spec = KVQuantSpec(residual=8, key_group_size=16, value_group_size=16, sinks=2)
    attach(model, spec)
    prompts = [torch.randint(1, 512, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 12)]
    batch = torch.cat([torch.nn.functional.pad(prompts[0], (5, 0)), prompts[1]])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    settings = dict(max_new_tokens=45, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    batched = model.generate(batch, attention_mask=mask, past_key_values=QuantizedKVCache(spec), **settings)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=QuantizedKVCache(spec),
                               **settings)
        torch.testing.assert_close(torch.stack(batched.logits, 1)[row], torch.stack(alone.logits, 1)[0], **TOL)
    detach(model)


def test_beam_search_reorders_left_padded_rows_and_a_bound_cache_expands():
    """generate's row operations (repeat for num_return_sequences, reorder for beams) on per-row stores:
    beam search with the cache gives the sequences a training forward scores best, on a padded batch."""
    model = build("llama")
    spec = KVQuantSpec(residual=8, key_group_size=16, value_group_size=16)
    attach(model, spec)
    prompt = torch.randint(1, 512, (2, 9), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    cache = QuantizedKVCache(spec, config=model.config)  # laid out before generate expands the batch
    out = model.generate(prompt, attention_mask=mask, past_key_values=cache, max_new_tokens=20, num_beams=3,
                         num_return_sequences=2, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (4, 29) and len(cache.layers[0].k.rows) == 6  # 2 prompts x 3 beams
    full_mask = torch.cat([mask.repeat_interleave(2, 0), torch.ones(4, 20, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    logprobs = torch.log_softmax(logits[:, 8:-1], -1).gather(-1, out.sequences[:, 9:, None]).squeeze(-1).sum(-1)
    # a beam's score: the sum of its tokens' log-probs over the 20 generated tokens (length_penalty 1)
    torch.testing.assert_close((logprobs / 20).float(), out.sequences_scores, rtol=0, atol=1e-5)
    detach(model)
