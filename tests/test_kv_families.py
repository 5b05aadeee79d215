"""Decoder families beyond the parity suite's seven: each is supported with parity or refused at attach
(multi-head latent attention: tests/test_kv_latent.py)."""

import pytest
import torch

from kvtrain import attach

def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=0,
                eos_token_id=1)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    torch.manual_seed(0)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=250, video_token_id=251,
                           vision_start_token_id=252, vision_end_token_id=253)
    model = Qwen2VLForConditionalGeneration(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                p.mul_(4)
    return model


def image_prompt(length: int) -> dict[str, torch.Tensor]:
    """One 56x56 image (4x4 patches, 4 tokens after the 2x2 merge) after 3 text tokens, then text."""
    ids = torch.randint(2, 250, (1, length), generator=torch.Generator().manual_seed(3))
    ids[0, 3], ids[0, 4:8], ids[0, 8] = 252, 250, 253
    pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]),
                mm_token_type_ids=(ids == 250).long())


def test_a_vision_language_model_trains_its_text_decoder_only_with_parity():
    from kvtrain import KVQuantSpec, QuantizedKVCache, detach

    model, spec = tiny_qwen2_vl(), KVQuantSpec(key_group_size=8, value_group_size=16, residual=8, sinks=2)
    inputs = image_prompt(60)
    with torch.no_grad():
        full_precision = model(**inputs).logits
    attach(model, spec)
    assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower keeps its attention
    assert model.config.text_config._attn_implementation == "kvtrain"
    with torch.no_grad():
        trained_view = model(**inputs).logits
        assert (trained_view - full_precision).abs().max() > 1e-4
        cache, prefill = QuantizedKVCache(spec), 20
        head = {**inputs, "input_ids": inputs["input_ids"][:, :prefill],
                "mm_token_type_ids": inputs["mm_token_type_ids"][:, :prefill]}
        logits = [model(**head, past_key_values=cache).logits]
        for t in range(prefill, 60):
            logits.append(model(input_ids=inputs["input_ids"][:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(logits, 1), trained_view, rtol=1e-6, atol=1e-6)
    detach(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, full_precision)


def tiny_lfm2():
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(0)
    config = Lfm2Config(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        layer_types=["conv", "full_attention", "conv", "full_attention"])
    model = Lfm2ForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(4)
    return model


def test_a_hybrid_model_compresses_its_attention_layers_and_keeps_its_conv_state():
    """LFM2 (convolution and attention layers): attention layers get the compressed cache, the
    convolution layers keep transformers' own state, and decoding equals the training view."""
    from test_kv_parity import decode, training_views

    from kvtrain import KVQuantSpec, QuantizedKVCache, detach

    model, spec = tiny_lfm2(), KVQuantSpec(key_group_size=8, value_group_size=16, residual=8)
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(7))
    full_precision, trained_view = training_views(model, ids, spec)
    assert (trained_view - full_precision).abs().max() > 1e-4
    for splits in ([], [21]):
        decoded, cache = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, trained_view, rtol=1e-6, atol=1e-6)
    assert cache.layer_types == ["conv", "full_attention", "conv", "full_attention"]
    conv = cache.layers[0].conv_states[0]
    kv = sum(cache.layers[i].nbytes() for i in (1, 3))
    assert cache.nbytes() == kv + 2 * conv.numel() * conv.element_size() and cache.layers[1].k.packed.n == 40
    with torch.no_grad():  # generate drives the same cache
        out = model.generate(ids[:1, :10], past_key_values=QuantizedKVCache(spec), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 15)
    detach(model)


def test_a_bound_cache_refuses_another_model_and_keys_for_a_conv_layer():
    from kvtrain import QuantizedKVCache
    from test_kv_parity import ARCHS

    model = tiny_lfm2()
    cache = QuantizedKVCache("kivi2", config=model.config)
    with pytest.raises(ValueError, match="layer 0 is a conv layer: it holds no keys and values"):
        cache.update(*torch.randn(2, 1, 2, 4, 32), 0)
    with pytest.raises(ValueError, match=r"holds layers \['conv', 'full_attention', 'conv', 'full_attention'\], not those"):
        cache.bind(ARCHS["llama"]().config)


def tiny_windowed(family: str):
    """Sliding-window attention over 24 tokens: Mistral with a window, Gemma 3 (sliding layers only)."""
    from test_kv_parity import SHAPE
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=24))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**SHAPE, head_dim=32, sliding_window=24))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(4)
    return model.double().eval()
