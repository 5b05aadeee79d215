import pytest
import torch

from kvtrain import KVQuantSpec
from kvtrain.kv.spec import TensorQuant


def test_kivi_presets():
    for bits in (2, 4):
        s = KVQuantSpec.preset(f"kivi{bits}")
        assert (s.key_bits, s.value_bits, s.residual) == (bits, bits, 128)
        assert s.keys(0) == TensorQuant(bits, 32, "channel")
        assert s.values(3) == TensorQuant(bits, 32, "token")
    assert KVQuantSpec.preset("kivi2").keys(0).param_dtype == torch.float16  # KIVI stores scales in fp16
    assert KVQuantSpec(scale_dtype="bfloat16").values(0).param_dtype == torch.bfloat16
    int8 = KVQuantSpec.preset("int8")
    assert int8.keys(0) == TensorQuant(8, 32, "token") and int8.residual == 0


def test_streaming_rule():
    keys, values = TensorQuant(2, 32, "channel"), TensorQuant(2, 32, "token")
    # 128-token window: nothing before 160 tokens is a whole key group older than the window
    assert [keys.quantized_len(t, 128) for t in (128, 159, 160, 191, 192, 300)] == [0, 0, 32, 32, 64, 160]
    assert [values.quantized_len(t, 128) for t in (128, 129, 300)] == [0, 1, 172]
    assert keys.quantized_len(31, 0) == 0 and keys.quantized_len(32, 0) == 32  # never a 1-token key group


def test_per_layer_overrides():
    s = KVQuantSpec(layer_bits={"1": 4}, full_precision_layers=[0])
    assert s.keys(0) is None and s.values(0) is None
    assert s.keys(1).bits == 4 and s.values(1).bits == 4
    assert s.keys(2).bits == 2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(key_bits=9), "supports 1 to 8 bits, got 9"),
        (dict(value_bits=0), "supports 1 to 8 bits, got 0"),
        (dict(symmetric=True, key_bits=1), "symmetric quantization supports 2 to 8 bits, got 1"),
        (dict(residual=-1), "residual .* must be >= 0 tokens, got -1"),
        (dict(key_group_size=0), "key_group_size must be at least 1, got 0"),
        (dict(value_axis="head"), "value_axis must be 'channel' or 'token', got 'head'"),
        (dict(clip_ratio=1.5), r"clip_ratio must be in \(0, 1\], got 1.5"),
        (dict(layer_bits={0: 16}), "supports 1 to 8 bits, got 16"),
        (dict(scale_dtype="float8"), r"scale_dtype must be one of \('float16', 'bfloat16', 'float32'\), got 'float8'"),
    ],
)
def test_construction_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVQuantSpec(**kwargs)


def test_model_dependent_errors():
    with pytest.raises(ValueError, match="value_group_size=32 does not divide head_dim=48 of Foo"):
        KVQuantSpec().check_model(num_layers=4, head_dim=48, model_name="Foo")
    with pytest.raises(ValueError, match=r"layer indices \[4\] are out of range for Foo with 4 layers"):
        KVQuantSpec(full_precision_layers=[4]).check_model(4, 32, "Foo")
    with pytest.raises(ValueError, match="unknown KV spec preset 'kivi3'"):
        KVQuantSpec.preset("kivi3")
