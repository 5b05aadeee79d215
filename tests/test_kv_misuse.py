"""Mistakes that would silently compute something else are errors at the boundary: a cache used by a
model without the view, a cache of another spec than the attached one, counts that are not whole, NaN
K/V, a module with two decoders; and after fit the trained spec is one call away."""

import pytest
import torch
from test_kv_parity import TOL, build, decode

from kvtrain import KVQuantSpec, QuantizedKVCache, attach, attached


def test_decoding_with_the_cache_on_a_model_without_the_view_is_an_error():
    model = build("llama")  # two layers: layer 1's update finds layer 0 never went through the view
    ids = torch.randint(0, 512, (1, 20))
    with pytest.raises(ValueError, match="layer 0 attended to this cache without kvtrain's view.*attach"):
        model(ids, past_key_values=QuantizedKVCache("kivi2"))


def test_a_cache_of_another_spec_than_the_attached_one_is_an_error():
    model = build("llama")
    with attached(model, "kivi2"), pytest.raises(ValueError, match="attached with .*key_bits=2.* QuantizedKVCache of .*key_bits=4"):
        model(torch.randint(0, 512, (1, 20)), past_key_values=QuantizedKVCache("kivi4"))


def test_the_cache_argument_of_transformers_5_is_seen_too():
    """`model(ids, cache=...)` (transformers 5's name for past_key_values) decodes exactly as the view."""
    model = build("qwen2")
    spec = KVQuantSpec(key_group_size=8, value_group_size=16, residual=4)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(7))
    attach(model, spec)
    with torch.no_grad():
        view = model(ids, use_cache=False).logits
        cache = QuantizedKVCache(spec)
        steps = [model(ids[:, :25], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), view, **TOL)
    torch.testing.assert_close(decode(model, ids, spec, [25])[0], view, **TOL)


def test_filling_a_cache_by_hand_needs_no_model():
    cache = QuantizedKVCache("kivi2")
    for layer in range(2):
        cache.update(*torch.randn(2, 1, 2, 200, 32), layer)
    assert cache.layers[1].k.packed.n == 64 and cache.unviewed is None


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(residual=2.5), r"residual \(the full-precision window\) must be a whole number, got 2.5"),
    (dict(key_group_size=16.0), "key_group_size must be a whole number, got 16.0"),
    (dict(key_bits=True), "supports 1 to 8 bits, got True"),
    (dict(sinks=1.0), "sinks .* must be a whole number, got 1.0"),
    (dict(flush="yes"), "flush must be True or False, got 'yes'"),
    (dict(symmetric=1), "symmetric must be True or False, got 1"),
    (dict(full_precision_layers=[0.5]), r"full_precision_layers must be a whole number, got 0.5"),
])
def test_counts_and_switches_must_have_their_type(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVQuantSpec(**kwargs)


def test_non_finite_keys_are_reported_at_the_step_they_arrive():
    cache = QuantizedKVCache("kivi2")
    k, v = torch.randn(2, 1, 2, 10, 32)
    cache.update(k, v, 0)
    k[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layer 0 got non-finite keys \(NaN or inf\) for cache positions 10..19"):
        cache.update(k, v, 0)
    huge = torch.full((1, 2, 10, 32), 3e38)  # finite: their float32 sum would overflow, the check's does not
    cache.update(huge, -huge, 0)
    infinite = huge.clone()
    infinite[0, 0, 0, :2] = torch.tensor([float("inf"), -float("inf")])  # opposite infinities in one tensor
    with pytest.raises(ValueError, match=r"layer 0 got non-finite values \(NaN or inf\) for cache positions 20..29"):
        cache.update(huge, infinite, 0)


def test_a_module_with_two_decoders_names_the_one_to_attach():
    import lightning as L

    from kvtrain.callbacks import KVQuantCallback
    from kvtrain.callbacks.kv_quant import find_hf_model

    class Distill(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = build("llama"), build("llama")

    module = Distill()
    with pytest.raises(ValueError, match=r"Distill holds 2 transformers models \(student, teacher\).*model_attribute"):
        find_hf_model(module)
    assert find_hf_model(module, "student") is module.student
    with pytest.raises(ValueError, match="Distill has no module at 'pupil'"):
        find_hf_model(module, "pupil")
    callback = KVQuantCallback("kivi2", model_attribute="teacher")
    callback.setup(None, module, "fit")
    assert getattr(module.teacher, "kvtrain_state", None) is not None and not hasattr(module.student, "kvtrain_state")
    callback.teardown(None, module, "fit")
    assert not hasattr(module.teacher, "kvtrain_state")


def test_after_fit_the_trained_spec_is_one_call_away(corpus_file, tmp_path, caplog):
    import logging

    from test_kv_qat import SPEC, user_fit

    from kvtrain.callbacks import KVQuantCallback, spec_from_checkpoint

    callback = KVQuantCallback(bits=4, overrides=SPEC)
    with caplog.at_level(logging.INFO):
        user_fit(corpus_file, callback, steps=2, ckpt_dir=tmp_path)
    assert "decode as trained with attach(model, callback.spec) and QuantizedKVCache(callback.spec)" in caplog.text
    assert spec_from_checkpoint(tmp_path / "last.ckpt") == callback.spec == KVQuantSpec(key_bits=4, value_bits=4, **SPEC)
