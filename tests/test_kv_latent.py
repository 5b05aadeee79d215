"""Multi-head latent attention (kvtrain.kv.latent): DeepSeek-V2/V3 cache a latent per token, so the
spec's key codec compresses that latent, once, on arrival; one training forward equals decoding with
the latent cache (float64), the cache holds the codes, scales and the RoPE'd part (hand-computed
bytes), the model trains against it, and specs the latent cache cannot hold are refused by name."""

import pytest
import torch
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache,
                          MiniCPM3Config, MiniCPM3ForCausalLM)

from kvtrain import QuantizedKVCache, attach, detach
from kvtrain.kv import KVSpec, KVQuantSpec
from kvtrain.kv.cache import LatentKVLayer
from test_kv_parity import TOL, decode, training_views

LATENT, ROPE = 32, 8
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=LATENT, q_lora_rank=None,
             qk_rope_head_dim=ROPE, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
             n_group=1, topk_group=1, max_position_embeddings=256)
MINICPM3 = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "max_position_embeddings")
ARCHS = {  # dense MLPs in both layers (the experts' grouped matmul has no float64 kernel)
    "deepseek_v3": lambda: DeepseekV3ForCausalLM(DeepseekV3Config(**SHAPE, first_k_dense_replace=2)),
    "deepseek_v2": lambda: DeepseekV2ForCausalLM(DeepseekV2Config(**SHAPE, first_k_dense_replace=2)),
    "minicpm3": lambda: MiniCPM3ForCausalLM(MiniCPM3Config(**{k: v for k, v in SHAPE.items() if k in MINICPM3})),
}
LATENT_2BIT = KVSpec(key=dict(bits=2, granularity="per_token(16)"), value=None, residual=0)


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch]().double().eval()


def ids(length: int = 30, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [LATENT_2BIT, KVSpec(key=dict(bits=4, granularity="per_token(32)"), value=None,
                                                     residual=0, full_precision_layers=[0])],
                         ids=["2bit-G16", "4bit-G32-layer0-full"])
def test_training_forward_equals_decoding_with_the_latent_cache(arch, spec):
    model, tokens = build(arch), ids()
    full, view = training_views(model, tokens, spec)
    assert (view - full).abs().max() > 1e-3, "quantizing the latent did not change the forward"
    for splits in ([], [10], [5, 20]):
        decoded, cache = decode(model, tokens, spec, splits)
        torch.testing.assert_close(decoded, view, **TOL, msg=f"prefill splits {splits}")
        assert all(isinstance(layer, LatentKVLayer) for layer in cache.layers)
    with torch.no_grad():  # any other cache then holds the latents as the view gives them
        other = DynamicCache()
        stepped = torch.cat([model(tokens[:, t:t + 1], past_key_values=other).logits for t in range(30)], 1)
    torch.testing.assert_close(stepped, view, **TOL)
    detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, use_cache=False).logits, full, rtol=0, atol=0)


def test_the_latent_cache_holds_codes_scales_and_the_rope_part_by_hand():
    model = build("deepseek_v3")
    attach(model, LATENT_2BIT)
    _, cache = decode(model, ids(), LATENT_2BIT, [12])
    # per token and layer: 32 latent numbers at 2 bits (8 bytes) + 2 groups x fp16 scale and zero point
    # (8 bytes) + the RoPE'd key part in float64 (8 x 8 bytes); 2 rows, 30 tokens, 2 layers
    assert cache.nbytes() == 2 * 30 * 2 * (8 + 8 + ROPE * 8)
    assert cache.get_seq_length() == 30
    dynamic = DynamicCache()
    with torch.no_grad():
        detach(model)
        model(ids(), past_key_values=dynamic)
    raw = sum(t.numel() * t.element_size() for layer in dynamic.layers for t in (layer.keys, layer.values))
    assert raw == 2 * 30 * 2 * (LATENT + ROPE) * 8 and cache.nbytes() / raw == pytest.approx(80 / 320)


def test_generate_and_beams_over_the_latent_cache_follow_the_training_view():
    model = build("deepseek_v3")
    attach(model, LATENT_2BIT)
    prompt = ids(8, seed=3)
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=QuantizedKVCache(LATENT_2BIT), max_new_tokens=12,
                             do_sample=False)
        logits = model(out, use_cache=False).logits
    assert torch.equal(logits[:, 7:-1].argmax(-1), out[:, 8:])
    with torch.no_grad():
        beams = model.generate(prompt[:1], past_key_values=QuantizedKVCache(LATENT_2BIT), max_new_tokens=6,
                               num_beams=3, do_sample=False)
    assert beams.shape == (1, 14)


def test_a_model_trains_against_its_quantized_latent_and_still_decodes_as_trained():
    model, tokens = build("deepseek_v3"), ids(40, seed=5)
    attach(model, LATENT_2BIT)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # memorizing two rows: observed 6.25 -> 2.89 in the first 15 steps
    model.eval()
    with torch.no_grad():
        view = model(tokens, use_cache=False).logits
    torch.testing.assert_close(decode(model, tokens, LATENT_2BIT, [16])[0], view, **TOL)


@pytest.mark.parametrize("spec,message", [
    ("kivi2", r"the spec's value policy must be None"),
    (KVSpec(key=dict(bits=2, granularity="per_channel(16)"), value=None, residual=0),
     r"the key granularity must be per_token\(G\) or per_token_head, got a codec grouping 16 tokens"),
    (KVSpec(key=dict(bits=2, granularity="per_token(16)"), value=None, residual=16),
     r"residual and sinks must be 0, got residual=16, sinks=0"),
    (KVSpec(key=dict(bits=2, granularity="per_token(24)"), value=None, residual=0), r"24"),
    (KVSpec(key=dict(bits=2, granularity="per_token(16)", learnable=True, codec="nf"), value=None, residual=0),
     r"codecs with learnable state are not supported on latent caches yet"),
    (KVSpec(key=None, value=None, eviction=dict(selector="h2o", budget=0.5, interval=8)),
     r"eviction does not apply to it yet"),
    (KVQuantSpec(key_bits=2, value_bits=2, residual=0, placement="pre_rope"), r"placement must be 'post_rope'"),
    (KVSpec(key=dict(codec="raw", bits=16, rank=8), value=None, residual=0, joint_kv=True),
     r"caches a latent already: joint_kv=True"),
])
def test_specs_a_latent_cache_cannot_hold_are_refused_by_name(spec, message):
    model = build("deepseek_v3")
    with pytest.raises(ValueError, match=message):
        attach(model, spec)
