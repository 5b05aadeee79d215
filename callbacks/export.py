"""Export trained models as `from_pretrained` folders: at the end of fit, or later from a checkpoint."""

from __future__ import annotations

import importlib
import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from kvtrain.home import check_replaceable, publish
from safetensors.torch import save_file

from kvtrain.kv import CODEC_STATE_FILE, Spec, attach, attached_spec, codec_state_dict, detach
from kvtrain.kv.attention import CODEC_STATE, suspended
from kvtrain.models import embedded_model_path, is_embedded
from kvtrain.strategies.deepspeed import consolidated_checkpoint, full_parameters

from .kv_quant import KVQuantCallback, find_hf_model, spec_from_checkpoint


def export_target(to: str | Path) -> Path:
    """The folder `to` names: the embedded model's name means its slot in $KVTRAIN_HOME."""
    return embedded_model_path() if is_embedded(str(to)) else Path(to).expanduser()


def check_export_target(to: str | Path, overwrite: bool = False) -> Path:
    """The export folder, or a clear error before any work if kvtrain may not replace it: a non-empty
    folder kvtrain did not write, or the embedded reference model without overwrite=True (every
    `kvtrain-ref` run resolves to it)."""
    target = export_target(to)
    check_replaceable(target, overwrite)
    if is_embedded(str(to)) and target.exists() and not overwrite:
        raise FileExistsError(f"exporting to {to!r} would replace the embedded reference model at {target}; "
                              "pass overwrite=True to rebuild it, or export to a folder of your own")
    return target


def write_export(write: Callable[[Path], None], spec: Spec | None, to: str | Path,
                 overwrite: bool = False, codec_state: dict[str, torch.Tensor] | None = None,
                 what: str = "the model") -> Path:
    """Run `write(folder)` into a temporary folder, add kv_spec.json (and the learnable codec state,
    kv_codec_state.safetensors), then rename it into place, so an interrupted export never leaves a
    half-written model behind (nor removes the previous one)."""
    target = check_export_target(to, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if spec is not None:
            spec.save(tmp)
        if codec_state:
            save_file(codec_state, str(tmp / CODEC_STATE_FILE))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written export is worth nothing
        raise
    try:
        publish(tmp, target, overwrite=True)  # checked above, before the work
    except OSError as e:
        raise OSError(f"could not move the export into {target} ({e}); it is complete in {tmp}") from e
    print(f"kvtrain: exported {what} to {target}")
    return target


class ExportPretrained(L.Callback):
    """Calls `pl_module.export(...)` at the end of fit. A KV spec attached to the model
    (KVQuantCallback) is saved with it as kv_spec.json. Under ZeRO-3 the ranks first gather the
    partitioned weights together; rank 0 writes.

    Args:
        to: destination folder, or "kvtrain-ref" for the embedded reference model's cache slot.
        merge_lora: with LoRA, write the merged model (True) or only the adapter (False).
        overwrite: replace `to` even if it is a non-empty folder kvtrain did not write, or the
            embedded reference model. Checked when fit starts, so a bad destination fails before training.
    """

    def __init__(self, to: str, merge_lora: bool = True, overwrite: bool = False):
        self.to, self.merge_lora, self.overwrite = to, merge_lora, overwrite

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_export_target(self.to, self.overwrite)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "export"):
            raise TypeError(f"{type(pl_module).__name__} has no export(path) method; ExportPretrained needs one")
        with full_parameters(pl_module):
            if trainer.is_global_zero:
                model = find_hf_model(pl_module)
                spec = next((cb.spec for cb in trainer.callbacks if isinstance(cb, KVQuantCallback)), None)
                spec, codec_state = spec or attached_spec(model), codec_state_dict(model)
                with suspended(model):  # the model's own weights; the codec state goes next to kv_spec.json
                    write_export(lambda folder: pl_module.export(folder, merge_lora=self.merge_lora), spec, self.to,
                                 self.overwrite, codec_state)
        trainer.strategy.barrier()


def export_checkpoint(checkpoint: str | Path, to: str | Path, merge_lora: bool = True, overwrite: bool = False) -> Path:
    """A checkpoint of a kvtrain LightningModule (a `.ckpt` file, or a DeepSpeed ZeRO-2/3 sharded checkpoint
    folder) as a plain `from_pretrained` folder, with the KV spec it was trained with as kv_spec.json."""
    check_export_target(to, overwrite)
    module, spec = module_from_checkpoint(checkpoint)
    return write_export(lambda folder: module.export(folder, merge_lora=merge_lora), spec, to, overwrite,
                        codec_state_dict(find_hf_model(module)))


def load_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint dict from a `.ckpt` file or a DeepSpeed sharded checkpoint folder."""
    path = Path(checkpoint)
    if path.is_dir():
        return consolidated_checkpoint(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no checkpoint at {path}")


def module_from_checkpoint(checkpoint: str | Path) -> tuple[L.LightningModule, Spec | None]:
    """The run's LightningModule (CausalLMModule, GRPOModule, ...) with the checkpoint's weights, and
    the KV spec it trained with (None without KVQuantCallback)."""
    state = load_checkpoint(checkpoint)
    module = _module_from_hyperparameters(state.get("hyper_parameters", {}), checkpoint)
    spec = spec_from_checkpoint(state)
    if spec is not None and any(f".{CODEC_STATE}." in key for key in state["state_dict"]):
        model = find_hf_model(module)  # the learnable codec state loads into the spec's, then waits aside
        attach(model, spec)
        module.load_state_dict(state["state_dict"])
        detach(model)
    else:
        module.load_state_dict(state["state_dict"])
    return module, spec


def _module_class(hparams: dict, checkpoint) -> type:
    """LightningCLI records the class as `_class_path`; a module built in Python is the kvtrain module
    whose arguments its hyperparameters are."""
    if "_class_path" in hparams:
        module_path, _, name = hparams["_class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_path), name)
        if not (isinstance(cls, type) and issubclass(cls, L.LightningModule) and hasattr(cls, "export")):
            raise TypeError(f"{module_path}.{name} is not a LightningModule with an export(path) method")
        return cls
    from kvtrain.modules import CausalLMModule, GRPOModule

    keys = {k for k in hparams if not k.startswith("_")}
    for cls in (CausalLMModule, GRPOModule):
        if keys and keys <= set(inspect.signature(cls.__init__).parameters):
            return cls
    raise ValueError(f"{checkpoint} holds a LightningModule that is not a kvtrain module, so kvtrain cannot rebuild "
                     "it; save its Hugging Face model with save_pretrained and pass that folder instead")


def _module_from_hyperparameters(hparams: dict, checkpoint="the checkpoint") -> L.LightningModule:
    cls = _module_class(hparams, checkpoint)
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if "distill_weight" in kwargs:
        kwargs["distill_weight"] = 0.0  # exporting needs no teacher
    return cls(**kwargs)
