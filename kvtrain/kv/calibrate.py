"""Calibration: fit a spec's codec state to a model before it trains or decodes (`kvtrain calibrate`).

KVQuant fits each layer's non-uniform codebook (NUQ) for K and for V by k-means over the values as
the codec normalizes them, each weighted by its sensitivity: the squared gradient of the LM loss
with respect to it (a diagonal Fisher estimate). Here the model runs attached to the spec with each
codebook observing (`CodebookLevels.observe`: the values pass through in full precision, so the
statistics are the full-precision model's, as KVQuant's are, and only the tokens the window rule
compresses are seen), the loss is backpropagated to those values only (the weights get no
gradient), and each layer's levels are fitted by `kvtrain.quant.codebook.fit_codebook`, starting
from the levels the state holds (NormalFloat's for a fresh nf codec).

The fitted state is the codec state a model is trained and exported with: `kvtrain calibrate`
writes it to kv_codec_state.safetensors next to kv_spec.json, and a spec given as that folder
starts from it (`attach`, `KVQuantCallback`, `kvtrain eval --kv`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from kvtrain.kv.attention import CODEC_STATE, attach, attention_modules, hf_model
from kvtrain.kv.codecs.codebook import CodebookLevels
from kvtrain.kv.spec import Spec
from kvtrain.quant.codebook import fit_codebook, weighted_error


def calibrate(model: nn.Module, spec: Spec | str, batches: Iterable[torch.Tensor], iterations: int = 100,
              progress: bool = True) -> list[dict[str, Any]]:
    """Fit the codebooks of `spec` on `model` over `batches` of input ids (B, T); the model is left
    attached to the spec with the fitted state. Returns one row per layer and tensor: how many
    values were seen and the weighted squared error of the levels before and after the fit."""
    attach(model, spec)
    books = codebooks(model)
    if not books:
        raise ValueError(f"{spec} has no codec state to calibrate: calibration fits codebooks (codec: nf with "
                         "learnable: true, for K or V)")
    with _observing(books.values()), _frozen(model):
        seen = 0
        for ids in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise ValueError(f"calibration: the loss is {loss.item()} on batch {seen}; the model's outputs overflowed")
            if loss.requires_grad:  # (not when no token was old enough to be compressed)
                loss.backward()
            seen += 1
        if seen == 0:
            raise ValueError("calibration got no batches: give it at least one window of text")
        samples = {key: _gathered(book.observed) for key, book in books.items()}
    return [_fit(layer, tensor, books[layer, tensor], *samples[layer, tensor], iterations)
            for layer, tensor in sorted(books)]


def codebooks(model: nn.Module) -> dict[tuple[int, str], CodebookLevels]:
    """The attached spec's codebooks by (layer, "key" or "value")."""
    found = {}
    for module in attention_modules(hf_model(model)):
        states = getattr(module, CODEC_STATE, {})  # (a stage's state holds its inner codec's)
        found.update({(module.layer_idx, name): m for name, s in states.items() for m in s.modules()
                      if isinstance(m, CodebookLevels)})
    return found


def _fit(layer: int, tensor: str, book: CodebookLevels, values: torch.Tensor, weights: torch.Tensor,
         iterations: int) -> dict[str, Any]:
    if values.numel() == 0:
        raise ValueError(f"calibration saw no compressed {tensor}s in layer {layer}: the windows are shorter than "
                         "the spec's full-precision window and sinks; calibrate on longer windows")
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(values)  # (a loss that does not depend on them: fit the values alone)
    before = weighted_error(values, weights, book.levels.detach())
    with torch.no_grad():
        book.levels.copy_(fit_codebook(values, weights, book.levels.detach(), iterations))
    return {"layer": layer, "tensor": tensor, "values": values.numel(), "error_before": before,
            "error_after": weighted_error(values, weights, book.levels.detach()),
            "levels": [round(v, 6) for v in book.levels.detach().tolist()]}


def _gathered(observed: list[list[torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The observed (values, weights) of every forward, concatenated; values backward never reached
    (none do unless the loss depends on them) are left out."""
    done = [record for record in observed if record[0] is not None]
    if not done:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat([v for v, _ in done]), torch.cat([w for _, w in done])


@contextmanager
def _observing(books: Iterable[CodebookLevels]) -> Iterator[None]:
    books = list(books)
    for book in books:
        book.observed = []
    try:
        yield
    finally:
        for book in books:
            book.observed = None


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no weight gradients: backward reaches only the observed K/V."""
    params = [p for p in model.parameters() if p.requires_grad]
    training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(training)
