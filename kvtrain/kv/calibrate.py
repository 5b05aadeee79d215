"""Calibration: fit a spec's codec state to a model before it trains or decodes (`kvtrain calibrate`).

Two kinds of state are fitted: codebooks (below) and low-rank factors (`LowRankFactors`: each layer's
P and Q set to the principal directions of the K or V it sees, the rank-r projection with the least
squared error on them, which is what SVD-LLM's and Palu's whitened SVD of the projection computes).

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
from kvtrain.kv.codecs.lowrank import LowRankFactors
from kvtrain.kv.spec import Spec
from kvtrain.quant.codebook import fit_codebook, weighted_error


def calibrate(model: nn.Module, spec: Spec | str, batches: Iterable[torch.Tensor], iterations: int = 100,
              progress: bool = True) -> list[dict[str, Any]]:
    """Fit the codebooks and low-rank factors of `spec` on `model` over `batches` of input ids (B, T);
    the model is left attached to the spec with the fitted state. Returns one row per layer, tensor
    and fit: how many values were seen and the error before and after the fit (a codebook's weighted
    squared error, low-rank factors' relative squared reconstruction error)."""
    attach(model, spec)
    books, factors = codebooks(model), states_of(model, LowRankFactors)
    if not books and not factors:
        raise ValueError(f"{spec} has no codec state to calibrate: calibration fits codebooks (codec: nf with "
                         "learnable: true) and low-rank factors (rank: r), for K or V")
    with _observing([*books.values(), *factors.values()]), _frozen(model):
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
        rows = [{"layer": layer, "tensor": tensor, "fit": "low-rank", **_fitted(layer, tensor, factor)}
                for (layer, tensor), factor in factors.items()]  # (while they hold what they observed)
    rows += [_fit(layer, tensor, books[layer, tensor], *samples[layer, tensor], iterations) for layer, tensor in books]
    return sorted(rows, key=lambda row: (row["layer"], row["tensor"], row["fit"]))


def codebooks(model: nn.Module) -> dict[tuple[int, str], CodebookLevels]:
    """The attached spec's codebooks by (layer, "key" or "value")."""
    return states_of(model, CodebookLevels)


def states_of(model: nn.Module, kind: type[nn.Module]) -> dict[tuple[int, str], Any]:
    """The attached spec's codec state modules of one kind by (layer, "key" or "value")."""
    found = {}
    for module in attention_modules(hf_model(model)):
        states = getattr(module, CODEC_STATE, {})  # (a stage's state holds its inner codec's)
        found.update({(module.layer_idx, name): m for name, s in states.items() for m in s.modules()
                      if isinstance(m, kind)})
    return found


def _fitted(layer: int, tensor: str, factors: LowRankFactors) -> dict[str, Any]:
    if factors.values == 0:
        raise ValueError(f"calibration saw no compressed {tensor}s in layer {layer}: the windows are shorter than "
                         "the spec's full-precision window and sinks; calibrate on longer windows")
    return factors.fit()


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
    return {"layer": layer, "tensor": tensor, "fit": "codebook", "values": values.numel(), "error_before": before,
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
def _observing(states: Iterable[CodebookLevels | LowRankFactors]) -> Iterator[None]:
    states = list(states)
    for state in states:
        if isinstance(state, LowRankFactors):
            state.start_observing()
        else:
            state.observed = []
    try:
        yield
    finally:
        for state in states:
            state.observed = None


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
