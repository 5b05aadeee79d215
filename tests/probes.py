"""A callback that records whether the KV view's cache-capturing hook is registered (used via PYTHONPATH)."""

import json

import lightning as L

from kvtrain.kv.attention import hf_model


class KVHookProbe(L.Callback):
    """At the first validation batch, write {"spec": bool, "hook": bool} to `path` (rank 0)."""

    def __init__(self, path: str):
        self.path = path

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx or not trainer.is_global_zero:
            return
        state = getattr(hf_model(pl_module), "kvtrain_state", None)
        hooks = hf_model(pl_module)._forward_pre_hooks
        found = {"spec": state is not None, "hook": state is not None and state.hook.id in hooks}
        with open(self.path, "w") as f:
            json.dump(found, f)
