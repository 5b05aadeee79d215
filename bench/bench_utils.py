"""Helpers shared by the KV benchmarks: the caches they compare, their real byte counts, and output.

Caches, by name:
    fp            transformers' DynamicCache (full precision), on the plain model
    kivi2         kvtrain's QuantizedKVCache(KVQuantSpec.preset("kivi2")), on the model with the spec attached
    kivi4         the same with the kivi4 preset; any other kvtrain preset (int8_per_token_head, ...) or
                  spec JSON file likewise
    hqq2-k1v1     transformers' QuantizedCache(backend="hqq", nbits=2, axis_key=1, axis_value=1), on the
                  plain model (the peer); any bits in {2, 4} and axes in {0, 1}
    hqq2, hqq4    the peer at the axes `best_peer_axes` found in bench/results/kv_quality.json

The peer uses the same group size (32) and full-precision window (128 tokens) as our presets. Its
grouping axes are the two transformers documents for HQQ (0 or 1 for keys and for values); 1 groups
each token's channels, 0 groups along the flattened leading dimensions. Its layer keeps the newest
tokens in full precision until the window fills, then dequantizes everything, appends the window and
re-quantizes the whole tensor (HQQ with its default proximal optimizer) and empties the window.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Iterator

import torch
from transformers import DynamicCache, PreTrainedModel, QuantizedCache
from transformers.cache_utils import Cache

from kvtrain import QuantizedKVCache, attached
from kvtrain.eval import cache_nbytes, format_table, write_json
from kvtrain.models import resolve

OURS = ("kivi2", "kivi4")
GROUP, RESIDUAL = 32, 128  # the kivi presets' group size and window, given to the peer too
PEER = re.compile(r"hqq(?P<bits>[24])(-k(?P<key>[01])v(?P<value>[01]))?$")
PEER_AXES = [(k, v) for k in (0, 1) for v in (0, 1)]
RESULTS = Path(__file__).parent / "results"


def is_peer(name: str) -> bool:
    return PEER.match(name) is not None


def peer_name(bits: int, axes: tuple[int, int]) -> str:
    return f"hqq{bits}-k{axes[0]}v{axes[1]}"


def best_peer_axes(bits: int, results: Path = RESULTS / "kv_quality.json") -> tuple[int, int]:
    """The axes with the lowest perplexity in the last kv_quality run, else transformers' documented
    HQQ example (axis_key=1, axis_value=1)."""
    if results.is_file():
        best = json.loads(results.read_text()).get("best_peer_axes", {}).get(str(bits))
        if best:
            return tuple(best)
    return (1, 1)


def resolve_peer(name: str) -> tuple[int, tuple[int, int]]:
    match = PEER.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a peer cache name (hqq2, hqq4, hqq2-k1v0, ...)")
    bits = int(match["bits"])
    axes = (int(match["key"]), int(match["value"])) if match["key"] is not None else best_peer_axes(bits)
    return bits, axes


def is_ours(name: str) -> bool:
    """A kvtrain spec name (a preset, a serving format, a spec file), not "fp" or a peer."""
    return name != "fp" and not is_peer(name)


def label(name: str) -> str:
    if name == "fp":
        return "DynamicCache (full precision)"
    if is_ours(name):
        return f"ours QuantizedKVCache {name}"
    bits, (key, value) = resolve_peer(name)
    return f"peer QuantizedCache HQQ {bits}-bit axis_key={key} axis_value={value}"


def model_build(name_or_path: str) -> str | None:
    """The first 16 hex digits of the sha256 of a model's weight files: which build of the model a
    result belongs to (kvtrain-ref pretrained again in another session is not bit-identical to the
    last build, so two builds' numbers must not share a table); None for a model with no local
    safetensors files (a hub name only in the Hugging Face cache)."""
    folder = Path(resolve(name_or_path)).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def environment(models: dict[str, str] | None = None) -> dict:
    """What a result depends on besides the code: the Python version (the embedded corpus is this
    interpreter's standard library), library versions, the CPU, torch's threads, and the build of each
    model in `models` ({name: name or path}: `model_build`)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": installed("transformers"),
            "hqq": installed("hqq"), "trl": installed("trl"), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            **({"models": {name: model_build(path) for name, path in models.items()}} if models else {})}


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads: on a shared 2-core machine 2 threads oversubscribe and time 5x noisier."""
    torch.set_num_threads(n)


def make_cache(name: str, config, model: PreTrainedModel | None = None) -> Cache:
    """A fresh, empty cache of the given kind for a model with this config; ours bound to `model`
    when it is attached (its rotary embedding for pre-RoPE keys, its codec state), as the model's
    forward would bind it, so `fill_random` can fill it by hand."""
    if name == "fp":
        return DynamicCache(config=config)
    if is_ours(name):
        cache = QuantizedKVCache(name)
        state = getattr(model, "kvtrain_state", None)
        if state is not None:
            cache.bind(model.config, state.rope, state.codecs)
        return cache
    bits, (key, value) = resolve_peer(name)
    return QuantizedCache(backend="hqq", config=config, nbits=bits, axis_key=key, axis_value=value,
                          q_group_size=GROUP, residual_length=RESIDUAL)


@contextlib.contextmanager
def prepared(model: PreTrainedModel, name: str) -> Iterator[PreTrainedModel]:
    """The model as the cache `name` needs it: our caches need their spec attached, the others a plain model."""
    if is_ours(name):
        with attached(model, name):
            yield model
    else:
        yield model


def fill_random(cache: Cache, config, tokens: int, dtype: torch.dtype, seed: int = 0) -> Cache:
    """Put `tokens` random keys and values (batch 1) into every layer in one update, as a prefill does."""
    gen = torch.Generator().manual_seed(seed)
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        k, v = (torch.randn(1, heads, tokens, head_dim, generator=gen).to(dtype) for _ in range(2))
        if isinstance(cache, QuantizedKVCache) and cache.rope is not None:  # pre-RoPE keys need their positions
            past = cache.layers[layer].get_seq_length()
            cache.layers[layer].update(k, v, positions=torch.arange(past, past + tokens)[None])
        else:
            cache.update(k, v, layer)
    return cache


def save_outputs(out_dir: str | Path, stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write <stem>.json and <stem>.md under out_dir, print the markdown, return both paths."""
    out_dir = Path(out_dir)
    json_path = write_json(out_dir / f"{stem}.json", payload)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {json_path} and {md_path}", file=sys.stderr)
    return json_path, md_path


__all__ = ["OURS", "is_ours", "PEER_AXES", "best_peer_axes", "cache_nbytes", "environment", "fill_random", "format_table",
           "is_peer", "label", "make_cache", "peer_name", "prepared", "save_outputs", "set_threads"]
