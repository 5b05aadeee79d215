"""Export the trained model as a `from_pretrained` folder when fit ends."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import lightning as L

from kvtrain.home import publish
from kvtrain.kv import attached_spec
from kvtrain.models import embedded_model_path, is_embedded

from .kv_quant import find_hf_model


def export_target(to: str) -> Path:
    """The folder `to` names: the embedded model's name means its slot in $KVTRAIN_HOME."""
    return embedded_model_path() if is_embedded(to) else Path(to).expanduser()


class ExportPretrained(L.Callback):
    """Calls `pl_module.export(...)` at the end of fit, writing to a temporary folder first and
    renaming it into place, so an interrupted export never leaves a half-written model behind.
    A KV spec attached to the model (KVQuantCallback) is saved with it as kv_spec.json.

    Args:
        to: destination folder, or "kvtrain-ref" for the embedded reference model's cache slot.
        merge_lora: with LoRA, write the merged model (True) or only the adapter (False).
    """

    def __init__(self, to: str, merge_lora: bool = True):
        self.to, self.merge_lora = to, merge_lora

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not hasattr(pl_module, "export"):
            raise TypeError(f"{type(pl_module).__name__} has no export(path) method; ExportPretrained needs one")
        target = export_target(self.to)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            pl_module.export(tmp, merge_lora=self.merge_lora)
            spec = attached_spec(find_hf_model(pl_module))
            if spec is not None:
                spec.save(tmp)
            publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"kvtrain: exported the model to {target}")
