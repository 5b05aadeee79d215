"""CausalLMModule: pretraining, fine-tuning, LoRA and QLoRA of any Hugging Face causal LM."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import SumMetric

from kvtrain.kv.attention import CODEC_STATE, suspended
from kvtrain.loss import distillation_kl, next_token_nll
from kvtrain.models import count_parameters, load_model, load_tokenizer


@dataclass
class LoRASettings:
    """peft LoRA adapters: only these train; the base model stays frozen."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be at least 1, got {self.r}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; name the linear layers to adapt, e.g. ['q_proj', 'v_proj']")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_lora(model: torch.nn.Module, lora: LoRASettings, quantized: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _nf4_config() -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("QLoRA needs bitsandbytes: `pip install 'kvtrain[qlora]'`") from e
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def export_pretrained(model: torch.nn.Module, tokenizer: Any, path: str | Path, merge: bool = False) -> Path:
    """save_pretrained of the model (LoRA merged into a copy when `merge`) and its tokenizer."""
    if merge:
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return Path(path)


def optimizer_groups(model: torch.nn.Module, weight_decay: float, codec_lr: float | None = None) -> list[dict]:
    """AdamW groups of the trainable parameters: matrices decayed, vectors not; with `codec_lr`, the KV
    codec's learnable state (`kv_codec_state` in the attention modules) in a group of its own at that lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_codec = {n: codec_lr is not None and f"{CODEC_STATE}." in n for n, _ in named}
    codec = [p for n, p in named if is_codec[n]]
    rest = [p for n, p in named if not is_codec[n]]
    groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
              {"params": codec, "weight_decay": 0.0, "lr": codec_lr}]
    return [g for g in groups if g["params"]]  # ZeRO drops empty groups (LoRA has no 1-D weights)


class CausalLMModule(L.LightningModule):
    """Next-token training of a causal LM built from a name/path (or its config).

    Args:
        model: "kvtrain-ref" (the embedded reference model), a hub name, or a local folder.
        init: "pretrained" loads the weights; "random" builds the architecture from its config.
        config_overrides: config fields to change (e.g. a tiny `num_hidden_layers` for tests).
        tokenizer: tokenizer name/path; defaults to the model's own.
        lr, weight_decay, betas: AdamW (weight decay applies to matrices only).
        warmup_steps, min_lr_ratio: linear warmup, then cosine decay to `min_lr_ratio * lr` (codec_lr alike).
        codec_lr: a learning rate of its own, without weight decay, for the attached KV spec's learnable
            codec state (every parameter under `kv_codec_state`: NUQ levels, learned rotations, low-rank
            factors); default: `lr`, in the weights' groups. Levels and rotation generators live on a unit
            scale where the weights' lr barely moves them (SmolLM2's levels moved < 0.003 in 40 steps at
            2e-4), so quantizer learning gets its own, larger rate (as LSQ and SpinQuant do).
        lora: train peft LoRA adapters only.
        qlora: load the base weights 4-bit NF4 with bitsandbytes and train LoRA adapters on top.
        distill_weight: add this times KL(teacher || student) per token to the loss (LLM-QAT-style
            distillation; 0 turns it off). The teacher runs with full-precision KV even when a KV
            spec is attached to the student.
        teacher: the teacher's name/path; default: the frozen starting model (with LoRA/QLoRA, the
            base model with its adapters disabled, so no second copy is held).
        trust_remote_code: allow model code from the hub (off unless you turn it on).
    """

    def __init__(
        self,
        model: str = "kvtrain-ref",
        init: Literal["pretrained", "random"] = "pretrained",
        config_overrides: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        codec_lr: float | None = None,
        lora: LoRASettings | dict | None = None,
        qlora: bool = False,
        distill_weight: float = 0.0,
        teacher: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if codec_lr is not None and codec_lr <= 0:
            raise ValueError(f"codec_lr must be positive (or None for lr), got {codec_lr}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        lora = LoRASettings(**lora) if isinstance(lora, dict) else lora
        if qlora and lora is None:
            raise ValueError("qlora=True trains LoRA adapters on a frozen 4-bit base: also set `lora`")
        if qlora and init != "pretrained":
            raise ValueError("qlora quantizes pretrained weights while loading them: use init='pretrained'")
        if distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = asdict(lora) if lora else None
        self.lora = lora
        load_kwargs = {"quantization_config": _nf4_config()} if qlora else {}
        self.model = load_model(model, init, config_overrides, trust_remote_code, **load_kwargs)
        teacher_model = self._build_teacher(teacher, lora, trust_remote_code) if distill_weight > 0 else None
        if lora is not None:
            self.model = apply_lora(self.model, lora, quantized=qlora)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modules' modes as found
        # Kept out of the module tree: not trained, not in checkpoints (it is rebuilt from its name).
        self.__dict__["teacher"] = teacher_model
        self.tokenizer_name = tokenizer or model
        self.val_nll, self.val_tokens = SumMetric(), SumMetric()

    def _build_teacher(self, name: str | None, lora: LoRASettings | None, trust_remote_code: bool):
        if name is not None:
            teacher = load_model(name, trust_remote_code=trust_remote_code)
        elif lora is not None:
            return None  # the student's own base, adapters disabled
        else:
            teacher = copy.deepcopy(self.model)
        return teacher.eval().requires_grad_(False)

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if self.teacher is not None:
            return self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with self.model.disable_adapter(), suspended(self.model):
            return self(ids, mask)

    def parameter_counts(self) -> tuple[int, int]:
        return count_parameters(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def setup(self, stage: str) -> None:
        seq_len = getattr(self.trainer.datamodule, "seq_len", None) if self.trainer else None
        context = getattr(self.model.config, "max_position_embeddings", None)
        if seq_len is not None and context is not None and seq_len > context:
            raise ValueError(
                f"seq_len={seq_len} is above the model's context of {context} tokens "
                f"(config.max_position_embeddings); use seq_len <= {context}"
            )

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        trainable, total = self.parameter_counts()
        self.print(f"kvtrain: {trainable:,} trainable / {total:,} parameters ({100 * trainable / total:.2f}%)")

    def _nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        return *next_token_nll(logits, batch["input_ids"], batch.get("attention_mask"), batch.get("loss_mask")), logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, n, logits = self._nll(batch)
        loss = nll / n.clamp(min=1)
        self.log("train/ppl", loss.detach().exp())
        if self.hparams.distill_weight > 0:
            kl, _ = distillation_kl(logits, self.teacher_logits(batch), batch.get("attention_mask"))
            self.log("train/kl", kl.detach() / n.clamp(min=1))
            loss = loss + self.hparams.distill_weight * kl / n.clamp(min=1)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} (batch {batch_idx}); "
                "lower the learning rate, enable gradient clipping, or train in fp32"
            )
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's loss, not rank 0's
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, n, _ = self._nll(batch)
        self.val_nll.update(nll)
        self.val_tokens.update(n)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, split: str) -> None:
        loss = self.val_nll.compute() / self.val_tokens.compute().clamp(min=1)
        # The metrics already summed over ranks; sync_dist only tells Lightning so.
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/ppl", loss.exp(), prog_bar=True, sync_dist=True)
        self.val_nll.reset()
        self.val_tokens.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        groups = optimizer_groups(self.model, self.hparams.weight_decay, self.hparams.codec_lr)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(self.hparams.warmup_steps, max(1, total // 10)) if total > 0 else self.hparams.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, max(1, warmup), total, self.hparams.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def export(self, path: str | Path, merge_lora: bool = True) -> Path:
        """Write a `from_pretrained` folder (tokenizer included).

        With LoRA, `merge_lora=True` writes the merged model and `False` writes only the adapter
        (load it with `peft.AutoPeftModelForCausalLM.from_pretrained`).
        """
        return export_pretrained(self.model, load_tokenizer(self.tokenizer_name), path,
                                 merge=self.lora is not None and merge_lora)

