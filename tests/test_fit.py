"""CausalLMModule end to end on tiny models: loss falls, export round-trips, LoRA and QLoRA train only adapters."""

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY
from kvtrain.data.lm import LMDataModule
from kvtrain.modules import CausalLMModule, LoRASettings
from kvtrain.modules.causal_lm import warmup_cosine


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def fit(module, corpus_file, steps, **trainer_kwargs):
    L.seed_everything(0)
    recorder = LossRecorder()
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder], limit_val_batches=2, val_check_interval=steps,
        accelerator="cpu", **trainer_kwargs,
    )
    trainer.fit(module, datamodule=LMDataModule(str(corpus_file), seq_len=64, batch_size=8))
    return recorder.losses, trainer


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_tiny_fit_loss_falls_and_export_round_trips(corpus_file, tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, lr=3e-3, warmup_steps=5)
    losses, trainer = fit(module, corpus_file, steps=60, gradient_clip_val=1.0)
    assert losses[0] == pytest.approx(8.32, abs=0.15)  # ln(4096): a random init predicts uniformly
    last = sum(losses[-5:]) / 5
    assert last < losses[0] - 1.5, f"loss fell only from {losses[0]:.3f} to {last:.3f}"
    assert trainer.callback_metrics["val/ppl"] == pytest.approx(trainer.callback_metrics["val/loss"].exp())
    out = module.export(tmp_path / "exported")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 4096, (2, 16))
    module.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, module(ids), rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file()


def test_nan_loss_is_a_clear_error(corpus_file):
    module = CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, lr=3e-3)
    with torch.no_grad():
        module.model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training loss is nan at step 0"):
        fit(module, corpus_file, steps=2)


def test_seq_len_above_context_is_a_clear_error(corpus_file):
    module = CausalLMModule("kvtrain-ref", init="random", config_overrides={**TINY, "max_position_embeddings": 32})
    with pytest.raises(ValueError, match=r"seq_len=64 is above the model's context of 32 tokens"):
        fit(module, corpus_file, steps=1)


def test_lora_trains_only_adapters_and_exports_both_ways(tiny_model_dir, corpus_file, tmp_path):
    module = CausalLMModule(str(tiny_model_dir), lora=LoRASettings(r=4, target_modules=["q_proj", "v_proj"]), lr=1e-2)
    trainable, total = module.parameter_counts()
    # 2 layers x (q: 64x4 + 4x64, v: 64x4 + 4x32)
    assert trainable == 2 * ((64 * 4 + 4 * 64) + (64 * 4 + 4 * 32))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    losses, _ = fit(module, corpus_file, steps=8)
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert losses[-1] < losses[0]
    module.eval()
    ids = torch.randint(0, 4096, (1, 12))
    expected = module(ids)
    merged = AutoModelForCausalLM.from_pretrained(str(module.export(tmp_path / "merged", merge_lora=True)))
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    from peft import AutoPeftModelForCausalLM

    adapter_dir = module.export(tmp_path / "adapter", merge_lora=False)
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    adapted = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))
    torch.testing.assert_close(adapted(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_qlora_loads_nf4_base_and_trains(tiny_model_dir, corpus_file):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    module = CausalLMModule(str(tiny_model_dir), lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, qlora=True, lr=1e-2)
    linear4 = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # every linear of both layers is 4-bit NF4
    assert linear4[0].weight.quant_type == "nf4"
    trainable, total = module.parameter_counts()
    assert trainable == 2 * ((64 * 4 + 4 * 64) + (64 * 4 + 4 * 32))
    losses, _ = fit(module, corpus_file, steps=8)
    assert losses[-1] < losses[0]


def test_qlora_needs_lora():
    with pytest.raises(ValueError, match="also set `lora`"):
        CausalLMModule("kvtrain-ref", qlora=True)
