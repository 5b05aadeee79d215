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

from dataclasses import dataclass, replace

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

    def start(self, total: int | torch.Tensor, sinks: int | torch.Tensor | None = None) -> int | torch.Tensor:
        """Start of the compressed tier: the sinks end there (`sinks`: per-row counts, for left padding)."""
        sinks = self.sinks if sinks is None else sinks
        if isinstance(total, torch.Tensor) or isinstance(sinks, torch.Tensor):
            return torch.minimum(torch.as_tensor(total), torch.as_tensor(sinks))
        return min(total, sinks)

    def end(self, total: int | torch.Tensor, sinks: int | torch.Tensor | None = None) -> int | torch.Tensor:
        """End of the compressed tier with `total` tokens in the cache (an int, or a tensor of them);
        equal to the start while nothing is compressed."""
        sinks = self.sinks if sinks is None else sinks
        beyond = total - sinks - (0 if self.flush else self.residual)
        beyond = beyond.clamp(min=0) if isinstance(beyond, torch.Tensor) else max(0, beyond)
        return self.start(total, sinks) + beyond // self.step * self.step

    def shifted(self, pad: int) -> "WindowRule":
        """The rule of a row with `pad` tokens of left padding: they stay in full precision like sinks,
        so groups and the window count from the row's first real token, as if it ran alone."""
        return replace(self, sinks=self.sinks + pad)

    def seen(self, positions: torch.Tensor, pads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) per query position p, decoded with p + 1 tokens in the cache: p sees tokens
        start <= j < end compressed; with `pads` (B,), per row: (B, q) each."""
        sinks = None if pads is None else pads[:, None] + self.sinks
        return self.start(positions + 1, sinks), self.end(positions + 1, sinks)

    def mask(self, past: int, q_len: int, total: int, device, pads: torch.Tensor | None = None) -> torch.Tensor:
        """(q_len, total) bool, or (B, 1, q_len, total) with `pads`: query i (position past + i) sees
        token j compressed."""
        start, end = self.seen(torch.arange(past, past + q_len, device=device), pads)
        j = torch.arange(total, device=device)
        seen = (j >= start[..., None]) & (j < end[..., None])
        return seen if pads is None else seen[:, None]

    def uniform(self, past: int, q_len: int, pads: torch.Tensor | None = None) -> bool:
        """True when every query of a chunk sees the same tokens compressed (one tensor serves all)."""
        if q_len == 1:
            return True
        if pads is None:
            return all(f(past + 1) == f(past + q_len) for f in (self.start, self.end))
        first, last = self.seen(torch.tensor([past, past + q_len - 1], device=pads.device), pads)
        return bool(((first[:, 0] == first[:, 1]) & (last[:, 0] == last[:, 1])).all())


def left_pads(position_ids: torch.Tensor | None, past: int, q_len: int) -> torch.Tensor | None:
    """Each row's left padding (B,), read from the positions of a chunk of q_len tokens after `past`:
    a left-padded row's real tokens count positions 0, 1, 2, ... from its first one, whatever index
    it has in the batch, and its pads share one position before that (0 or 1, as generate and
    kvtrain's rollouts give them). None when no row is padded, or when positions restart otherwise
    (sequence packing): those are not padding. Called by the training view and the cache alike."""
    if position_ids is None:
        return None
    index = torch.arange(past, past + q_len, device=position_ids.device)
    offset = index - position_ids  # (B, q): index minus position
    pads = offset[:, -1]
    if not bool((pads > 0).any()):
        return None
    real = index >= pads[:, None]
    pad_positions = position_ids.masked_fill(real, -1).amax(-1, keepdim=True)  # one position for all pads
    if not bool(((offset == pads[:, None]) | ~real).all()) or not bool(
            ((position_ids == pad_positions) | real | (pad_positions < 0)).all()):
        return None
    return pads.clamp(min=0)


def row_positions(positions: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """Row b's positions (positions shared by all rows, (1, T), serve every row)."""
    return positions if positions is None or positions.shape[0] == 1 else positions[b:b + 1]
