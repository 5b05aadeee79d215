"""Calibration: fit a spec's codec state to a model before it trains or decodes (`kvtrain calibrate`).

Four kinds of state are fitted: codebooks (below), low-rank factors (`LowRankFactors`: each layer's
P and Q set to the principal directions of the K or V it sees, the rank-r projection with the least
squared error on them, which is what SVD-LLM's and Palu's whitened SVD of the projection computes),
ThinK's kept channels (`ChannelScores`: each head's channels with the highest E[q_j^2] E[k_j^2]
over the text, the queries observed as the layer's attention receives them), and RotateKV's channel
orders (`ChannelOrder`: the rotated channels sorted by their mean over the text).

Per-layer ranks (`ranks="fisher"`, Palu's Fisher-based rank search): the same total latent bytes as
the spec's uniform ranks, re-spent where they buy the most. Dropping direction i of a layer's latent
costs about s * lambda_i in loss, with lambda_i the i-th eigenvalue of what that layer compresses (per
token) and s the mean squared LM-loss gradient there (a diagonal Fisher estimate); the ranks are
allocated greedily by that estimate per byte, which is optimal for it because each layer's eigenvalues
fall. The estimate holds for small errors only, and it starves layers with small gradients down to a
rank or two, where the error is not small (SmolLM2: worse than uniform ranks); `rank_floor` keeps every
latent at that share of its rank and re-spends only the rest. (Palu gives each layer a rank in
proportion to its weight Fisher; the spectrum makes the estimate depend on what a rank recovers.)

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

import heapq
import math
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from kvtrain.kv.attention import CODEC_STATE, AttachState, attach, attached_spec, attention_modules, detach, hf_model
from kvtrain.kv.codecs.channels import ChannelScores
from kvtrain.kv.codecs.codebook import CodebookLevels
from kvtrain.kv.codecs.lowrank import LowRankFactors
from kvtrain.kv.codecs.reorder import ChannelOrder
from kvtrain.kv.spec import Spec
from kvtrain.quant.codebook import fit_codebook, weighted_error


RANK_BUDGETS = ("uniform", "fisher")
# the state kinds fitted from what they observed (their `fit`), by the name their calibration rows give
FITS = {LowRankFactors: "low-rank", ChannelScores: "channels", ChannelOrder: "channel order"}


def calibrate(model: nn.Module, spec: Spec | str, batches: Iterable[torch.Tensor], iterations: int = 100,
              progress: bool = True, ranks: str = "uniform", rank_floor: float = 0.0) -> list[dict[str, Any]]:
    """Fit the codebooks, low-rank factors and kept channels of `spec` on `model` over `batches` of
    input ids (B, T); the model is left attached to the spec with the fitted state. Returns one row per
    layer, tensor and fit: how many values were seen and the error before and after the fit (a
    codebook's weighted squared error, low-rank factors' relative squared reconstruction error, the
    share of ThinK's score in the pruned channels). `ranks`: "uniform" keeps the spec's ranks, "fisher"
    re-spends their bytes per layer (module docstring), each latent keeping at least `rank_floor` of its
    rank; the model is left attached to that spec."""
    if ranks not in RANK_BUDGETS:
        raise ValueError(f"ranks must be one of {RANK_BUDGETS}, got {ranks!r}")
    if isinstance(rank_floor, bool) or not isinstance(rank_floor, (int, float)) or not 0 <= rank_floor <= 1:
        raise ValueError(f"rank_floor must be a fraction in [0, 1] of each latent's rank, got {rank_floor!r}")
    attach(model, spec)
    books = codebooks(model)
    factors = fitted_states(model)
    if not books and not factors:
        raise ValueError(f"{spec} has no codec state to calibrate: calibration fits codebooks (codec: nf with "
                         "learnable: true), low-rank factors (rank: r), kept channels (prune_channels) and channel "
                         "orders (reorder_channels), for K or V")
    if books and any(isinstance(f, ChannelOrder) for f in factors.values()):
        raise ValueError("a spec with both codebooks and a channel order (reorder_channels): the codebooks' values "
                         "depend on the order, which calibration fits; calibrate a spec with the order and an affine "
                         "codec, or without the order")
    if ranks == "fisher" and (books or not any(isinstance(f, LowRankFactors) for f in factors.values())):
        raise ValueError("ranks='fisher' budgets the ranks of low-rank latents (rank: r) and needs a spec with them and "
                         "without codebooks (whose levels depend on the ranks): calibrate the ranks first, then "
                         "calibrate the folder it writes again for the codebooks")
    with _observing(model, [*books.values(), *factors.values()]), _queries_to(model, factors), _frozen(model):
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
        if ranks == "fisher":
            factors = _rebudgeted(model, factors, rank_floor)
        rows = [{"layer": layer, "tensor": tensor, **_fitted(layer, tensor, factor)}
                for (layer, tensor), factor in factors.items()]  # (while they hold what they observed)
    rows += [_fit(layer, tensor, books[layer, tensor], *samples[layer, tensor], iterations) for layer, tensor in books]
    return sorted(rows, key=lambda row: (row["layer"], row["tensor"], row["fit"]))


def fisher_ranks(items: dict[Any, tuple[torch.Tensor, float, float, int]], floor: float = 0.0) -> dict[Any, int]:
    """Ranks for latents given, per latent, (its spectrum: groups x width eigenvalues, largest first;
    its sensitivity s; the bytes of one more rank; its rank now): the total bytes of the ranks now,
    spent greedily on the next direction with the most s * eigenvalue per byte, each rank in
    [max(1, floor x its rank now, rounded up), width - 1] (the floor guards the layers a small
    gradient estimate would starve)."""
    budget = sum(cost * rank for _, _, cost, rank in items.values())
    ranks = {key: max(1, math.ceil(floor * rank)) for key, (_, _, _, rank) in items.items()}
    spent = sum(items[key][2] * rank for key, rank in ranks.items())
    if spent > budget:
        raise ValueError("a rank budget below one rank per latent")

    def offer(key: Any) -> tuple[float, int, Any] | None:
        spectrum, sensitivity, cost, _ = items[key]
        if ranks[key] >= spectrum.shape[-1] - 1:
            return None
        return (-sensitivity * float(spectrum[..., ranks[key]].sum()) / cost, order[key], key)

    order = {key: i for i, key in enumerate(items)}  # (ties: the first latent)
    heap = [o for key in items if (o := offer(key)) is not None]
    heapq.heapify(heap)
    while heap:
        _, _, key = heapq.heappop(heap)
        if spent + items[key][2] > budget:
            continue
        ranks[key] += 1
        spent += items[key][2]
        if (o := offer(key)) is not None:
            heapq.heappush(heap, o)
    return ranks


def _rebudgeted(model: nn.Module, states: dict[tuple[int, str], Any], floor: float) -> dict[tuple[int, str], Any]:
    """The model re-attached with Fisher-budgeted ranks (`fisher_ranks`), its new states holding what the
    old ones observed (the second moments do not depend on the rank)."""
    spec = attached_spec(model)
    latents = {key: s for key, s in states.items() if isinstance(s, LowRankFactors)}
    items = {(layer, tensor): (s.spectrum(), s.sensitivity / max(s.gradients, 1),
                               s.down.shape[0] * _bits(spec, tensor, layer), s.down.shape[-1])
             for (layer, tensor), s in latents.items()}
    ranks = fisher_ranks(items, floor)
    policies = {tensor: replace(getattr(spec, tensor), layer_rank={layer: r for (layer, t), r in ranks.items() if t == tensor})
                for tensor in ("key", "value") if getattr(spec, tensor) is not None}
    detach(model)
    attach(model, spec.with_(**policies))
    found = fitted_states(model)
    for key, old in states.items():
        for name in ("observed", "values", "sensitivity", "gradients"):
            if hasattr(old, name):
                setattr(found[key], name, getattr(old, name))
    return found


def _bits(spec: Spec, tensor: str, layer: int) -> int:
    policy = getattr(spec, tensor)
    return policy.layer_bits.get(layer, policy.bits)


def codebooks(model: nn.Module) -> dict[tuple[int, str], CodebookLevels]:
    """The attached spec's codebooks by (layer, "key" or "value")."""
    return states_of(model, CodebookLevels)


def fitted_states(model: nn.Module) -> dict[tuple[int, str], Any]:
    """The attached spec's low-rank factors, kept channels and channel orders by (layer, tensor)."""
    return {key: state for kind in FITS for key, state in states_of(model, kind).items()}


def states_of(model: nn.Module, kind: type[nn.Module]) -> dict[tuple[int, str], Any]:
    """The attached spec's codec state modules of one kind by (layer, "key" or "value")."""
    found = {}
    for module in attention_modules(hf_model(model)):
        states = getattr(module, CODEC_STATE, {})  # (a stage's state holds its inner codec's)
        found.update({(module.layer_idx, name): m for name, s in states.items() for m in s.modules()
                      if isinstance(m, kind)})
    return found


def _fitted(layer: int, tensor: str, state: LowRankFactors | ChannelScores | ChannelOrder) -> dict[str, Any]:
    seen = state.values if isinstance(state, LowRankFactors) else state.observed["tokens"]
    if seen == 0:
        raise ValueError(f"calibration saw no compressed {tensor}s in layer {layer}: the windows are shorter than "
                         "the spec's full-precision window and sinks; calibrate on longer windows")
    return {"fit": FITS[type(state)], **state.fit()}


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
def _observing(model: nn.Module, states: Iterable[nn.Module]) -> Iterator[None]:
    states = list(states)
    for state in states:
        if isinstance(state, tuple(FITS)):
            state.start_observing()
        else:
            state.observed = []
    try:
        yield
    finally:  # (and the states a re-attach with other ranks made, which took over what these observed)
        for state in [*states, *(m for m in model.modules() if isinstance(m, (CodebookLevels, *FITS)))]:
            state.observed = None


@contextmanager
def _queries_to(model: nn.Module, states: dict[tuple[int, str], Any]) -> Iterator[None]:
    """Each layer's queries to its keys' channel scores (ThinK's query factor), rotated back to before
    RoPE when the keys are pre-RoPE (the basis their channels are pruned in)."""
    scored = {layer: s for (layer, tensor), s in states.items() if tensor == "key" and isinstance(s, ChannelScores)}
    attached: AttachState = hf_model(model).kvtrain_state

    def observe(module: nn.Module, query: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        if module.layer_idx in scored:
            if attached.rope is not None:
                query = attached.rope.rotate(query, position_ids, inverse=True)
            scored[module.layer_idx].observe_queries(query)

    attached.query_observer = observe if scored else None
    try:
        yield
    finally:
        attached.query_observer = None


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
