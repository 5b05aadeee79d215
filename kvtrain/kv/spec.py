"""KVQuantSpec: what happens to keys and values at each layer, and when a token gets quantized.

When a token is compressed is the window rule (`kvtrain.kv.window.WindowRule`, DESIGN.md invariant 1),
defined there once and called by both the training-time view and the decode-time cache; the spec
says which rule each of K and V follows (its unit, the full-precision window, sinks, flush schedule).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from kvtrain.kv.window import WindowRule
from kvtrain.quant.uniform import check_bits

Axis = Literal["channel", "token"]
ScaleDtype = Literal["float16", "bfloat16", "float32"]
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class TensorQuant:
    """How one of K or V is quantized. axis="channel": each channel in groups of `group_size`
    consecutive tokens (KIVI keys); axis="token": each token in groups of `group_size` channels."""

    bits: int
    group_size: int
    axis: Axis
    symmetric: bool = False
    clip_ratio: float = 1.0
    scale_dtype: ScaleDtype = "float16"

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the cache stores scales and zero points in (the view rounds them the same way)."""
        return getattr(torch, self.scale_dtype)

    @property
    def unit(self) -> int:
        """Tokens that are quantized together."""
        return self.group_size if self.axis == "channel" else 1

    def quantized_len(self, total: int, residual: int) -> int:
        """Tokens held quantized with `total` in the cache under the plain streaming rule (no sinks)."""
        return WindowRule(self.unit, residual).end(total)


def _check_whole(name: str, value: object, low: int, rule: str) -> None:
    """A count must be an int: 2.5 tokens or True as a group size would only fail deep in a forward."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < low:
        raise ValueError(f"{name} {rule}, got {value!r}")


PRESETS = ("kivi2", "kivi4", "int8")
SPEC_FILE = "kv_spec.json"  # written next to an exported model so the spec travels with it


@dataclass
class KVQuantSpec:
    """KV-cache quantization. YAML-friendly; validated on construction.

    Args:
        key_bits / value_bits: 1..8 (2..8 when symmetric).
        key_group_size / value_group_size: tokens per group for axis "channel", channels per group
            (must divide head_dim; checked on attach) for axis "token".
        key_axis / value_axis: "channel" (per-channel, groups along tokens) or "token".
        residual: the newest `residual` tokens stay in full precision.
        sinks: the first `sinks` tokens stay in full precision for good (attention sinks).
        flush: KIVI's own schedule (its code, not its paper): per-channel tensors (keys) leave the
            full-precision window `residual` tokens at a time when it fills up, so it holds 0 to
            residual - 1 of them; per-token tensors (values) stream. False: every tensor streams (a unit
            is quantized as soon as it is complete and older than the newest `residual` tokens).
        symmetric: symmetric quantization instead of asymmetric min-max.
        clip_ratio: shrink each group's range by this factor (in (0, 1]); gradients outside it are 0.
        scale_dtype: the dtype the cache stores each group's scale and zero point in ("float16", as
            KIVI; "bfloat16" for activations beyond fp16's range; "float32"), whatever the model's dtype.
        layer_bits: per-layer bit override {layer_index: bits} for both K and V.
        full_precision_layers: layers left unquantized.
    """

    key_bits: int = 2
    key_group_size: int = 32
    key_axis: Axis = "channel"
    value_bits: int = 2
    value_group_size: int = 32
    value_axis: Axis = "token"
    residual: int = 128
    sinks: int = 0
    flush: bool = False
    symmetric: bool = False
    clip_ratio: float = 1.0
    scale_dtype: ScaleDtype = "float16"
    layer_bits: dict[int, int] = field(default_factory=dict)
    full_precision_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("key", "value"):
            check_bits(getattr(self, f"{name}_bits"), self.symmetric)
            _check_whole(f"{name}_group_size", getattr(self, f"{name}_group_size"), 1, "must be at least 1")
            if getattr(self, f"{name}_axis") not in ("channel", "token"):
                raise ValueError(f"{name}_axis must be 'channel' or 'token', got {getattr(self, f'{name}_axis')!r}")
        _check_whole("residual (the full-precision window)", self.residual, 0, "must be >= 0 tokens")
        _check_whole("sinks (tokens kept in full precision at the start)", self.sinks, 0, "must be >= 0")
        for name in ("symmetric", "flush"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("key", "value"):
            unit = getattr(self, f"{name}_group_size") if getattr(self, f"{name}_axis") == "channel" else 1
            if self.flush and unit > 1 and (self.residual < 1 or self.residual % unit):
                raise ValueError(f"flush=True moves residual={self.residual} tokens at a time out of the window: it must "
                                 f"be a positive multiple of {name}_group_size={unit}")
        if not 0 < self.clip_ratio <= 1:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        self.layer_bits = {int(k): v for k, v in self.layer_bits.items()}  # JSON keys are strings
        for layer, bits in self.layer_bits.items():
            check_bits(bits, self.symmetric)
            if layer < 0:
                raise ValueError(f"layer_bits has a negative layer index {layer}")
        for layer in self.full_precision_layers:
            _check_whole("full_precision_layers", layer, 0, f"holds layer indices >= 0 ({self.full_precision_layers})")

    @classmethod
    def preset(cls, name: str) -> "KVQuantSpec":
        """kivi2 / kivi4: keys per-channel in groups of 32 tokens, values per-token in groups of 32
        channels, 128-token full-precision window (KIVI's paper setting); int8: both per-token."""
        if name == "kivi2":
            return cls(key_bits=2, value_bits=2)
        if name == "kivi4":
            return cls(key_bits=4, value_bits=4)
        if name == "int8":
            return cls(key_bits=8, value_bits=8, key_axis="token", residual=0)
        raise ValueError(f"unknown KV spec preset {name!r}; choose one of {PRESETS}")

    @classmethod
    def resolve(cls, spec: "KVQuantSpec | str") -> "KVQuantSpec":
        """A spec from itself, a preset name, a JSON file, or a model folder holding kv_spec.json."""
        if not isinstance(spec, str):
            return spec
        if spec in PRESETS:
            return cls.preset(spec)
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / SPEC_FILE
        if path.is_file():
            return cls.load(path)
        raise ValueError(f"unknown KV spec {spec!r}: use a preset {PRESETS}, a spec JSON file, or a folder with {SPEC_FILE}")

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SPEC_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "KVQuantSpec":
        fields = json.loads(Path(path).read_text())
        try:
            return cls(**fields)
        except TypeError as e:
            raise ValueError(f"{path} is not a KVQuantSpec: {e}") from e

    def keys(self, layer: int) -> TensorQuant | None:
        return self._tensor("key", layer)

    def values(self, layer: int) -> TensorQuant | None:
        return self._tensor("value", layer)

    def window(self, quant: TensorQuant | None) -> WindowRule | None:
        """The window rule of K or V (None when that tensor stays in full precision)."""
        if quant is None:
            return None
        return WindowRule(quant.unit, self.residual, self.sinks, flush=self.flush and quant.unit > 1)

    def _tensor(self, name: str, layer: int) -> TensorQuant | None:
        if layer in self.full_precision_layers:
            return None
        return TensorQuant(
            bits=self.layer_bits.get(layer, getattr(self, f"{name}_bits")),
            group_size=getattr(self, f"{name}_group_size"),
            axis=getattr(self, f"{name}_axis"),
            symmetric=self.symmetric,
            clip_ratio=self.clip_ratio,
            scale_dtype=self.scale_dtype,
        )

    def check_model(self, num_layers: int, head_dim: int, model_name: str = "model") -> None:
        """Errors that need the model's shape: group sizes against head_dim, layer indices."""
        for name in ("key", "value"):
            g = getattr(self, f"{name}_group_size")
            if getattr(self, f"{name}_axis") == "token" and head_dim % g:
                raise ValueError(
                    f"{name}_group_size={g} does not divide head_dim={head_dim} of {model_name}; "
                    f"per-token groups split head_dim, so use a divisor of {head_dim}"
                )
        bad = sorted(i for i in [*self.layer_bits, *self.full_precision_layers] if i >= num_layers)
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for {model_name} with {num_layers} layers")

    def with_(self, **changes) -> "KVQuantSpec":
        return replace(self, **changes)
