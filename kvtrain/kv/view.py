"""The training view: what attention sees of K or V under a spec when no compressed cache holds it.

Given the tensor in full precision, simulate the codec on the units the window rule compresses by the
end of the chunk (a `QuantizedKVCache` hands attention its decoded payloads instead, so nothing is
encoded twice). Which query sees which tokens compressed is the rule's (`WindowRule.seen`).
"""

from __future__ import annotations

import torch

from kvtrain.kv.codecs import Codec
from kvtrain.kv.placement import PreRope
from kvtrain.kv.window import WindowRule


def compressed_view(x: torch.Tensor, codec: Codec, rule: WindowRule, rope: PreRope | None = None,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """x with the tokens the rule compresses once all of them are in as the codec would store them
    (`simulate`: decode(encode(.)) with its training gradient); with `rope`, around the rotary
    embedding at `positions` (B or 1, T)."""
    total = x.shape[-2]
    start, end = rule.start(total), rule.end(total)
    if end <= start:
        return x
    units = x[..., start:end, :]
    hat = codec.simulate(units) if rope is None else rope.around(codec.simulate, units, positions[:, start:end])
    return torch.cat([x[..., :start, :], hat, x[..., end:, :]], dim=-2)
