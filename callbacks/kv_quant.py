"""KVQuantCallback: train any LightningModule's HF decoder against the compressed KV cache."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any

import lightning as L
from torch import nn

from kvtrain.kv import KVQuantSpec, attach, attached_spec, detach
from kvtrain.kv.attention import hf_model


def find_hf_model(pl_module: L.LightningModule) -> nn.Module:
    """The decoder to attach to: `pl_module.model` if it holds one, else the first one inside."""
    for candidate in (getattr(pl_module, "model", None), pl_module):
        if isinstance(candidate, nn.Module):
            try:
                return hf_model(candidate)
            except TypeError:
                continue
    raise TypeError(
        f"{type(pl_module).__name__} holds no transformers PreTrainedModel, so KVQuantCallback has nothing to "
        "attach to; keep your Hugging Face model as an attribute (e.g. self.model) of the LightningModule"
    )


def spec_from_checkpoint(checkpoint: dict[str, Any]) -> KVQuantSpec | None:
    """The spec a KVQuantCallback stored in a Lightning checkpoint dict (None if it holds none)."""
    states = checkpoint.get("callbacks", {})
    found = [state["spec"] for name, state in states.items() if name.startswith("KVQuantCallback")]
    return KVQuantSpec(**found[0]) if found else None


class KVQuantCallback(L.Callback):
    """Attach a KV quantization spec for fit/validate/test; detach afterwards.

    Args:
        spec: a preset name ("kivi2", "kivi4", "int8") or a KVQuantSpec.
        bits: shorthand that sets both key_bits and value_bits on top of `spec`.
        overrides: any other KVQuantSpec field, e.g. residual=64 or full_precision_layers=[0].

    The spec is saved in checkpoints and restored from them on resume.
    """

    def __init__(self, spec: KVQuantSpec | str = "kivi2", bits: int | None = None, overrides: dict[str, Any] | None = None):
        changes = dict(overrides or {})
        if bits is not None:
            changes.update(key_bits=bits, value_bits=bits)
        self.spec = KVQuantSpec.resolve(spec).with_(**changes) if changes else KVQuantSpec.resolve(spec)

        self._model: nn.Module | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._model = find_hf_model(pl_module)
        attach(self._model, self.spec)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._model is not None:
            detach(self._model)
            self._model = None

    def state_dict(self) -> dict[str, Any]:
        return {"spec": asdict(self.spec)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = KVQuantSpec(**state_dict["spec"])
        if saved != self.spec:
            warnings.warn(f"KVQuantCallback: resuming with the checkpoint's KV spec {saved}, not the configured "
                          f"{self.spec}; the run continues as it was trained", stacklevel=2)
        self.spec = saved
        if self._model is not None and attached_spec(self._model) != self.spec:
            attach(self._model, self.spec)  # resumed: train on with the checkpoint's spec
