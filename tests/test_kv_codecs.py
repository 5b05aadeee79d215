"""The codec registry and spec version 2. Every registered codec is run from the registry (its
`examples`): encode/decode round trips, payload bytes, and train/decode parity (DESIGN.md invariant 1)
on every architecture of the parity suite, with and without sinks, so a new codec is covered without
a new test."""

import json
import os
import shutil
from functools import partial

import pytest
import torch
from test_kv_families import tiny_lfm2, tiny_qwen2_vl, tiny_windowed
from test_kv_parity import ARCHS, TOL, build, decode, training_views

from kvtrain import KVQuantSpec, QuantizedKVCache, attach, attached, detach
from kvtrain.kv import CODECS, KVSpec, Payload, TensorPolicy, load_spec, spec_from_dict
from kvtrain.kv.codecs import Codec, register
from kvtrain.kv.cache import ENCODE_AHEAD, CompressedTensor, PayloadStore, QuantizedKVLayer
from kvtrain.kv.codecs.vllm import Fp8PerTokenHead
from kvtrain.quant import native
from kvtrain.quant.uniform import quantize

# the parity suite's seven decoders, a hybrid (convolution + attention layers), a VLM's text decoder, and
# sliding-window attention (Mistral with a window; Gemma 3, all sliding with RoPE per layer type)
FAMILIES = {**{arch: lambda arch=arch: build(arch) for arch in ARCHS}, "lfm2": tiny_lfm2, "qwen2_vl": tiny_qwen2_vl,
            "mistral_window": partial(tiny_windowed, "mistral"), "gemma3": partial(tiny_windowed, "gemma3")}
REFUSED_PRE_ROPE = {"qwen2_vl": r"multimodal RoPE \(mrope_section\)", "gemma3": "computes RoPE per layer type"}
EXAMPLES = {f"{name}-{i}": fields for name, cls in CODECS.items() for i, fields in enumerate(cls.examples)}


def example_codec(name: str, head_dim: int = 32) -> Codec:
    """The example's codec, bound to fresh state if it learns some (as attach binds it)."""
    codec = TensorPolicy(codec=name.rsplit("-", 1)[0], **EXAMPLES[name]).codec_at(0)
    weight = torch.randn(2 * head_dim, 48, generator=torch.Generator().manual_seed(head_dim))  # a k_proj (low-rank stage)
    state = codec.make_state(head_dim, kv_heads=2, weight=weight)  # (the tests' tensors have two heads)
    return codec if state is None else codec.bound(state)


def test_the_registry_holds_the_shipped_codecs():
    assert {"affine", "int8_per_token_head", "fp8_per_token_head", "int4_per_token_head", "fp8", "nf", "ternary"} <= set(CODECS)
    with pytest.raises(ValueError, match=r"unknown codec 'nf5'; registered: \['affine', 'fp8', 'fp8_per_token_head'"):
        TensorPolicy(codec="nf5")
    with pytest.raises(ValueError, match="a codec named 'affine' is registered already"):
        register("affine")(Fp8PerTokenHead)


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simulate_is_decode_of_encode_bit_for_bit(name, dtype):
    codec = example_codec(name)
    x = torch.randn(2, 2, 3 * codec.unit, 32, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 3
    payload = codec.encode(x)
    stored = codec.decode(payload)
    assert stored.dtype == dtype and stored.shape == x.shape and 0 < (stored - x).abs().max()
    if not EXAMPLES[name].get("rank") and not EXAMPLES[name].get("prune_channels"):
        # (a low-rank latent approximates data near its subspace, not noise; a pruned channel is lost whole)
        assert (stored - x).abs().max() < x.abs().max()
    x.requires_grad_(True)
    simulated = codec.simulate(x)
    assert torch.equal(simulated.detach(), stored)
    simulated.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert payload.nbytes() == sum(t.numel() * t.element_size() for t in payload.tensors.values())
    assert payload.nbytes() < x.numel() * 2  # below bf16 storage


@pytest.mark.parametrize("name", EXAMPLES)
def test_payloads_concatenate_and_select_rows(name):
    codec = example_codec(name, head_dim=16)
    a, b = torch.randn(2, 3, 2, 2 * codec.unit, 16, generator=torch.Generator().manual_seed(1))
    joined = Payload.cat([codec.encode(a), codec.encode(b)])
    assert joined.n == 4 * codec.unit and joined.nbytes() == codec.encode(a).nbytes() * 2
    assert torch.equal(codec.decode(joined), torch.cat([codec.decode(codec.encode(a)), codec.decode(codec.encode(b))], 2))
    row = joined.map(lambda t: t[1:])
    assert row.shape[0] == 2 and torch.equal(codec.decode(row), codec.decode(joined)[1:])
    first = joined.head(2 * codec.unit)  # the store's tier, when it holds tokens encoded ahead
    assert first.n == 2 * codec.unit and torch.equal(codec.decode(first), codec.decode(codec.encode(a)))


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_decode_into_a_slice_is_decode_bit_for_bit(name, dtype, kernel, monkeypatch):
    """What the cache runs every step: the payload decoded straight into its place in the tensor
    attention reads (by the CPU kernel where it applies, and in torch without it)."""
    if kernel == "torch":
        monkeypatch.setattr(native, "_library", lambda: None)
    codec = example_codec(name)
    x = torch.randn(2, 2, 4 * codec.unit, 32, generator=torch.Generator().manual_seed(3)).to(dtype) * 3
    payload = codec.encode(x)
    big = torch.full((2, 2, 4 * codec.unit + 9, 32), float("nan"), dtype=dtype)
    codec.decode_into(payload, big[:, :, 4:-5])
    assert torch.equal(big[:, :, 4:-5], codec.decode(payload))
    assert big[:, :, :4].isnan().all() and big[:, :, -5:].isnan().all()


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_decode_into_decodes_the_tier_then_the_window(name, kernel, monkeypatch):
    """The cache's call: the first tokens of a store that holds more (encoded ahead of the rule),
    followed by the full-precision tail, in one call."""
    if kernel == "torch":
        monkeypatch.setattr(native, "_library", lambda: None)
        native._functions.cache_clear()
    codec = example_codec(name)
    gen = torch.Generator().manual_seed(4)
    x, tail = torch.randn(2, 2, 4 * codec.unit, 32, generator=gen), torch.randn(2, 2, 5, 32, generator=gen)
    payload = codec.encode(x)
    tier = 3 * codec.unit
    big = torch.full((2, 2, tier + 5 + 2, 32), float("nan"))
    codec.decode_into(payload, big[:, :, 1:-1], then=tail)
    assert torch.equal(big[:, :, 1:tier + 1], codec.decode(payload)[:, :, :tier])
    assert torch.equal(big[:, :, tier + 1:-1], tail)
    assert big[:, :, 0].isnan().all() and big[:, :, -1].isnan().all()
    native._functions.cache_clear()


def test_fp8_by_hand():
    """One head [1, -2, 0.3, 4] (vLLM's per-token-head fp8): scale 4/448 in float32, codes x / scale rounded
    to e4m3: 112, -224, 33.6 -> 32 (e4m3 steps by 4 in [32, 64)), 448; decoded in float32."""
    x = torch.tensor([1.0, -2.0, 0.3, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    payload = Fp8PerTokenHead().encode(x)
    assert payload.tensors["codes"].dtype == torch.float8_e4m3fn and payload.tensors["scale"].dtype == torch.float32
    assert payload.tensors["codes"].double().flatten().tolist() == [112, -224, 32, 448]
    scale = torch.tensor(4.0) / 448
    expected = (torch.tensor([112.0, -224.0, 32.0, 448.0]) * scale).double()
    assert payload.tensors["scale"].item() == scale.item()
    assert torch.equal(Fp8PerTokenHead().decode(payload).flatten(), expected)
    assert payload.nbytes() == 4 + 4  # 4 one-byte codes, one float32 scale
    assert Fp8PerTokenHead().decode(Fp8PerTokenHead().encode(torch.zeros(1, 1, 2, 4))).abs().max() == 0


def spec_of(name: str, sinks: int, placement: str = "post_rope") -> KVSpec:
    policy = dict(codec=name.rsplit("-", 1)[0], **EXAMPLES[name])
    return KVSpec(key=policy, value=policy, residual=8, sinks=sinks, placement=placement)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("placement", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("name", EXAMPLES)
def test_every_codec_trains_what_the_cache_decodes(name, sinks, placement, arch):
    spec, length = spec_of(name, sinks, placement), 61
    model = FAMILIES[arch]()
    if arch in REFUSED_PRE_ROPE and placement == "pre_rope":
        with pytest.raises(ValueError, match=REFUSED_PRE_ROPE[arch]):
            attach(model, spec)
        return
    ids = torch.randint(0, 250, (2, length), generator=torch.Generator().manual_seed(2))
    full_precision, trained_view = training_views(model, ids, spec)
    assert (trained_view - full_precision).abs().max() > 1e-4, "the codec did not change the forward"
    for splits in ([], [29]):
        decoded, cache = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, trained_view, **TOL, msg=f"prefill splits {splits}")
    detach(model)
    stored = next(layer for layer in cache.layers if hasattr(layer, "k")).k
    assert stored.packed.n == stored.rule.end(length) - sinks > 0


def test_each_token_is_encoded_once_and_never_simulated_while_decoding(monkeypatch):
    """DESIGN.md invariant 3: the cache encodes a token when it leaves the window, and attention reads
    that payload; the training view's simulation never runs on a cached token."""
    spec = KVQuantSpec(key_group_size=16, value_group_size=16, residual=8)
    model = build("llama")
    attach(model, spec)
    encoded = []
    real_encode = type(spec.keys(0)).encode
    monkeypatch.setattr(type(spec.keys(0)), "encode", lambda self, x: encoded.append(x.shape[-2]) or real_encode(self, x))
    monkeypatch.setattr(type(spec.keys(0)), "simulate", lambda self, x: pytest.fail("simulated during decoding"))
    ids = torch.randint(0, 512, (1, 70))
    _, cache = decode(model, ids, spec, [20])
    detach(model)
    stores = [store for layer in cache.layers for store in (layer.k.packed, layer.v.packed)]
    assert sum(encoded) == sum(store.encoded for store in stores)  # each payload token encoded by one call
    # per-token values are encoded in blocks ahead of the window rule, never ENCODE_AHEAD tokens ahead
    assert all(store.n <= store.encoded < store.n + ENCODE_AHEAD for store in stores)
    assert any(store.encoded > store.n for store in stores)


@pytest.mark.parametrize("length", [70, 77, 96])
def test_what_the_cache_holds_is_a_function_of_its_tokens(length):
    """Tokens encoded ahead of the window come in aligned blocks: a cache filled by one prefill and one
    filled token by token hold the same payloads (bytes, rollouts' per-answer bytes rest on it)."""
    spec = KVQuantSpec(key_group_size=16, value_group_size=16, residual=8)
    k, v = torch.randn(2, 1, 2, length, 32, generator=torch.Generator().manual_seed(length))
    at_once, by_token = QuantizedKVCache(spec), QuantizedKVCache(spec)
    last = at_once.update(k, v, 0)
    by_token.update(k[:, :, :20], v[:, :, :20], 0)
    for t in range(20, length):
        stepped = by_token.update(k[:, :, t:t + 1], v[:, :, t:t + 1], 0)
    assert at_once.nbytes() == by_token.nbytes()
    one, other = at_once.layers[0].v.packed, by_token.layers[0].v.packed
    block = min(ENCODE_AHEAD, 8 + 1)  # a block is at most the window and the token leaving it
    assert one.encoded == other.encoded == -(-(length - 8) // block) * block >= one.n == length - 8
    assert all(torch.equal(a, b) for a, b in zip(last, stepped))


def test_spec_v2_gives_keys_and_values_their_own_bits_per_layer(tmp_path):
    spec = KVSpec(key=dict(bits=4, granularity="per_channel(32)", layer_bits={0: 8}),
                  value=dict(bits=2, granularity="per_token(32)", layer_bits={"1": 3}), full_precision_layers=[3])
    assert [spec.keys(i).bits for i in range(3)] == [8, 4, 4] and [spec.values(i).bits for i in range(3)] == [2, 3, 2]
    assert spec.keys(3) is None and spec.values(3) is None
    saved = json.loads(spec.save(tmp_path).read_text())
    assert saved["version"] == 2 and saved["key"]["granularity"] == "per_channel(32)"
    assert load_spec(tmp_path / "kv_spec.json") == spec
    assert spec.with_bits(3).keys(1).bits == 3 and spec.with_bits(3).keys(0).bits == 8


def test_the_flat_spec_and_its_v2_form_are_the_same_spec():
    flat = KVQuantSpec(key_bits=4, value_bits=2, value_group_size=16, residual=16, sinks=2, layer_bits={1: 8})
    v2 = flat.to_v2()
    for layer in range(3):
        assert v2.keys(layer) == flat.keys(layer) and v2.values(layer) == flat.values(layer)
        assert v2.window(v2.keys(layer)) == flat.window(flat.keys(layer))
    model = build("llama")
    ids = torch.randint(0, 512, (1, 50))
    logits = []
    for spec in (flat, v2):
        attach(model, spec)
        with torch.no_grad():
            logits.append(model(ids).logits)
    detach(model)
    assert torch.equal(*logits) and spec_from_dict(flat.to_dict()) == flat and spec_from_dict(v2.to_dict()) == v2


@pytest.mark.parametrize(("fields", "message"), [
    (dict(key=dict(codec="fp8_per_token_head", bits=2, granularity="per_token_head")),
     "fp8_per_token_head codec stores 8 bits .* got bits=2; set bits: 8"),
    (dict(key=dict(codec="int4_per_token_head", bits=4)),
     "int4_per_token_head codec scales per_token_head, got granularity 'per_channel"),
    (dict(key=dict(granularity="per_head(4)")), r"unknown granularity 'per_head\(4\)'"),
    (dict(key=dict(granularity="per_token_head")), r"affine codec groups per_channel\(G\) or per_token\(G\)"),
    (dict(value=dict(bits=9)), "supports 1 to 8 bits, got 9"),
    (dict(value=dict(layer_bits={0: True})), "supports 1 to 8 bits, got True"),
    (dict(key=dict(codec="int8_per_token_head", bits=8, granularity="per_token_head", layer_bits={0: 4})),
     "got bits=4"),
    (dict(version=3), "KVSpec version must be 2, got 3"),
    (dict(key="kivi2"), "key must be a TensorPolicy, a dict of its fields or None"),
    (dict(flush=True, residual=24), r"residual=24 .* positive multiple of key.granularity group=32"),
])
def test_spec_v2_errors_name_the_setting(fields, message):
    with pytest.raises(ValueError, match=message):
        KVSpec(**fields)


def test_spec_v2_group_must_divide_head_dim():
    with pytest.raises(ValueError, match="value.granularity group=32 does not divide head_dim=48 of Foo"):
        KVSpec().check_model(4, 48, "Foo")


@pytest.mark.parametrize(("name", "code_bytes", "scale_bytes"), [
    ("int8_per_token_head", 32, 4), ("fp8_per_token_head", 32, 4), ("int4_per_token_head", 16, 4), ("fp8", 32, 0)])
def test_serving_presets_store_codes_and_a_float32_scale_per_token_head(name, code_bytes, scale_bytes):
    """Per token and head: head_dim codes (two per byte for int4) and a float32 scale; vLLM's per-tensor
    fp8 keeps its one scale per layer in the model, not per token."""
    cache = QuantizedKVCache(name)
    assert cache.spec.residual == 0 and cache.spec.sinks == 0
    k, v = torch.randn(2, 1, 2, 100, 32)
    cache.update(k, v, 0)
    assert cache.nbytes() == 2 * (2 * 100 * code_bytes + 2 * 100 * scale_bytes)
    if scale_bytes:
        assert cache.layers[0].k.packed.scale.dtype == torch.float32


def test_the_readme_yaml_configures_a_v2_spec_and_checkpoints_carry_it():
    """The README's YAML, parsed as `kvtrain fit` parses a recipe's callbacks, gives a KVSpec; the
    callback's checkpoint state restores it."""
    import re
    from pathlib import Path

    import yaml
    from jsonargparse import ArgumentParser

    from kvtrain.callbacks import KVQuantCallback, spec_from_checkpoint

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "version: 2" in b)
    init_args = yaml.safe_load(block)["callbacks"][0]["init_args"]
    parser = ArgumentParser()
    parser.add_class_arguments(KVQuantCallback, "callback")
    callback = parser.instantiate(parser.parse_object({"callback": init_args})).callback
    assert callback.spec == KVSpec(key=dict(bits=4, granularity="per_channel(32)"),
                                   value=dict(bits=2, granularity="per_token(32)"))
    checkpoint = {"callbacks": {"KVQuantCallback": callback.state_dict()}}
    assert spec_from_checkpoint(checkpoint) == callback.spec
    assert KVQuantCallback(callback.spec, bits=3).spec.values(0).bits == 3


def test_the_native_kernel_is_built_where_a_c_compiler_is():
    assert native.available() == ((shutil.which("cc") or shutil.which("gcc") or os.environ.get("CC")) is not None)


@pytest.mark.parametrize("bits,symmetric", [(1, False), (2, False), (2, True), (4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("granularity", ["per_channel(16)", "per_token(32)", "per_token(16)", "per_token(8)"])
def test_native_kernel_decodes_every_affine_setting_bit_for_bit(bits, granularity, symmetric):
    """The C kernel (kvtrain.quant.native) against torch's dequantize: every width it takes, both
    groupings, symmetric offsets, scales stored in float16 (subnormal ones too), bfloat16 and the
    output's dtype, into float32 and float64; a width or layout it does not take falls back."""
    if not native.available():
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(bits)
    for dtype in (torch.float32, torch.float64):
        magnitude = torch.logspace(-6, 3, 64, dtype=dtype)[torch.randperm(64, generator=gen)]  # tiny groups: subnormal fp16 scales
        x = torch.randn(2, 3, 64, 32, generator=gen, dtype=dtype) * magnitude[:, None]
        for scale_dtype in ("float16", "bfloat16", "float32"):
            policy = TensorPolicy(bits=bits, granularity=granularity, symmetric=symmetric, scale_dtype=scale_dtype)
            codec = policy.codec_at(0)
            payload = codec.encode(x)
            out = torch.full((2, 3, 70, 32), float("nan"), dtype=dtype)
            t = payload.tensors
            used = native.affine_decode(t["codes"], t["scale"], t["zero"], bits, codec.group_size,
                                        codec.axis == "channel", symmetric, out[:, :, 3:67])
            assert used == (scale_dtype != "float32" or dtype == torch.float32)  # else: float32 scales, float64 out
            if used:
                assert torch.equal(out[:, :, 3:67], codec.decode(payload)), (dtype, scale_dtype)
                assert out[:, :, :3].isnan().all() and out[:, :, 67:].isnan().all()
    t = codec.encode(x.float()).tensors  # float32 scales into a float32 out: the kernel applies
    with pytest.raises(ValueError, match="do not hold"):  # a store whose groups do not cover its tokens
        native.affine_decode(t["codes"], t["scale"], t["zero"], bits, codec.group_size, codec.axis == "channel",
                             symmetric, out[:, :, 3:66].float())
    three = TensorPolicy(bits=3, granularity=granularity).codec_at(0)
    t = three.encode(x).tensors
    assert not native.affine_decode(t["codes"], t["scale"], t["zero"], 3, three.group_size, three.axis == "channel",
                                    False, out[:, :, 3:67])  # 3-bit codes straddle bytes: decoded in torch


@pytest.mark.parametrize("bits,symmetric", [(1, False), (2, False), (2, True), (4, False), (8, True)])
@pytest.mark.parametrize("granularity", ["per_channel(16)", "per_token(32)", "per_token(8)"])
def test_native_kernel_encodes_every_affine_setting_bit_for_bit(bits, granularity, symmetric):
    """The C encoder against quantize + packing: codes, scales and zero points equal bit for bit for
    parameters stored in float16 (subnormal and clamped ones too), bfloat16 and float32, clipped or
    not, constant groups (scale 0), from a strided view of a window; what it does not take (float64,
    3 bits) is encoded in torch."""
    if not native.available():
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(bits)
    magnitude = torch.logspace(-7, 6, 80)[torch.randperm(80, generator=gen)]  # fp16 subnormal scales; beyond 65504
    window = torch.randn(2, 3, 80, 32, generator=gen) * magnitude[:, None]
    window[0, 1, :32] = 1.5  # constant groups either way
    x = window[:, :, 8:72]
    for scale_dtype in ("float16", "bfloat16", "float32"):
        for clip in (1.0, 0.9):
            codec = TensorPolicy(bits=bits, granularity=granularity, symmetric=symmetric, scale_dtype=scale_dtype,
                                 clip_ratio=clip).codec_at(0)
            assert native.affine_encode(x, bits, codec.group_size, codec.axis == "channel", symmetric, clip,
                                        codec.param_dtype) is not None
            ours = codec.encode(x).tensors
            reference = codec._payload(quantize(x, bits, codec.group_size, codec._dim, symmetric, clip, codec.param_dtype), x)
            for name, t in reference.tensors.items():
                assert ours[name].shape == t.shape and torch.equal(ours[name], t), (scale_dtype, clip, name)
    assert native.affine_encode(x.double(), bits, 16, True, symmetric, 1.0, torch.float16) is None
    assert native.affine_encode(x, 3, 16, True, False, 1.0, torch.float16) is None


@pytest.mark.parametrize("dim", [32, 48, 64, 128])
@pytest.mark.parametrize("granularity", ["per_channel(16)", "per_token(16)"])
def test_native_kernel_takes_every_head_size(dim, granularity):
    """Head sizes compiled in (32, 64, 128) and taken at run time (48), decoding the first 48 tokens of
    a 64-token store followed by a 5-token window; a window of another shape is refused."""
    if not native.available():
        pytest.skip("no C compiler")
    codec = TensorPolicy(bits=2, granularity=granularity).codec_at(0)
    gen = torch.Generator().manual_seed(dim)
    x, tail = torch.randn(2, 3, 64, dim, generator=gen), torch.randn(2, 3, 5, dim, generator=gen)
    t = codec.encode(x).tensors
    out = torch.full((2, 3, 55, dim), float("nan"))
    assert native.affine_decode(t["codes"], t["scale"], t["zero"], 2, 16, codec.axis == "channel", False,
                                out[:, :, 1:54], stored=64, then=tail)
    assert torch.equal(out[:, :, 1:49], codec.decode(codec.encode(x))[:, :, :48])
    assert torch.equal(out[:, :, 49:54], tail)
    assert out[:, :, 0].isnan().all() and out[:, :, 54].isnan().all()
    with pytest.raises(ValueError, match="followed by"):
        native.affine_decode(t["codes"], t["scale"], t["zero"], 2, 16, codec.axis == "channel", False,
                             out[:1, :, 1:54], stored=64, then=tail)
    with pytest.raises(ValueError, match="do not hold"):  # more tokens than the store holds
        native.affine_decode(t["codes"], t["scale"], t["zero"], 2, 16, codec.axis == "channel", False,
                             torch.empty(2, 3, 65, dim), stored=64)
    with pytest.raises(ValueError, match=r"3 levels for 2-bit codes \(needs 4\)"):  # a codebook of the wrong size
        native.affine_decode(t["codes"], t["scale"], t["zero"], 2, 16, codec.axis == "channel", False,
                             out[:, :, 1:54], stored=64, then=tail, levels=torch.zeros(3))


@pytest.mark.parametrize("policy", [dict(bits=2, granularity="per_token(16)"), dict(codec="nf", bits=2, granularity="per_channel(16)"),
                                    dict(bits=3, granularity="per_channel(16)")])  # (3 bits: in torch)
def test_a_payloads_decoder_serves_every_step_until_the_payload_changes(policy):
    """The cache makes its codec's decoder once per payload (a kernel checks the store once) and
    calls it every step: each call decodes the tier's tokens, then the window, as decode does; a new
    payload gets a new decoder."""
    codec = TensorPolicy(**policy).codec_at(0)
    store, x = PayloadStore(codec), torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(0))
    store.encode(x[:, :, :32])
    decoders = []
    for n, window in ((16, 3), (32, 5), (32, 0)):
        store.n, tail = n, torch.randn(1, 2, window, 32)
        out = store.decode_into(torch.empty(1, 2, n + window, 32), tail)
        assert torch.equal(out[:, :, :n], store.decode()) and torch.equal(out[:, :, n:], tail)
        decoders.append(store._decoder[1])
    assert all(d is decoders[0] for d in decoders)
    store.encode(x[:, :, 32:])
    store.n = 64
    assert torch.equal(store.decode_into(torch.empty(1, 2, 64, 32), torch.empty(1, 2, 0, 32)), codec.decode(store.payload))
    assert store._decoder[0] is store.payload and store._decoder[1] is not decoders[0]


@pytest.mark.parametrize("spec", ["kivi2", KVSpec(
    key=dict(codec="nf", bits=2, granularity="per_channel(16)"), value=dict(bits=4, granularity="per_token(16)"),
    residual=8, sinks=3)], ids=["kivi2", "nf-k4v-sinks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_kernel_decode_step_is_the_general_update_bit_for_bit(spec, dtype, monkeypatch):
    """Most decode steps go through the kernel in one pass (`CompressedTensor.stepped`: the view and
    the new window, no copies of the tail); token by token, every view and every stored tensor equals
    the general path's, and the steps that encode (a group completes, or tokens are encoded ahead)
    still take it."""
    if not native.available():
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(1)
    keys, values = (torch.randn(2, 2, 300, 32, generator=gen, dtype=dtype) for _ in range(2))
    runs = []
    for stepping in (True, False):
        if not stepping:
            monkeypatch.setattr(CompressedTensor, "stepped", lambda self, new: None)
        cache = QuantizedKVCache(spec)
        views = [cache.update(keys[:, :, :150], values[:, :, :150], 0)]
        views += [cache.update(keys[:, :, t:t + 1], values[:, :, t:t + 1], 0) for t in range(150, 300)]
        runs.append((views, cache.layers[0]))
    (fast, layer), (general, reference) = runs
    assert all(torch.equal(a, b) for pair in zip(fast, general) for a, b in zip(*pair))
    for mine, theirs in ((layer.k, reference.k), (layer.v, reference.v)):
        assert mine.packed.n == theirs.packed.n and torch.equal(mine.tail, theirs.tail)
        assert all(torch.equal(mine.packed.payload.tensors[n], t) for n, t in theirs.packed.payload.tensors.items())
        assert layer.nbytes() == reference.nbytes()


def test_the_kernel_takes_the_decode_steps(monkeypatch):
    """The kernel takes every decode step whose leaving tokens are in the tail (encoding them first
    where they were not encoded ahead); a block of tokens to encode that reaches the new token takes
    the general path. A non-finite token is refused before anything
    changes, with the layer and position named."""
    if not native.available():
        pytest.skip("no C compiler")
    calls = []
    original = QuantizedKVLayer._decode_step
    monkeypatch.setattr(QuantizedKVLayer, "_decode_step", lambda self, k, v: calls.append(r := original(self, k, v)) or r)
    cache = QuantizedKVCache("kivi2")
    gen = torch.Generator().manual_seed(0)
    cache.update(torch.randn(1, 2, 160, 32, generator=gen), torch.randn(1, 2, 160, 32, generator=gen), 0)
    for _ in range(256):
        cache.update(torch.randn(1, 2, 1, 32, generator=gen), torch.randn(1, 2, 1, 32, generator=gen), 0)
    assert all(c is not None for c in calls[1:])  # the steps that encode a group or a block too
    narrow = QuantizedKVCache(KVSpec(residual=8))  # values encoded 9 ahead: a block reaches the new token
    narrow.update(torch.randn(1, 2, 40, 32, generator=gen), torch.randn(1, 2, 40, 32, generator=gen), 0)
    calls.clear()
    for _ in range(90):
        narrow.update(torch.randn(1, 2, 1, 32, generator=gen), torch.randn(1, 2, 1, 32, generator=gen), 0)
    assert sum(c is None for c in calls) == 10  # one step in 9 takes the general path
    layer = cache.layers[0]
    state = (layer.length, id(layer.k.tail), id(layer.v.tail), layer.v.packed.n)
    bad = torch.randn(1, 2, 1, 32)
    bad[0, 1, 0, 5] = float("inf")
    for k, v, name in ((bad, torch.zeros(1, 2, 1, 32), "keys"), (torch.zeros(1, 2, 1, 32), bad * float("nan"), "values")):
        with pytest.raises(ValueError, match=f"layer 0 got non-finite {name} \\(NaN or inf\\) for cache positions 416..416"):
            cache.update(k, v, 0)
        assert (layer.length, id(layer.k.tail), id(layer.v.tail), layer.v.packed.n) == state


def test_nf_codec_settings_are_checked_at_the_spec():
    with pytest.raises(ValueError, match="a NormalFloat codebook has 2 to 8 bits, got 1"):
        TensorPolicy(codec="nf", bits=1)
    with pytest.raises(ValueError, match="symmetric and clip_ratio do not apply"):
        TensorPolicy(codec="nf", bits=2, symmetric=True)
    with pytest.raises(ValueError, match=r"the nf codec groups per_channel\(G\) or per_token\(G\), not per_token_head"):
        TensorPolicy(codec="nf", bits=2, granularity="per_token_head")
    nf = TensorPolicy(codec="nf", bits=2, granularity="per_token(4)").codec_at(0)
    payload = nf.encode(torch.tensor([[[[0.0, 1.0, 2.0, 4.0]]]]))
    assert payload.tensors["codes"].flatten().tolist() == [0 | 0 << 2 | 1 << 4 | 3 << 6]  # levels -1, -1, 0, 1
    assert nf.decode(payload).flatten().tolist() == [0.0, 0.0, 2.0, 4.0]
    assert payload.nbytes() == 1 + 2 + 2  # four 2-bit codes, a float16 half-range and offset


@pytest.mark.parametrize("d,block", [(32, 32), (64, 64), (96, 32), (80, 16), (6, 2)])
def test_rotate_is_the_orthonormal_block_hadamard_with_random_signs(d, block):
    """rotate(x) = x R^T with R = blockdiag(H_b S / sqrt(b)), b the largest power of two dividing d
    (scipy's Sylvester H_b, S the seeded signs); the inverse is R^T; R is orthogonal (norms kept)."""
    import scipy.linalg

    from kvtrain.quant.hadamard import random_signs, rotate

    x = torch.randn(3, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    H = torch.from_numpy(scipy.linalg.hadamard(block)).double() / block ** 0.5
    for seed, signs in ((None, torch.ones(block)), (7, random_signs(block, 7))):
        R = torch.block_diag(*[H * signs.double()] * (d // block))
        torch.testing.assert_close(rotate(x, seed), x @ R.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(rotate(rotate(x, seed), seed, inverse=True), x, rtol=0, atol=1e-12)
        torch.testing.assert_close(rotate(x, seed).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="a Hadamard rotation needs an even size, got 33"):
        rotate(torch.zeros(2, 33))


def test_rotation_spreads_an_outlier_channel_before_per_token_quantization():
    """A head with one channel 30x the others: per-token 2-bit groups spend their range on it, so the
    others all round to one level; rotated, the outlier is spread over the head and the error drops.
    The stage stores what its inner codec stores (no bytes of its own) and decodes in K's own basis."""
    x = torch.randn(1, 2, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[..., 5] *= 30
    plain = TensorPolicy(bits=2, granularity="per_token(32)").codec_at(0)
    errors = {}
    for rotation in ("hadamard", "random_hadamard"):
        rotated = TensorPolicy(bits=2, granularity="per_token(32)", rotation=rotation).codec_at(0)
        errors[rotation] = (rotated.decode(rotated.encode(x)) - x).pow(2).mean().item()
        assert rotated.encode(x).nbytes() == plain.encode(x).nbytes()
    plain_error = (plain.decode(plain.encode(x)) - x).pow(2).mean().item()
    assert errors["hadamard"] < 0.6 * plain_error and errors["random_hadamard"] < 0.6 * plain_error


def test_a_grouped_head_rotation_is_one_hadamard_over_the_heads_side_by_side_by_hand():
    from scipy.linalg import hadamard

    codec = TensorPolicy(bits=2, granularity="per_token(4)", rotation="hadamard", rotation_heads=2).codec_at(0)
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # 4 heads of 4
    h8 = torch.tensor(hadamard(8), dtype=torch.float64) / 8 ** 0.5
    side_by_side = x.reshape(1, 2, 2, 3, 4).transpose(2, 3).reshape(1, 2, 3, 8)  # heads (0, 1) and (2, 3)
    expected = (side_by_side @ h8.T).reshape(1, 2, 3, 2, 4).transpose(2, 3).reshape(1, 4, 3, 4)
    torch.testing.assert_close(codec._rotate(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(codec._rotate(codec._rotate(x), inverse=True), x, rtol=0, atol=1e-12)
    outlier = torch.zeros(1, 4, 1, 4, dtype=torch.float64)
    outlier[0, 0, 0, 0] = 8.0  # one channel of head 0: spread evenly over heads 0 and 1, none to 2 and 3
    torch.testing.assert_close(codec._rotate(outlier).abs()[0, :, 0], torch.tensor([[8 / 8 ** 0.5] * 4] * 2 + [[0.0] * 4] * 2,
                                                                                  dtype=torch.float64))
    learned = TensorPolicy(bits=2, granularity="per_token(4)", rotation="learned", rotation_heads=0).codec_at(0)
    assert learned.make_state(head_dim=4, kv_heads=4).weight.shape == (16, 16)  # all four heads together
    with pytest.raises(ValueError, match="rotation_heads=3 must divide the layer's 4 KV heads"):
        TensorPolicy(bits=2, granularity="per_token(4)", rotation="hadamard", rotation_heads=3).codec_at(0).make_state(4, 4)
    with pytest.raises(ValueError, match="rotation_heads=2 groups heads for a rotation: set rotation too"):
        TensorPolicy(rotation_heads=2)


def test_rotation_settings_are_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match=r"rotation must be one of \('none', 'hadamard', 'random_hadamard', 'learned'\), got 'givens'"):
        TensorPolicy(rotation="givens")
    with pytest.raises(ValueError, match="rotation_seed must be an integer, got 1.5"):
        TensorPolicy(rotation="random_hadamard", rotation_seed=1.5)
    spec = KVSpec(key=dict(bits=4, granularity="per_token(32)", rotation="random_hadamard", rotation_seed=3),
                  value=dict(bits=2, granularity="per_token(32)", rotation="hadamard"))
    assert load_spec(spec.save(tmp_path)) == spec
    assert spec.keys(0).seed == 3 and spec.values(0).rotation == "hadamard"
    odd = KVSpec(key=dict(bits=2, granularity="per_channel(16)", rotation="hadamard"))
    with pytest.raises(ValueError, match="a Hadamard rotation needs an even head_dim; LlamaForCausalLM has head_dim=33"):
        odd.check_model(2, 33, "LlamaForCausalLM")


def test_outliers_by_hand():
    """[0.1, 9, -0.2, 0.3, -7, 0.05] keeping 2: the largest (9, index 1) and the smallest (-7, index 4) are
    stored in float16 with their indices; the dense part is clamped to the rest's range [-0.2, 0.3]."""
    from kvtrain.quant.outliers import merge_outliers, split_outliers

    x = torch.tensor([[0.1, 9.0, -0.2, 0.3, -7.0, 0.05]], dtype=torch.float64)
    dense, index, values = split_outliers(x, 2)
    assert index.dtype == torch.uint8 and index.tolist() == [[1, 4]]
    assert values.dtype == torch.float16 and values.tolist() == [[9.0, -7.0]]
    assert dense.tolist() == [[0.1, 0.3, -0.2, 0.3, -0.2, 0.05]]
    assert torch.equal(merge_outliers(dense, index, values), x)
    _, three, _ = split_outliers(x, 3)  # two largest, one smallest
    assert three.tolist() == [[1, 3, 4]]
    assert split_outliers(torch.tensor([[7e4, 0.0, 1.0, 2.0]]), 1)[2].tolist() == [[65504.0]]  # saturated, finite
    with pytest.raises(ValueError, match="a vector of 6 entries keeps 1 to 4 outliers, got 5"):
        split_outliers(x, 5)


def test_outliers_stage_keeps_the_extremes_and_counts_their_bytes():
    """Per-channel 2-bit keys with a few huge entries per token: keeping 2 per token exactly (float16)
    lowers the error, and the payload grows by exactly 2 values (2 bytes each) and 2 uint8 indices per
    token and head."""
    x = torch.randn(1, 2, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    spikes = torch.randint(0, 32, (1, 2, 64, 1), generator=torch.Generator().manual_seed(2))
    x = x.scatter(-1, spikes, 40.0)
    plain = TensorPolicy(bits=2, granularity="per_channel(16)").codec_at(0)
    kept = TensorPolicy(bits=2, granularity="per_channel(16)", outliers=2).codec_at(0)
    error = {name: (c.decode(c.encode(x)) - x).pow(2).mean().item() for name, c in (("plain", plain), ("kept", kept))}
    assert error["kept"] < 0.2 * error["plain"]
    assert kept.encode(x).nbytes() - plain.encode(x).nbytes() == 2 * 64 * 2 * (2 + 1)
    assert torch.equal(kept.decode(kept.encode(x)).gather(-1, spikes), x.gather(-1, spikes))
    composed = TensorPolicy(bits=2, granularity="per_token(16)", rotation="hadamard", outliers=2).codec_at(0)
    assert type(composed).__name__ == "Rotated" and type(composed.inner).__name__ == "Outliers"
    with pytest.raises(ValueError, match="outliers must be a non-negative integer, got -1"):
        TensorPolicy(outliers=-1)
    with pytest.raises(ValueError, match="31 outliers per token leave fewer than 2 of the 32 entries"):
        KVSpec(key=dict(bits=2, granularity="per_channel(16)", outliers=31)).check_model(2, 32, "LlamaForCausalLM")


def test_learnable_levels_train_with_the_model_and_the_cache_decodes_with_them(tmp_path):
    """nf with learnable=True: attach registers each layer's levels in the model (parameters, state_dict),
    the LM loss reaches them, the cache decodes with the levels as trained (parity after an update),
    detach leaves the model's own state_dict and outputs, and re-attaching the spec brings them back."""
    policy = dict(codec="nf", bits=2, learnable=True)
    spec = KVSpec(key=dict(policy, granularity="per_channel(16)"), value=dict(policy, granularity="per_token(16)"),
                  residual=8)
    model = build("llama")
    own_keys = set(model.state_dict())
    ids = torch.randint(0, 250, (2, 45), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
    attach(model, spec)
    levels = {n: p for n, p in model.named_parameters() if "kv_codec_state" in n}
    layers = model.config.num_hidden_layers
    assert len(levels) == 2 * layers and set(model.state_dict()) - own_keys == set(levels)
    assert all(p.shape == (4,) for p in levels.values())
    model.train()
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in levels.values())
    with torch.no_grad():
        for p in levels.values():
            p.sub_(0.1 * p.grad.sign())  # a step away from NormalFloat's levels
        trained_view = model(ids, use_cache=False).logits
    model.eval()
    decoded, _ = decode(model, ids, spec, [20])
    torch.testing.assert_close(decoded, trained_view, **TOL)
    trained = {n: p.detach().clone() for n, p in levels.items()}
    detach(model)
    assert set(model.state_dict()) == own_keys
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, plain)
    attach(model, spec)
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if "kv_codec_state" in n)
    attach(model, spec_from_dict(dict(spec.to_dict(), residual=16)))  # another spec: fresh levels
    fresh = [p for n, p in model.named_parameters() if "kv_codec_state" in n]
    assert all(torch.equal(p, fresh[0]) for p in fresh)  # every layer starts at NormalFloat's
    with pytest.raises(ValueError, match="reads them from the model it is attached to"):
        QuantizedKVCache(spec).update(torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), 0)
    detach(model)


def test_learned_levels_are_exported_next_to_the_spec_and_reloaded(tmp_path):
    """An export writes the learned levels to kv_codec_state.safetensors next to kv_spec.json (the model's
    own weights without them); loading the folder for eval puts them aside for the spec, so attaching it
    decodes exactly as the trained model did. A state of another spec is refused by name."""
    from kvtrain.callbacks.export import write_export
    from kvtrain.cli import load_for_eval
    from kvtrain.kv import CODEC_STATE_FILE, codec_state_dict, load_codec_state
    from kvtrain.kv.attention import suspended

    spec = KVSpec(key=dict(codec="nf", bits=2, granularity="per_channel(16)", learnable=True),
                  value=dict(bits=2, granularity="per_token(16)"), residual=8)
    model = build("llama")
    attach(model, spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "kv_codec_state" in name:
                p.mul_(0.8).add_(0.05)
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        trained = model(ids, use_cache=False).logits
    state = codec_state_dict(model)
    assert sorted(state) == [f"{layer}.key.levels" for layer in range(model.config.num_hidden_layers)]
    with suspended(model):
        write_export(model.save_pretrained, spec, tmp_path / "export", codec_state=state)
    assert (tmp_path / "export" / CODEC_STATE_FILE).is_file()
    reloaded, _, loaded_spec = load_for_eval(str(tmp_path / "export"))
    assert "kv_codec_state" not in "".join(reloaded.state_dict()) and loaded_spec == spec
    attach(reloaded, loaded_spec)
    with torch.no_grad():
        assert torch.equal(reloaded.double()(ids, use_cache=False).logits, trained)
    other = KVSpec(value=dict(codec="nf", bits=2, granularity="per_token(16)", learnable=True))
    attach(reloaded, other)
    with pytest.raises(ValueError, match=r"the codec state holds \['0.key.levels'.*learns \['0.value.levels'"):
        load_codec_state(reloaded, state)


def test_ternary_by_hand():
    """One token [0.1, -2, 0.5, 3] in a group of 4: mean |x| = 1.4, so entries beyond 0.7 are +-1: codes
    [0, -1, 0, 1], scale = mean |x| of those = 2.5, decoded [0, -2.5, 0, 2.5]. Stored: codes + 1 = [1, 0, 1, 2]
    as base-3 digits, with the next group's first (1: a zero) as the byte's fifth, 1 + 9 + 2 * 27 + 81; a
    group with nothing kept has scale 0 and decodes to zeros."""
    from kvtrain.quant.packing import pack_trits, unpack_trits

    codec = TensorPolicy(codec="ternary", bits=2, granularity="per_token(4)").codec_at(0)
    x = torch.tensor([0.1, -2.0, 0.5, 3.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64).view(1, 1, 1, 8)
    payload = codec.encode(x)
    assert payload.tensors["codes"].flatten().tolist() == [1 + 9 + 2 * 27 + 81, 1 + 3 + 9]  # 2nd group: all 1s
    assert payload.tensors["scale"].flatten().tolist() == [2.5, 0.0]
    assert codec.decode(payload).flatten().tolist() == [0.0, -2.5, 0.0, 2.5, 0.0, 0.0, 0.0, 0.0]
    codes = torch.randint(0, 3, (3, 4, 37), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    assert pack_trits(codes).shape == (3, 4, 8) and torch.equal(unpack_trits(pack_trits(codes), 37), codes)
    with pytest.raises(ValueError, match="8 bytes cannot hold exactly 41 ternary codes"):
        unpack_trits(pack_trits(codes), 41)


def test_mixed_channels_by_hand():
    """One group of 4 tokens (rows) and 4 channels (columns), half the channels high. Ranges 3, 0, 6, 3:
    channels 2 and 0 (the tie with channel 3 goes to the lower index) get 2 bits, min-max: scales 1 and 2,
    zeros 0, codes [0, 1, 2, 3] and [0, 3, 0, 3], exact. Channels 1 and 3 get 1 bit around their mean:
    channel 1 is constant (zero 1, s 0: exact), channel 3 = [0, 1, 2, -1] has zero 0.5 and s = mean
    |x - 0.5| = 1, codes x > 0.5 = [0, 1, 1, 0], decoded [-0.5, 1.5, 1.5, -0.5]. Stored high channels
    first: mask 0b0101, high codes token by token [0, 0, 1, 3, 2, 0, 3, 3] at 2 bits, low codes
    [0, 0, 0, 1, 0, 1, 0, 0] at 1 bit, parameters in the order 0, 2, 1, 3."""
    codec = TensorPolicy(codec="mixed", bits=2, granularity="per_channel(4)", scale_dtype="float32").codec_at(0)
    x = torch.tensor([[0.0, 1, 0, 0], [1, 1, 6, 1], [2, 1, 0, 2], [3, 1, 6, -1]]).view(1, 1, 4, 4)
    payload = codec.encode(x)
    t = payload.tensors
    assert t["channels"].flatten().tolist() == [0b0101]
    assert t["codes_high"].flatten().tolist() == [0 | 0 << 2 | 1 << 4 | 3 << 6, 2 | 0 << 2 | 3 << 4 | 3 << 6]
    assert t["codes_low"].flatten().tolist() == [1 << 3 | 1 << 5]
    assert t["scale"].flatten().tolist() == [1.0, 2.0, 0.0, 1.0] and t["zero"].flatten().tolist() == [0.0, 0.0, 1.0, 0.5]
    expected = x.clone()
    expected[..., 3] = torch.tensor([-0.5, 1.5, 1.5, -0.5])
    assert torch.equal(codec.decode(payload), expected)
    assert payload.nbytes() == 1 + 2 + 1 + 16 + 16


def test_mixed_channels_go_below_two_bits_per_entry_and_refuse_what_they_cannot_rank():
    """head_dim 32 in groups of 64 tokens, half the channels at 2 bits: 1.5 bits of codes, 0.5 of fp16
    scales and zeros, 1/64 of channel mask: 2.016 bits per entry; a quarter high: 1.77."""
    x = torch.randn(1, 2, 128, 32)
    for fraction, bits_per_entry in ((0.5, 1.5 + 0.5 + 1 / 64), (0.25, 1.25 + 0.5 + 1 / 64)):
        codec = TensorPolicy(codec="mixed", bits=2, granularity="per_channel(64)", high_fraction=fraction).codec_at(0)
        assert codec.encode(x).nbytes() * 8 / x.numel() == pytest.approx(bits_per_entry)
    with pytest.raises(ValueError, match="the mixed codec ranks channels within groups of tokens"):
        TensorPolicy(codec="mixed", bits=2, granularity="per_token(32)")
    with pytest.raises(ValueError, match=r"high_fraction must be a number in \[0, 1\], got 1.5"):
        TensorPolicy(codec="mixed", bits=2, high_fraction=1.5)


def test_ternary_stores_under_two_bits_per_entry_and_refuses_other_widths():
    """head_dim 32 in groups of 32: 7 bytes of codes and a 2-byte scale per token and head, 2.25 bits
    per entry with the scale (the 2-bit affine codec: 3 bits with its scale and zero point)."""
    x = torch.randn(1, 2, 10, 32)
    ternary = TensorPolicy(codec="ternary", bits=2, granularity="per_token(32)").codec_at(0)
    affine = TensorPolicy(bits=2, granularity="per_token(32)").codec_at(0)
    assert ternary.encode(x).nbytes() * 8 / x.numel() == 2.25 and affine.encode(x).nbytes() * 8 / x.numel() == 3
    with pytest.raises(ValueError, match=r"ternary codec's codes are -1, 0, \+1.*got bits=3"):
        TensorPolicy(codec="ternary", bits=3, granularity="per_token(32)")


def test_cayley_is_orthogonal_and_hand_computed():
    """W = [[0, 1], [0, 0]]: A = [[0, 1], [-1, 0]], (I - A)^-1 (I + A) = [[0, 1], [-1, 0]] (a quarter turn);
    W = 0 gives the identity exactly; any W gives an orthogonal matrix."""
    from kvtrain.quant.hadamard import cayley

    assert cayley(torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)).tolist() == [[0.0, 1.0], [-1.0, 0.0]]
    assert torch.equal(cayley(torch.zeros(8, 8)), torch.eye(8))
    r = cayley(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(r @ r.T, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("inner", [dict(bits=2), dict(codec="nf", bits=2, learnable=True)], ids=["affine", "nf"])
def test_a_learned_rotation_trains_and_the_cache_decodes_with_it(inner):
    """rotation: learned registers W (head_dim x head_dim) per layer and tensor, the inner codec's state
    beside it; at W = 0 it is the random Hadamard exactly; the LM loss reaches W; after a step the cache
    decodes with the rotation as trained (float64 parity), and a cache without the model's state refuses."""
    policy = dict(inner, rotation="learned")
    spec = KVSpec(key=dict(policy, granularity="per_channel(16)"), value=dict(policy, granularity="per_token(16)"),
                  residual=8)
    hadamard = spec_from_dict({**spec.to_dict(), "key": dict(spec.to_dict()["key"], rotation="random_hadamard"),
                               "value": dict(spec.to_dict()["value"], rotation="random_hadamard")})
    model = build("llama")
    ids = torch.randint(0, 250, (2, 45), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), attached(model, hadamard):
        random_hadamard = model(ids, use_cache=False).logits
    attach(model, spec)
    state = {n: p for n, p in model.named_parameters() if "kv_codec_state" in n}
    rotations = [p for n, p in state.items() if n.endswith(".weight")]
    layers = model.config.num_hidden_layers
    assert len(rotations) == 2 * layers and all(p.shape == (32, 32) for p in rotations)
    assert len(state) - len(rotations) == (2 * layers if inner.get("learnable") else 0)  # the nf levels
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, random_hadamard)
    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rotations)
    with torch.no_grad():
        for p in rotations:
            p.sub_(0.05 * p.grad.sign())
        trained_view = model(ids, use_cache=False).logits
    assert not torch.allclose(trained_view, random_hadamard)
    model.eval()
    decoded, _ = decode(model, ids, spec, [20])
    torch.testing.assert_close(decoded, trained_view, **TOL)
    with pytest.raises(ValueError, match="a learned rotation reads its parameter from the model"):
        QuantizedKVCache(spec).update(torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), 0)
    detach(model)
