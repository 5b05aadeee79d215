"""Selectors: which tokens of a layer's K/V survive an eviction decision (DESIGN.md, "The compression pipeline").

A selector scores the tokens a layer holds, per KV head, from the attention the queries paid them
(`observed`: how many of the queries before each decision count), their positions, or (a learned
selector, `reads_values`) their values through state the model trains (`make_state`); the eviction
rule (`kvtrain.kv.eviction`) keeps the sinks, the newest tokens and the best-scored rest up to the
budget, at the decisions its schedule makes, for the training view and the cache alike.

Selectors register by name (`@register("snapkv")`); an `EvictionPolicy` names one and gives its
options. Adding one is a file here and one import line below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import nn

from kvtrain.kv.registry import registrar


@dataclass(frozen=True)
class Selector(ABC):
    """The selector protocol (module docstring). Subclasses are frozen dataclasses of their options."""

    name: ClassVar[str]
    # options of a few settings that the registry-driven tests run (parity on every architecture)
    examples: ClassVar[tuple[dict[str, Any], ...]]
    reads_values: ClassVar[bool] = False  # whether `score` reads the held tokens' values

    @property
    def observed(self) -> int | None:
        """The queries before each decision whose attention the score reads: None, every query since
        the token arrived (accumulated across decisions); k, the k last before the decision; 0, none."""
        return 0

    @abstractmethod
    def score(self, attention: torch.Tensor | None, positions: torch.Tensor,
              values: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, L) scores of the held tokens (higher survives), from the attention the observed
        queries paid them (summed over those queries, averaged over each KV head's query heads; None
        when `observed` is 0) and their positions, both (B, H, L) in position order, and their values
        (B, H, L, D) as attention reads them (None unless `reads_values`)."""

    def make_state(self, head_dim: int, kv_heads: int) -> nn.Module | None:
        """The selector's learnable state for one attention layer (None: it learns nothing); `attach`
        registers it beside the codecs' (`kv_codec_state`), so it trains, checkpoints and exports with
        the model, and the view and the cache read it through `bound`."""
        return None

    def bound(self, state: nn.Module) -> "Selector":
        """This selector reading `state` (selectors with state hold it in a `state` field, not an option)."""
        return replace(self, state=state)

    def check(self, interval: int) -> None:
        """Errors that need the eviction schedule (decisions every `interval` tokens; 0: at the prompt's end)."""
        if self.observed and interval and self.observed > interval:
            raise ValueError(f"{self.name} observes the last {self.observed} queries before a decision, more than the "
                             f"{interval} tokens between decisions (interval): give it window <= {interval}")


SELECTORS: dict[str, type[Selector]] = {}


register = registrar(SELECTORS, "selector", "options")


def build_selector(name: str, options: dict[str, Any]) -> Selector:
    """The registered selector `name` with `options` (its dataclass fields), checked."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; registered: {sorted(SELECTORS)}")
    cls = SELECTORS[name]
    known = [f.name for f in fields(cls) if f.name != "state"]  # (a learned selector's state is bound, not given)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"selector {name!r} has no option(s) {unknown}; its options: {known}")
    return cls(**options)


def check_count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")


from kvtrain.kv.selectors import dms, h2o, snapkv, streaming, tova  # noqa: E402,F401  (registers them)
