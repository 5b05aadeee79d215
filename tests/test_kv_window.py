"""The window rule (kvtrain.kv.window): its tiers by hand, attention sinks and KIVI's flush schedule,
and train/decode parity under both (the view and the cache call the same rule)."""

import json

import pytest
import torch
from test_kv_parity import TOL, build, decode

from kvtrain import KVQuantSpec, attach, detach
from kvtrain.kv.window import WindowRule


def test_streaming_rule_by_hand():
    keys, values = WindowRule(unit=32, residual=128), WindowRule(unit=1, residual=128)
    assert [keys.end(t) for t in (128, 159, 160, 191, 192, 300)] == [0, 0, 32, 32, 64, 160]
    assert [values.end(t) for t in (128, 129, 300)] == [0, 1, 172]
    assert keys.start(300) == 0


def test_sinks_stay_full_precision():
    rule = WindowRule(unit=16, residual=8, sinks=4)
    # [0, 4) sinks; 16-token units from token 4 once older than the newest 8
    assert [(rule.start(t), rule.end(t)) for t in (2, 4, 27, 28, 43, 44, 100)] == [
        (2, 2), (4, 4), (4, 4), (4, 20), (4, 20), (4, 36), (4, 84)]
    start, end = rule.seen(torch.tensor([0, 26, 27, 99]))  # query p decodes with p + 1 tokens
    assert start.tolist() == [1, 4, 4, 4] and end.tolist() == [1, 4, 20, 84]
    mask = rule.mask(past=26, q_len=2, total=28, device="cpu")
    assert mask[0].sum() == 0 and mask[1].nonzero().flatten().tolist() == list(range(4, 20))
    assert rule.uniform(30, 10) and not rule.uniform(20, 10)


def test_flush_is_kivis_key_schedule():
    # KIVI's code: full-precision keys grow to R - 1, then all R are quantized (R a multiple of the group)
    rule = WindowRule(unit=32, residual=128, flush=True)
    assert [rule.end(t) for t in (127, 128, 200, 255, 256, 300)] == [0, 128, 128, 128, 256, 256]
    assert [t - rule.end(t) for t in range(1, 400)] == [t % 128 for t in range(1, 400)]
    assert WindowRule(unit=32, residual=128, sinks=2, flush=True).end(130) == 130


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(unit=0, residual=4), "unit >= 1"), (dict(unit=4, residual=-1), "residual >= 0"),
    (dict(unit=4, residual=4, sinks=-2), "sinks >= 0"), (dict(unit=32, residual=48, flush=True), "multiple of the unit"),
    (dict(unit=32, residual=0, flush=True), "positive multiple"),
])
def test_bad_windows_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WindowRule(**kwargs)


def test_spec_gives_each_tensor_its_rule(tmp_path):
    spec = KVQuantSpec(key_group_size=16, residual=32, sinks=4, flush=True)
    assert spec.window(spec.keys(0)) == WindowRule(16, 32, 4, flush=True)
    assert spec.window(spec.values(0)) == WindowRule(1, 32, 4, flush=False)  # per-token values stream, as in KIVI
    assert KVQuantSpec(full_precision_layers=[0]).window(KVQuantSpec(full_precision_layers=[0]).keys(0)) is None
    with pytest.raises(ValueError, match="residual=48 .* multiple of key_group_size=32"):
        KVQuantSpec(residual=48, flush=True)
    with pytest.raises(ValueError, match="sinks .* must be >= 0, got -1"):
        KVQuantSpec(sinks=-1)
    old = {k: v for k, v in KVQuantSpec().__dict__.items() if k not in ("sinks", "flush")}  # a file from before
    (tmp_path / "kv_spec.json").write_text(json.dumps(old))
    assert KVQuantSpec.load(tmp_path / "kv_spec.json") == KVQuantSpec.preset("kivi2")


WINDOWED = {  # (spec, length)
    "sinks4-R8-G16": (KVQuantSpec(key_group_size=16, value_group_size=16, residual=8, sinks=4), 77),
    "flush-R32-G16": (KVQuantSpec(key_group_size=16, value_group_size=16, residual=32, flush=True), 101),
    "sinks3-flush-R16-G8": (KVQuantSpec(key_bits=4, key_group_size=8, value_group_size=16, residual=16, sinks=3,
                                        flush=True), 90),
}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])  # gemma2: softcapping, the eager path
@pytest.mark.parametrize("name", WINDOWED)
def test_training_forward_equals_decoding_with_sinks_and_flush(arch, name):
    spec, length = WINDOWED[name]
    model = build(arch)
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(5))
    attach(model, spec)
    model.train()
    with torch.no_grad():
        trained_view = model(ids, use_cache=False).logits
    model.eval()
    for splits in ([], [length // 2], [5, 40]):
        decoded, cache = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, trained_view, **TOL, msg=f"prefill splits {splits}")
    keys, values = cache.layers[0].k, cache.layers[0].v
    for tensor in (keys, values):  # the cache holds the rule's tiers
        assert tensor.sinks.shape[-2] == spec.sinks if spec.sinks else tensor.sinks is None
        assert spec.sinks + tensor.packed.n == tensor.rule.end(length) and tensor.packed.n > 0
        assert tensor.tail.shape[-2] == length - tensor.rule.end(length)
    detach(model)


def test_sinks_are_stored_exactly_and_change_the_view():
    model = build("llama")
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(6))
    plain = KVQuantSpec(key_group_size=16, value_group_size=16, residual=8)
    with torch.no_grad():
        exact = model(ids[:, :4], use_cache=True).past_key_values  # layer 0's K/V do not depend on any view
    logits = {}
    for sinks in (0, 4):
        attach(model, plain.with_(sinks=sinks))
        with torch.no_grad():
            logits[sinks] = model(ids, use_cache=False).logits
        _, cache = decode(model, ids, plain.with_(sinks=sinks), [30])
        detach(model)
    assert (logits[4] - logits[0]).abs().max() > 1e-3
    layer = cache.layers[0]
    assert torch.equal(layer.k.sinks, exact.layers[0].keys) and torch.equal(layer.v.sinks, exact.layers[0].values)
