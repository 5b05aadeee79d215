"""Pure quantization math: group-wise uniform quantization, straight-through fake-quant, bit packing."""

from kvtrain.quant.packing import pack, packed_length, unpack
from kvtrain.quant.uniform import QuantizedTensor, dequantize, fake_quant, quantize

__all__ = ["QuantizedTensor", "dequantize", "fake_quant", "pack", "packed_length", "quantize", "unpack"]
