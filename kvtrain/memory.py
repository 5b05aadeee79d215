"""Honest training-state memory: bytes of the tensors a rank really holds, each storage counted once.

Under ZeRO a rank holds partitions (ZeRO-3 parameters live in `param.ds_tensor`; the parameter
itself is an empty placeholder), flat fp32 master copies and gradient buffers inside DeepSpeed's
optimizer; without ZeRO it holds whole weights, their `.grad` and the torch optimizer's state.
Walking the real objects counts all of these alike, so ratios between setups are measured, not
derived from a formula.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch
from torch import nn

# Objects whose attributes may hold optimizer tensors (DeepSpeed's ZeRO optimizers, torch optimizers).
_WALKED_MODULES = ("deepspeed.", "torch.optim")


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` not already in `seen` (which is updated)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _parameter_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    for p in model.parameters():
        yield p.ds_tensor if hasattr(p, "ds_tensor") else p.data
    yield from model.buffers()


def _tensors_in(obj: Any, visited: set[int], depth: int = 0) -> Iterator[torch.Tensor]:
    if id(obj) in visited or depth > 8:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, visited, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _tensors_in(value, visited, depth + 1)
    elif isinstance(obj, nn.Module):
        return  # the model's own tensors are counted as parameters
    elif type(obj).__module__.startswith(_WALKED_MODULES) and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from _tensors_in(value, visited, depth + 1)


def training_state_bytes(model: nn.Module, optimizer: Any) -> dict[str, int]:
    """{"parameters", "gradients_and_optimizer", "total"}: bytes this process holds for training.

    Gradients count with the optimizer because ZeRO keeps them in the optimizer's flat buffers.
    Call it after an optimizer step (gradients and optimizer state exist then).
    """
    seen: set[int] = set()  # storages already counted: views into a flat buffer count once
    parameters = storage_bytes(_parameter_tensors(model), seen)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    rest = storage_bytes(itertools.chain(grads, _tensors_in(optimizer, set())), seen)
    return {"parameters": parameters, "gradients_and_optimizer": rest, "total": parameters + rest}
