"""The training view: what attention sees of K or V under a spec when no compressed cache holds it.

Given the tensor in full precision, simulate the codec on the units the window rule compresses by the
end of the chunk (a `QuantizedKVCache` hands attention its decoded payloads instead, so nothing is
encoded twice). Which query sees which tokens compressed is the rule's (`WindowRule.seen`).
"""

from __future__ import annotations

import torch

from kvtrain.kv.codecs import Codec
from kvtrain.kv.window import WindowRule


def compressed_view(x: torch.Tensor, codec: Codec, rule: WindowRule) -> torch.Tensor:
    """x with the tokens the rule compresses once all of them are in as the codec would store them
    (`simulate`: decode(encode(.)) with its training gradient)."""
    total = x.shape[-2]
    start, end = rule.start(total), rule.end(total)
    if end <= start:
        return x
    return torch.cat([x[..., :start, :], codec.simulate(x[..., start:end, :]), x[..., end:, :]], dim=-2)
