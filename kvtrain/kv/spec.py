"""Specs: what happens to keys and values at each layer, and when a token gets compressed.

`KVSpec` (version 2) gives keys and values each a `TensorPolicy` (a registered codec, its bits, per-layer
bits, granularity); `KVQuantSpec` is the flat form of an affine (KIVI-style) spec that kvtrain started
with (`to_v2()` converts it). Both answer the pipeline's questions the same way: `keys(layer)` /
`values(layer)` give the codec of that layer (None: full precision), `window(codec)` its window rule.

When a token is compressed is the window rule (`kvtrain.kv.window.WindowRule`, DESIGN.md invariant 1),
defined there once and called by both the training-time view and the decode-time cache; the spec
says which rule each of K and V follows (its unit, the full-precision window, sinks, flush schedule).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvtrain.kv.codecs import CODECS, Codec, build_codec
from kvtrain.kv.codecs.affine import SCALE_DTYPES, Axis, ScaleDtype, TensorQuant
from kvtrain.kv.codecs.rotation import ROTATIONS, Rotation
from kvtrain.kv.eviction import EvictionPolicy, check_token_wise
from kvtrain.kv.placement import PLACEMENTS, Placement
from kvtrain.kv.window import WindowRule
from kvtrain.quant.granularity import parse_granularity
from kvtrain.quant.uniform import check_bits


def _check_whole(name: str, value: object, low: int, rule: str) -> None:
    """A count must be an int: 2.5 tokens or True as a group size would only fail deep in a forward."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < low:
        raise ValueError(f"{name} {rule}, got {value!r}")


PRESETS = ("kivi2", "kivi4", "int8")  # KVQuantSpec.preset
# vLLM's KV formats (kvtrain.kv.codecs.vllm), every token compressed on arrival as vLLM does
SERVING_PRESETS = ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head", "fp8")
SPEC_FILE = "kv_spec.json"  # written next to an exported model so the spec travels with it
CODEC_STATE_FILE = "kv_codec_state.safetensors"  # next to it: the learnable codec state, as trained


class _LayerPlan(ABC):
    """What both spec forms share: the window rule, full-precision layers, saving, `with_`."""

    residual: int
    sinks: int
    flush: bool
    placement: Placement
    full_precision_layers: list[int]
    eviction: EvictionPolicy | None = None  # which tokens survive (KVSpec's; KVQuantSpec evicts none)
    joint_kv: bool = False  # K and V share the key policy's latent (KVSpec's; KVQuantSpec's are apart)

    def keys(self, layer: int) -> Codec | None:
        return None if layer in self.full_precision_layers else self._codec("key", layer)

    def values(self, layer: int) -> Codec | None:
        return None if layer in self.full_precision_layers else self._codec("value", layer)

    def window(self, codec: Codec | None) -> WindowRule | None:
        """The window rule of K or V (None when that tensor stays in full precision)."""
        if codec is None:
            return None
        return WindowRule(codec.unit, self.residual, self.sinks, flush=self.flush and codec.unit > 1)

    def check_model(self, num_layers: int, head_dim: int, model_name: str = "model") -> None:
        """Errors that need the model's shape: groups against head_dim, layer indices."""
        for name in ("key", "value"):
            for codec in self._distinct_codecs(name).values():
                codec.check_model(head_dim, self._granularity_name(name), model_name)
        if self.eviction is not None and self.eviction.retain is not None:
            self.eviction.retention().check_model(head_dim, "eviction.retain.granularity group", model_name)
        bad = sorted(i for i in [*self._layer_indices(), *self.full_precision_layers] if i >= num_layers)
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for {model_name} with {num_layers} layers")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SPEC_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def with_(self, **changes):
        return replace(self, **changes)

    def _check_window(self) -> None:
        _check_whole("residual (the full-precision window)", self.residual, 0, "must be >= 0 tokens")
        _check_whole("sinks (tokens kept in full precision at the start)", self.sinks, 0, "must be >= 0")
        _check_switch("flush", self.flush)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        for layer in self.full_precision_layers:
            _check_whole("full_precision_layers", layer, 0, f"holds layer indices >= 0 ({self.full_precision_layers})")
        for name in ("key", "value"):
            for codec in self._distinct_codecs(name).values():
                if self.flush and codec.unit > 1 and (self.residual < 1 or self.residual % codec.unit):
                    raise ValueError(f"flush=True moves residual={self.residual} tokens at a time out of the window: "
                                     f"it must be a positive multiple of {self._granularity_name(name)}={codec.unit}")

    def _distinct_codecs(self, name: str) -> dict[int, Codec]:
        """The codec of every distinct bit width (layer -1: the default); none for a full-precision tensor."""
        codecs = {layer: self._codec(name, layer) for layer in (-1, *self._layer_indices())}
        return {layer: codec for layer, codec in codecs.items() if codec is not None}

    @abstractmethod
    def _codec(self, name: str, layer: int) -> Codec | None:
        """The codec of K (name "key") or V at a layer that is compressed (None: kept in full precision)."""

    @abstractmethod
    def _layer_indices(self) -> list[int]:
        """Layers with their own bits."""

    @abstractmethod
    def _granularity_name(self, name: str) -> str:
        """The setting an error about K's or V's grouping names."""


def _check_switch(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass
class KVQuantSpec(_LayerPlan):
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
        placement: "post_rope" (keys as attention receives them) or "pre_rope" (keys before the
            model's rotary embedding, rotated after decoding with each token's position, as KVQuant).
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
    placement: Placement = "post_rope"
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
        _check_switch("symmetric", self.symmetric)
        _check_affine(self.clip_ratio, self.scale_dtype)
        self.layer_bits = _layer_table(self.layer_bits, self.symmetric, "layer_bits")
        self._check_window()

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
    def resolve(cls, spec: "Spec | str") -> "Spec":
        """A spec from itself, a preset name, a JSON file, or a model folder holding kv_spec.json."""
        return resolve_spec(spec)

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        return load_spec(path)

    def to_v2(self) -> "KVSpec":
        """The same spec in the version-2 form (separate key and value policies)."""
        def policy(name: str) -> TensorPolicy:
            return TensorPolicy("affine", getattr(self, f"{name}_bits"), str(self._codec(name, -1).granularity),
                                self.symmetric, self.clip_ratio, self.scale_dtype, dict(self.layer_bits))

        return KVSpec(key=policy("key"), value=policy("value"), residual=self.residual, sinks=self.sinks,
                      flush=self.flush, placement=self.placement, full_precision_layers=list(self.full_precision_layers))

    def with_bits(self, bits: int) -> "KVQuantSpec":
        """The same spec with K and V at `bits`."""
        return self.with_(key_bits=bits, value_bits=bits)

    def _codec(self, name: str, layer: int) -> TensorQuant:
        return TensorQuant(
            bits=self.layer_bits.get(layer, getattr(self, f"{name}_bits")),
            group_size=getattr(self, f"{name}_group_size"),
            axis=getattr(self, f"{name}_axis"),
            symmetric=self.symmetric,
            clip_ratio=self.clip_ratio,
            scale_dtype=self.scale_dtype,
        )

    def _layer_indices(self) -> list[int]:
        return list(self.layer_bits)

    def _granularity_name(self, name: str) -> str:
        return f"{name}_group_size"


def _check_affine(clip_ratio: float, scale_dtype: str) -> None:
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")


def _layer_table(table: dict, symmetric: bool, name: str) -> dict[int, int]:
    """{layer: bits} with int keys (JSON keys are strings), checked."""
    table = {int(k): v for k, v in table.items()}
    for layer, bits in table.items():
        check_bits(bits, symmetric)
        if layer < 0:
            raise ValueError(f"{name} has a negative layer index {layer}")
    return table


@dataclass
class TensorPolicy:
    """How one of K or V is compressed (spec version 2).

    Args:
        codec: a registered codec name (`kvtrain.kv.codecs.CODECS`): "affine" (KIVI-style min-max),
            "nf" (KVQuant's NormalFloat codebook), "ternary" (VidKV's -s/0/+s), "mixed" (VidKV's
            b-bit widest channels and 1-bit others), "raw" (as it arrives: a low-rank latent), vLLM's
            "int8_per_token_head", "fp8_per_token_head", "int4_per_token_head", "fp8".
        bits: bits per element.
        granularity: which elements share a scale: "per_channel(G)" (G tokens per group along each
            channel), "per_token(G)" (G channels per group within a token), "per_token_head", "per_tensor".
        symmetric / clip_ratio / scale_dtype: the affine codec's options (see KVQuantSpec).
        layer_bits: per-layer bits {layer: bits} for this tensor only (e.g. K at 4 bits in layer 0).
        rotation: "none", "hadamard", "random_hadamard" or "learned": an orthogonal rotation of each head
            before the codec, undone after decoding (`kvtrain.kv.codecs.rotation`, QuaRot / RotateKV;
            "learned": the random Hadamard times a trained Cayley rotation per layer, SpinQuant's R2).
        rotation_seed: the random signs of "random_hadamard" and "learned".
        rotation_heads: KV heads rotated together, their channels side by side (RotateKV's grouped-head
            rotation; 0: all of a layer's heads); 1: each head alone.
        reorder_channels: RotateKV's channel reordering (`kvtrain.kv.codecs.reorder`): the rotated channels
            of each group of `rotation_heads` heads handed to the codec sorted by their mean, so each
            per-token group holds channels of similar offset (the identity until `kvtrain calibrate`).
        outliers: per token and head, this many entries (the largest and smallest) kept aside in
            `scale_dtype` with their indices, the rest quantized without them (KVQuant's
            dense-and-sparse, `kvtrain.kv.codecs.outliers`); 0 keeps none.
        learnable: the codec's state (nf: its levels) trains with the model; `attach` registers it in
            each attention layer.
        high_fraction: the mixed codec's share of each head's channels (the widest in each group of
            tokens) kept at `bits`; the rest get 1 bit (VidKV's mixed-precision keys).
        rank: a low-rank stage (`kvtrain.kv.codecs.lowrank`, CSKV / Palu): each token's group of heads
            stored as a latent of `rank` numbers, projected and reconstructed by learned factors
            (initialized from the SVD of k_proj / v_proj, refitted by `kvtrain calibrate`), the latent
            encoded by `codec` ("raw": in the cache's dtype, bits 16; "affine": quantized); 0: off.
        latent_heads: KV heads per latent (0: all of a layer's, as CSKV; Palu groups 4).
        layer_rank: per-layer ranks {layer: rank} overriding `rank` (`kvtrain calibrate --ranks fisher`
            writes them: the same bytes as `rank` everywhere, spent where the loss is most sensitive).
        prune_channels: ThinK's channel pruning (`kvtrain.kv.codecs.channels`): this fraction of each
            head's channels is not stored (keys: the lowest query-key scores, values: the lowest
            energies; scored by `kvtrain calibrate`), the kept ones encoded by `codec` ("raw", bits 16:
            ThinK itself); 0: off.
    """

    codec: str = "affine"
    bits: int = 2
    granularity: str = "per_channel(32)"
    symmetric: bool = False
    clip_ratio: float = 1.0
    scale_dtype: ScaleDtype = "float16"
    layer_bits: dict[int, int] = field(default_factory=dict)
    rotation: Rotation = "none"
    rotation_seed: int = 0
    rotation_heads: int = 1
    reorder_channels: bool = False
    outliers: int = 0
    learnable: bool = False
    high_fraction: float = 0.5
    rank: int = 0
    latent_heads: int = 0
    layer_rank: dict[int, int] = field(default_factory=dict)
    prune_channels: float = 0.0

    def __post_init__(self) -> None:
        self.granularity = str(parse_granularity(self.granularity))
        _check_switch("learnable", self.learnable)
        if self.learnable and not getattr(CODECS.get(self.codec), "learnable_state", False):
            raise ValueError(f"the {self.codec!r} codec has no learnable state; learnable=True applies to "
                             f"{sorted(n for n, c in CODECS.items() if c.learnable_state)}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if isinstance(self.high_fraction, bool) or not isinstance(self.high_fraction, (int, float)) or not (
                0 <= self.high_fraction <= 1):
            raise ValueError(f"high_fraction must be a number in [0, 1], got {self.high_fraction!r}")
        for name in ("rotation_seed", "rotation_heads", "outliers", "rank", "latent_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (name != "rotation_seed" and value < 0):
                raise ValueError(f"{name} must be {'an' if name == 'rotation_seed' else 'a non-negative'} integer, got {value!r}")
        if self.rotation_heads != 1 and self.rotation == "none":
            raise ValueError(f"rotation_heads={self.rotation_heads} groups heads for a rotation: set rotation too")
        _check_switch("reorder_channels", self.reorder_channels)
        if self.reorder_channels and self.rotation == "none":
            raise ValueError("reorder_channels orders the channels a rotation makes (RotateKV): set rotation too")
        if isinstance(self.prune_channels, bool) or not isinstance(self.prune_channels, (int, float)) or not (
                0 <= self.prune_channels < 1):
            raise ValueError(f"prune_channels must be a fraction in [0, 1), got {self.prune_channels!r}")
        if self.prune_channels and self.rank:
            raise ValueError(f"prune_channels={self.prune_channels} and rank={self.rank} both shrink each token: "
                             "use one of them (a low-rank latent already chooses its directions)")
        self.layer_rank = {int(k): v for k, v in self.layer_rank.items()}  # (JSON keys are strings)
        for layer, rank in self.layer_rank.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or layer < 0:
                raise ValueError(f"layer_rank maps layer indices >= 0 to ranks >= 1, got {{{layer}: {rank!r}}}")
        if self.layer_rank and not self.rank:
            raise ValueError(f"layer_rank={self.layer_rank} overrides the rank of a low-rank latent in some layers: "
                             "set rank (the other layers') too")
        if self.latent_heads and not self.rank:
            raise ValueError(f"latent_heads={self.latent_heads} groups the heads of a low-rank latent: set rank too")
        _check_switch("symmetric", self.symmetric)
        _check_affine(self.clip_ratio, self.scale_dtype)
        if self.bits != getattr(CODECS.get(self.codec), "bits_stored", None):  # (raw: 16, the cache's dtype)
            check_bits(self.bits, self.symmetric)
        self.layer_bits = _layer_table(self.layer_bits, self.symmetric, "layer_bits")
        for bits in {self.bits, *self.layer_bits.values()}:
            build_codec(self, bits)  # the codec's own errors (bit range, granularity), here and not in a forward

    def codec_at(self, layer: int) -> Codec:
        policy = replace(self, rank=self.layer_rank[layer], layer_rank={}) if layer in self.layer_rank else self
        return build_codec(policy, self.layer_bits.get(layer, self.bits))


SPEC_VERSION = 2


@dataclass
class KVSpec(_LayerPlan):
    """KV-cache compression, version 2: a policy for keys and one for values, and the window.

    YAML:
        kv_spec:
          version: 2
          key: {bits: 4, granularity: per_channel(32)}
          value: {bits: 2, granularity: per_token(32), layer_bits: {0: 4}}
          residual: 128

    Args:
        key / value: a TensorPolicy (or a dict of its fields) for K / V; None keeps it in full precision.
        residual / sinks / flush / placement / full_precision_layers: as in KVQuantSpec.
        eviction: which tokens survive (an `EvictionPolicy` or a dict of its fields; None: all of them).
            For now with full-precision K and V (key: null, value: null) and post-RoPE keys.
        joint_kv: K and V share one latent (MHA2MLA's joint low-rank cache): the key policy, which must
            have a `rank` (over all of a layer's heads: latent_heads 0), stores each token's keys and
            values side by side as one latent, initialized from the SVD of k_proj and v_proj stacked;
            `value` must be None (the key policy holds both). Pre-RoPE, only the keys are rotated.
        version: 2 (written into kv_spec.json, so a file says which form it holds).

    Token eviction (SnapKV keeping a quarter of the tokens, a decision every 64):
        kv_spec: {version: 2, key: null, value: null, eviction: {selector: snapkv, budget: 0.25, interval: 64}}
    """

    key: TensorPolicy | None = field(default_factory=lambda: TensorPolicy(granularity="per_channel(32)"))
    value: TensorPolicy | None = field(default_factory=lambda: TensorPolicy(granularity="per_token(32)"))
    residual: int = 128
    sinks: int = 0
    flush: bool = False
    placement: Placement = "post_rope"
    full_precision_layers: list[int] = field(default_factory=list)
    eviction: EvictionPolicy | None = None
    joint_kv: bool = False
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.version != SPEC_VERSION:
            raise ValueError(f"KVSpec version must be {SPEC_VERSION}, got {self.version!r}")
        for name in ("key", "value"):
            policy = getattr(self, name)
            if isinstance(policy, dict):
                setattr(self, name, TensorPolicy(**policy))
            elif policy is not None and not isinstance(policy, TensorPolicy):
                raise ValueError(f"{name} must be a TensorPolicy, a dict of its fields or None, got {policy!r}")
        if isinstance(self.eviction, dict):
            unknown = sorted(set(self.eviction) - {f.name for f in fields(EvictionPolicy)})
            if unknown:
                raise ValueError(f"eviction has no field(s) {unknown}; its fields: {[f.name for f in fields(EvictionPolicy)]}")
            self.eviction = EvictionPolicy(**self.eviction)
        elif self.eviction is not None and not isinstance(self.eviction, EvictionPolicy):
            raise ValueError(f"eviction must be an EvictionPolicy, a dict of its fields or None, got {self.eviction!r}")
        if self.eviction is not None and (self.key is not None or self.value is not None):
            self._check_quantized_eviction()
        if self.eviction is not None and self.placement != "post_rope":
            raise ValueError(f"eviction keeps keys as attention receives them: placement must be 'post_rope', "
                             f"got {self.placement!r}")
        _check_switch("joint_kv", self.joint_kv)
        if self.joint_kv:
            self._check_joint()
        self._check_window()

    def _check_joint(self) -> None:
        """A joint latent: the key policy's low-rank stage holds K and V, so there is nothing else to say."""
        if self.key is None or not self.key.rank:
            raise ValueError(f"joint_kv=True stores K and V as one low-rank latent: the key policy must set rank "
                             f"(got key={self.key})")
        if self.value is not None:
            raise ValueError("joint_kv=True: the key policy's latent holds the values too, so value must be None "
                             f"(got value={self.value})")
        if self.key.latent_heads:
            raise ValueError(f"joint_kv=True projects all of a layer's keys and values together: latent_heads must be "
                             f"0, got {self.key.latent_heads}")
        if self.eviction is not None:
            raise ValueError("joint_kv=True with eviction: evicting a token from a joint latent is not supported")

    def _check_quantized_eviction(self) -> None:
        """Eviction over quantized K/V: every token encoded on arrival by a token-wise codec, the
        survivors held encoded (the eviction's sinks and recent window keep tokens, not precision)."""
        for name in ("key", "value"):
            if getattr(self, name) is not None:
                check_token_wise(getattr(self, name), f"under eviction {name} is quantized as each token arrives")
        if self.residual or self.sinks:
            raise ValueError(f"under eviction K/V are quantized as each token arrives: residual and sinks must be 0 "
                             f"(eviction's own sinks and recent keep tokens), got residual={self.residual}, "
                             f"sinks={self.sinks}")
        if self.eviction.merge:
            raise ValueError("merge averages the survivors' K/V: it does not combine with quantized K/V yet")

    def with_bits(self, bits: int) -> "KVSpec":
        """The same spec with K and V at `bits` (per-layer bits kept)."""
        if self.joint_kv:  # (the key policy's latent holds both)
            return self.with_(key=replace(self.key, bits=bits))
        if self.key is None or self.value is None:
            raise ValueError(f"bits={bits} sets the bits of K and V, but this spec keeps "
                             f"{'K' if self.key is None else 'V'} in full precision")
        return self.with_(key=replace(self.key, bits=bits), value=replace(self.value, bits=bits))

    def _codec(self, name: str, layer: int) -> Codec | None:
        policy = getattr(self, name)
        return None if policy is None else policy.codec_at(layer)

    def _layer_indices(self) -> list[int]:
        return sorted({layer for policy in (self.key, self.value) if policy is not None
                       for layer in (*policy.layer_bits, *policy.layer_rank)})

    def _granularity_name(self, name: str) -> str:
        return f"{name}.granularity group"


Spec = KVQuantSpec | KVSpec


def spec_from_dict(fields: dict[str, Any]) -> Spec:
    """A spec from its `to_dict()` (a kv_spec.json, a checkpoint): version 2 or the flat form."""
    fields = dict(fields)
    try:
        if "version" in fields:
            return KVSpec(**fields)
        return KVQuantSpec(**fields)
    except TypeError as e:
        raise ValueError(f"not a KV spec ({e}): {fields}") from e


def load_spec(path: str | Path) -> Spec:
    try:
        return spec_from_dict(json.loads(Path(path).read_text()))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def resolve_spec(spec: "Spec | str") -> Spec:
    """A spec from itself, a preset name, a JSON file, or a model folder holding kv_spec.json."""
    if not isinstance(spec, str):
        return spec
    if spec in PRESETS:
        return KVQuantSpec.preset(spec)
    if spec in SERVING_PRESETS:
        return serving_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / SPEC_FILE
    if path.is_file():
        return load_spec(path)
    raise ValueError(f"unknown KV spec {spec!r}: use a preset {PRESETS + SERVING_PRESETS}, a spec JSON file, or a "
                     f"folder with {SPEC_FILE}")


def codec_state_file(spec: "Spec | str") -> Path | None:
    """The kv_codec_state.safetensors beside a spec given as a folder or a JSON file (`kvtrain
    calibrate` and exports write one next to kv_spec.json), if there is one."""
    if not isinstance(spec, str) or spec in PRESETS or spec in SERVING_PRESETS:
        return None
    path = Path(spec).expanduser()
    found = (path if path.is_dir() else path.parent) / CODEC_STATE_FILE
    return found if found.is_file() else None


def serving_spec(name: str) -> KVSpec:
    """The spec of one of vLLM's KV-cache formats: its codec for K and V, no full-precision window."""
    policy = dict(codec=name, bits=4 if name.startswith("int4") else 8,
                  granularity="per_tensor" if name == "fp8" else "per_token_head")
    return KVSpec(key=policy, value=dict(policy), residual=0)
