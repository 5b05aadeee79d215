"""KVQuantCallback: train any LightningModule's HF decoder against the compressed KV cache."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import PreTrainedModel

from kvtrain.kv import KVQuantSpec, KVSpec, Spec, attach, attached_spec, detach, resolve_spec, spec_from_dict
from kvtrain.kv.spec import codec_state_file
from kvtrain.kv.attention import hf_model, set_prompt_lengths


def find_hf_model(pl_module: L.LightningModule, attribute: str | None = None) -> nn.Module:
    """The decoder to attach to: the one at `attribute` (a dotted path) if given, else `pl_module.model`
    if it holds one, else the only one inside (several, e.g. a student and a teacher, are ambiguous)."""
    name = type(pl_module).__name__
    if attribute is not None:
        target = pl_module
        for part in attribute.split("."):
            target = getattr(target, part, None)
        if not isinstance(target, nn.Module):
            raise ValueError(f"{name} has no module at {attribute!r} (KVQuantCallback(model_attribute=...))")
        return hf_model(target)
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and any(isinstance(m, PreTrainedModel) for m in model.modules()):
        return hf_model(model)
    found = outermost_models(pl_module)
    if len(found) > 1:
        raise ValueError(f"{name} holds {len(found)} transformers models ({', '.join(found)}): name the one to train "
                         "for the compressed cache with KVQuantCallback(model_attribute=...)")
    if not found:
        raise TypeError(f"{name} holds no transformers PreTrainedModel, so KVQuantCallback has nothing to attach "
                        "to; keep your Hugging Face model as an attribute (e.g. self.model) of the LightningModule")
    return next(iter(found.values()))


def outermost_models(module: nn.Module) -> dict[str, PreTrainedModel]:
    """The PreTrainedModels inside `module` that no other one contains, by attribute path."""
    found: dict[str, PreTrainedModel] = {}
    for path, m in module.named_modules():
        if isinstance(m, PreTrainedModel) and not any(path.startswith(f"{p}.") for p in found):
            found[path] = m
    return found


def spec_from_checkpoint(checkpoint: dict[str, Any] | str | Path) -> Spec | None:
    """The spec a KVQuantCallback stored in a Lightning checkpoint (a loaded dict, a `.ckpt` file or a
    DeepSpeed checkpoint folder); None if it holds none. Decode as trained with
    `attach(model, spec)` and `QuantizedKVCache(spec)`."""
    if not isinstance(checkpoint, dict):
        from .export import load_checkpoint

        checkpoint = load_checkpoint(checkpoint)
    states = checkpoint.get("callbacks", {})
    found = [state["spec"] for name, state in states.items() if name.startswith("KVQuantCallback")]
    return spec_from_dict(found[0]) if found else None


class KVQuantCallback(L.Callback):
    """Attach a KV quantization spec for fit/validate/test; detach afterwards.

    Args:
        spec: a preset name ("kivi2", "kivi4", "int8"; vLLM's "int8_per_token_head", "fp8_per_token_head",
            "int4_per_token_head", "fp8"), a KVQuantSpec, a KVSpec (version 2: separate key and value policies),
            or a spec JSON file or folder (with the kv_codec_state.safetensors that `kvtrain calibrate` writes
            beside it, the spec's codec state starts from it).
        bits: shorthand that sets the bits of both K and V on top of `spec`.
        overrides: any other field of the spec, e.g. residual=64 or full_precision_layers=[0].
        model_attribute: the LightningModule attribute (dotted path) holding the decoder to train, when
            it holds several (e.g. "student"); default: `model`, or the only one.
        codec_state: a kv_codec_state.safetensors the spec's learnable state starts from (what `kvtrain
            calibrate` writes); default: the one beside a spec given as a folder or file.

    The spec is saved in checkpoints and restored from them on resume. After fit the model is detached
    (full-precision KV) again: decode as trained with `attach(model, callback.spec)` and
    `QuantizedKVCache(callback.spec)`, or with `spec_from_checkpoint(path)` for a checkpoint.
    """

    def __init__(self, spec: KVQuantSpec | KVSpec | str = "kivi2", bits: int | None = None,
                 overrides: dict[str, Any] | None = None, model_attribute: str | None = None,
                 codec_state: str | None = None):
        resolved = resolve_spec(spec)
        if bits is not None:
            resolved = resolved.with_bits(bits)
        self.spec = resolved.with_(**overrides) if overrides else resolved
        # a calibrated spec's state (a folder's, or named): the run starts from it
        self.codec_state = Path(codec_state).expanduser() if codec_state is not None else codec_state_file(spec)

        self.model_attribute = model_attribute
        self._model: nn.Module | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._model = find_hf_model(pl_module, self.model_attribute)
        if self.codec_state is not None and not self.codec_state.is_file():
            raise FileNotFoundError(f"KVQuantCallback: no codec state at {self.codec_state}; write it with "
                                    f"`kvtrain calibrate` (the spec, or this recipe, and its folder) before the run")
        attach(self._model, self.spec, self.codec_state)
        self.codec_state = None  # the run starts from it once; later stages keep what the model learned

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._read_prompts(batch)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._read_prompts(batch)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._read_prompts(batch)

    def _read_prompts(self, batch: Any) -> None:
        """Under eviction at the end of the prompt (interval 0), each row's prompt length: where its
        loss_mask starts (prompt/completion batches); a row with no targets decides nothing."""
        if self.spec.eviction is None or self.spec.eviction.interval or not isinstance(batch, dict) or (
                "loss_mask" not in batch):
            return
        targets = batch["loss_mask"].bool()
        lengths = torch.where(targets.any(-1), targets.int().argmax(-1), targets.shape[-1])
        set_prompt_lengths(self._model, lengths.tolist())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._model is not None:
            detach(self._model)
            self._model = None
            if stage == "fit":
                rank_zero_info(f"KVQuantCallback: fit is over and the model is detached (full-precision KV again); "
                               f"decode as trained with attach(model, callback.spec) and QuantizedKVCache(callback.spec) "
                               f"({self.spec})")

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = spec_from_dict(state_dict["spec"])
        if saved != self.spec:
            warnings.warn(f"KVQuantCallback: resuming with the checkpoint's KV spec {saved}, not the configured "
                          f"{self.spec}; the run continues as it was trained", stacklevel=2)
        self.spec = saved
        if self._model is not None and attached_spec(self._model) != self.spec:
            attach(self._model, self.spec)  # resumed: train on with the checkpoint's spec
