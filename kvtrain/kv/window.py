"""The window rule: which tier holds each token of K or V, written once for the training view
(`kvtrain.kv.view`, `kvtrain.kv.attention`) and the cache (`kvtrain.kv.cache`).

With `total` tokens in the cache, the tiers are, oldest first:

    sinks       [0, S)            full precision for good (attention sinks, as StreamingLLM keeps them)
    compressed  [S, end(total))   encoded once, never re-encoded
    window      [end(total), total) full precision, the newest tokens

    streaming:  end(T) = S + floor(max(0, T - S - R) / unit) * unit
    flush:      end(T) = S + floor(max(0, T - S) / R) * R

`unit` is the number of tokens compressed together (a group of G tokens for per-channel keys, 1 for
per-token values). Streaming compresses a unit as soon as it is complete and older than the newest R
tokens, so the window always holds R to R + unit - 1 tokens. Flush is KIVI's own schedule for its keys
(`models/llama_kivi.py`): the full-precision part grows from 0 to R - 1 tokens and is compressed R at
a time when it reaches R. A query at position p is decoded with p + 1 tokens in the cache, so it sees
token j compressed iff S <= j < end(p + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WindowRule:
    """The tiers of K or V (module docstring): `unit` tokens compressed together, the newest
    `residual` and the first `sinks` tokens in full precision, streaming or flushing the window."""

    unit: int
    residual: int
    sinks: int = 0
    flush: bool = False

    def __post_init__(self) -> None:
        if self.unit < 1 or self.residual < 0 or self.sinks < 0:
            raise ValueError(f"a window needs unit >= 1, residual >= 0 and sinks >= 0, got {self}")
        if self.flush and (self.residual < 1 or self.residual % self.unit):
            raise ValueError(f"flushing the window R={self.residual} tokens at a time needs R to be a positive "
                             f"multiple of the unit ({self.unit} tokens)")

    @property
    def step(self) -> int:
        """Tokens that leave the full-precision window together."""
        return self.residual if self.flush else self.unit

    def start(self, total: int | torch.Tensor) -> int | torch.Tensor:
        """Start of the compressed tier: the sinks end there."""
        return total.clamp(max=self.sinks) if isinstance(total, torch.Tensor) else min(total, self.sinks)

    def end(self, total: int | torch.Tensor) -> int | torch.Tensor:
        """End of the compressed tier with `total` tokens in the cache (an int, or a tensor of them);
        equal to the start while nothing is compressed."""
        beyond = total - self.sinks - (0 if self.flush else self.residual)
        beyond = beyond.clamp(min=0) if isinstance(beyond, torch.Tensor) else max(0, beyond)
        return self.start(total) + beyond // self.step * self.step

    def seen(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) per query position p, decoded with p + 1 tokens in the cache: p sees tokens
        start <= j < end compressed."""
        return self.start(positions + 1), self.end(positions + 1)

    def mask(self, past: int, q_len: int, total: int, device) -> torch.Tensor:
        """(q_len, total) bool: query i (position past + i) sees token j compressed."""
        start, end = self.seen(torch.arange(past, past + q_len, device=device))
        j = torch.arange(total, device=device)[None, :]
        return (j >= start[:, None]) & (j < end[:, None])

    def uniform(self, past: int, q_len: int) -> bool:
        """True when every query of a chunk sees the same tokens compressed (one tensor serves all)."""
        return all(f(past + 1) == f(past + q_len) for f in (self.start, self.end))
