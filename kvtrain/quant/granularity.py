"""Granularity: which elements of a (batch, heads, tokens, head_dim) K or V tensor share one scale.

Objects, as torchao's `PerGroup(32)` / `PerToken()`, not positional flags; each has a string form
for YAML and JSON (`per_channel(32)`, `per_token(32)`, `per_token_head`, `per_tensor`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PerChannel:
    """Each channel in groups of `group` consecutive tokens (KIVI's keys): a group is complete only
    when `group` tokens have arrived, so tokens are compressed `group` at a time."""

    group: int

    def __str__(self) -> str:
        return f"per_channel({self.group})"


@dataclass(frozen=True)
class PerToken:
    """Each token in groups of `group` channels of one head (KIVI's values)."""

    group: int

    def __str__(self) -> str:
        return f"per_token({self.group})"


@dataclass(frozen=True)
class PerTokenHead:
    """One scale per token and head (vLLM's per-token-head KV formats)."""

    def __str__(self) -> str:
        return "per_token_head"


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor of a layer (vLLM's `--kv-cache-dtype fp8`)."""

    def __str__(self) -> str:
        return "per_tensor"


Granularity = PerChannel | PerToken | PerTokenHead | PerTensor
_FORM = re.compile(r"^(per_channel|per_token)\((\d+)\)$")


def parse_granularity(text: str | Granularity) -> Granularity:
    """The granularity named by `text` ("per_channel(32)", "per_token(32)", "per_token_head")."""
    if isinstance(text, (PerChannel, PerToken, PerTokenHead, PerTensor)):
        return text
    if text in ("per_token_head", "per_tensor"):
        return PerTokenHead() if text == "per_token_head" else PerTensor()
    match = _FORM.match(str(text).replace(" ", ""))
    if match is None or int(match[2]) < 1:
        raise ValueError(f"unknown granularity {text!r}: use per_channel(G) (G tokens per group), per_token(G) "
                         "(G channels per group, G >= 1), per_token_head or per_tensor")
    return (PerChannel if match[1] == "per_channel" else PerToken)(int(match[2]))


def tokens_per_unit(g: Granularity) -> int:
    """Tokens that are compressed together under `g`."""
    return g.group if isinstance(g, PerChannel) else 1
