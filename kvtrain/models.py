"""Model and tokenizer loading: the embedded reference model `kvtrain-ref`, or any HF causal LM.

Loading is offline-first: a local folder or the Hugging Face cache is used without touching the
network, and a name that is in neither gives an error that says so and how to pass a local path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from kvtrain.data.tokenizer import embedded_tokenizer_path
from kvtrain.home import is_complete, kvtrain_home

REFERENCE = "kvtrain-ref"


def reference_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """kvtrain-ref: a ~5M-parameter Llama with RoPE and GQA (8 query heads share 2 KV heads)."""
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def is_embedded(name: str) -> bool:
    return name == REFERENCE


def embedded_model_path() -> Path:
    return kvtrain_home() / "models" / REFERENCE


def resolve(name_or_path: str) -> str:
    """The embedded name maps to its folder in $KVTRAIN_HOME; anything else is returned unchanged."""
    if not is_embedded(name_or_path):
        return name_or_path
    path = embedded_model_path()
    if not is_complete(path):
        raise FileNotFoundError(
            f"{REFERENCE} is not built yet (looked in {path}). Build it with `kvtrain quickstart` or "
            f"`kvtrain fit --config recipes/pretrain_reference.yaml`."
        )
    return str(path)


def in_hf_cache(name: str) -> bool:
    """True when the Hugging Face cache holds a snapshot of the repository `name`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        return False
    return True


def hub_call(load: Callable[..., Any], name: str, what: str = "model", **kwargs: Any) -> Any:
    """`load(name, **kwargs)` from a local folder or the HF cache first, the hub only if allowed.
    A model that is there but fails to load raises its own error, not "not found"."""
    if Path(name).expanduser().exists():
        return load(str(Path(name).expanduser()), **kwargs)
    if in_hf_cache(name):
        return load(name, local_files_only=True, **kwargs)
    reason = "the hub is off (HF_HUB_OFFLINE)"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        try:
            return load(name, **kwargs)
        except (OSError, ValueError) as e:
            reason = f"fetching it from the hub failed: {e}"
    raise OSError(
        f"{what} {name!r} is not a local path and is not in the Hugging Face cache, and {reason} (kvtrain works "
        f"offline). Pass a local folder instead, e.g. `model: /path/to/{name.split('/')[-1]}` (a `save_pretrained` "
        f"folder), or download it on a machine with network access first. The embedded reference model is {REFERENCE!r}."
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = str(embedded_tokenizer_path()) if is_embedded(name_or_path) else name_or_path
    tok = hub_call(AutoTokenizer.from_pretrained, path, what="tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str,
    init: Literal["pretrained", "random"] = "pretrained",
    config_overrides: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    **load_kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from a name/path with its weights, or freshly initialized from its config."""
    overrides = dict(config_overrides or {})
    if init == "random":
        if is_embedded(name_or_path):
            vocab = overrides.pop("vocab_size", None) or len(load_tokenizer(REFERENCE))
            config = reference_config(vocab, **overrides)
        else:
            config = hub_call(AutoConfig.from_pretrained, name_or_path, trust_remote_code=trust_remote_code)
            for key, value in overrides.items():
                setattr(config, key, value)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if init != "pretrained":
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    return hub_call(
        AutoModelForCausalLM.from_pretrained,
        resolve(name_or_path),
        trust_remote_code=trust_remote_code,
        **overrides,
        **load_kwargs,
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes, also for parameters ZeRO-3 has partitioned)."""

    def numel(p: torch.nn.Parameter) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    total = sum(numel(p) for p in model.parameters())
    return sum(numel(p) for p in model.parameters() if p.requires_grad), total
