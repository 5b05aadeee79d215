"""Dense-and-sparse: a fixed number of outliers per token and head kept in 16 bits, in front of any
codec (KVQuant; `kvtrain.quant.outliers`). The inner codec encodes each vector clamped to the range
of its other entries; the payload adds the outliers' values and indices, which `nbytes()` counts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from kvtrain.kv.codecs import Payload, Stage, build_codec
from kvtrain.quant.outliers import merge_outliers, split_outliers

SPARSE = ("outlier_index", "outlier_value")


@dataclass(frozen=True)
class Outliers(Stage):
    """`inner` on the dense part; `count` outliers per token and head kept in `value_dtype`."""

    count: int
    value_dtype: str = "float16"

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "Outliers":
        return cls(build_codec(replace(policy, outliers=0), bits), policy.outliers, policy.scale_dtype)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return split_outliers(x, self.count, getattr(torch, self.value_dtype))

    def encode(self, x: torch.Tensor) -> Payload:
        dense, index, values = self._split(x)
        payload = self.inner.encode(dense)
        return Payload({**payload.tensors, "outlier_index": index, "outlier_value": values},
                       {**payload.token_dims, "outlier_index": 2, "outlier_value": 2}, payload.shape, payload.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        t = payload.tensors
        dense = Payload({k: v for k, v in t.items() if k not in SPARSE},
                        {k: v for k, v in payload.token_dims.items() if k not in SPARSE}, payload.shape, payload.dtype)
        return merge_outliers(self.inner.decode(dense), t["outlier_index"], t["outlier_value"])

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The inner codec's simulation of the dense part (its gradient), the outliers passed through."""
        dense, index, values = self._split(x)
        return merge_outliers(self.inner.simulate(dense), index, values)

    def check_model(self, head_dim: int, where: str, model_name: str) -> None:
        super().check_model(head_dim, where, model_name)
        if self.count > head_dim - 2:
            raise ValueError(f"{self.count} outliers per token leave fewer than 2 of the {head_dim} entries of a "
                             f"{model_name} head to quantize; use at most {head_dim - 2}")
