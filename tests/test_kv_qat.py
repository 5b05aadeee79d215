"""KV QAT glue: KVQuantCallback on a LightningModule we did not write, distillation from a
full-precision teacher, the spec travelling with checkpoints and exports, and `kvtrain eval --kv`."""

import json
import math

import lightning as L
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import TINY
from kvtrain import KVQuantSpec, attach
from kvtrain.callbacks import ExportPretrained, KVQuantCallback
from kvtrain.cli import main
from kvtrain.data.lm import LMDataModule
from kvtrain.kv import attached_spec
from kvtrain.loss import distillation_kl
from kvtrain.modules import CausalLMModule, LoRASettings

SPEC = dict(residual=0, key_group_size=8, value_group_size=8)


class UserModule(L.LightningModule):
    """A user's own module: the decoder sits in `self.net`, the loss comes from HF's labels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = LlamaForCausalLM(LlamaConfig(vocab_size=4096, max_position_embeddings=256, **TINY))
        self.seen_specs = []

    def training_step(self, batch, batch_idx):
        self.seen_specs.append(attached_spec(self.net))
        return self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def user_fit(corpus_file, callback, steps, ckpt_dir, ckpt_path=None):
    module = UserModule()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_last=True)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback, checkpoint], accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, datamodule=LMDataModule(str(corpus_file), seq_len=48, batch_size=2), ckpt_path=ckpt_path)
    return module


def test_callback_attaches_to_a_user_module_and_the_spec_survives_resume(corpus_file, tmp_path):
    callback = KVQuantCallback(bits=2, overrides=SPEC)
    module = user_fit(corpus_file, callback, steps=2, ckpt_dir=tmp_path)
    expected = KVQuantSpec(key_bits=2, value_bits=2, **SPEC)
    assert module.seen_specs == [expected, expected]
    assert attached_spec(module.net) is None and module.net.config._attn_implementation != "kvtrain"
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    assert [v["spec"] for k, v in saved.items() if "KVQuantCallback" in k] == [vars(expected)]
    # Resuming with a callback built for another spec continues with the checkpoint's spec.
    with pytest.warns(UserWarning, match=r"resuming with the checkpoint's KV spec .*key_bits=2.*not the configured "
                                         r".*key_bits=4"):  # named, both of them, not silent
        resumed = user_fit(corpus_file, KVQuantCallback(bits=4, overrides=SPEC), steps=4, ckpt_dir=tmp_path,
                           ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.seen_specs == [expected, expected]


def test_callback_names_a_module_without_a_hf_model(corpus_file):
    class NoDecoder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["input_ids"][:, :4].float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=1, logger=False, callbacks=[KVQuantCallback()], accelerator="cpu")
    with pytest.raises(TypeError, match="NoDecoder holds no transformers PreTrainedModel"):
        trainer.fit(NoDecoder(), datamodule=LMDataModule(str(corpus_file), seq_len=48, batch_size=2))


def test_distillation_kl_matches_hand_values():
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # uniform over 2 tokens
    student = torch.tensor([[[math.log(3.0), 0.0], [5.0, 5.0]]])  # p = (3/4, 1/4); last position is unused
    kl, n = distillation_kl(student, teacher)
    # KL((1/2, 1/2) || (3/4, 1/4)) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    assert n == 1 and kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    logits = torch.randn(2, 5, 7)
    assert distillation_kl(logits, logits)[0].item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    student = torch.randn(2, 5, 7)
    masked, count = distillation_kl(student, logits, mask)
    assert count == 4 + 2  # row 1 predicts only from positions 2 and 3 (both they and their targets are real)
    p, q = torch.softmax(logits, -1), torch.log_softmax(student, -1)
    by_hand = sum((p[b, t] * (p[b, t].log() - q[b, t])).sum() for b, t in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3)])
    assert masked.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_teacher_sees_full_precision_kv_while_the_student_is_quantized(corpus_file):
    torch.manual_seed(0)
    module = CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, distill_weight=1.0)
    assert "teacher" not in dict(module.named_children()) and not any("teacher" in k for k in module.state_dict())
    ids = torch.randint(0, 4096, (2, 40))
    plain = module(ids)
    attach(module.model, KVQuantSpec(**SPEC))
    student = module(ids)
    teacher = module.teacher_logits({"input_ids": ids})
    torch.testing.assert_close(teacher, plain, rtol=0, atol=0)
    assert (student - plain).abs().max() > 1e-3
    kl, n = distillation_kl(student, teacher)
    assert kl / n > 1e-5


def test_lora_teacher_is_the_base_model_with_adapters_off(corpus_file):
    torch.manual_seed(0)
    module = CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, distill_weight=0.5,
                            lora=LoRASettings(r=4))
    assert module.teacher is None  # no second copy of the weights
    ids = torch.randint(0, 4096, (1, 40))
    base = module(ids)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters now change the output
    attach(module.model, KVQuantSpec(**SPEC))
    torch.testing.assert_close(module.teacher_logits({"input_ids": ids}), base, rtol=1e-6, atol=1e-6)
    assert attached_spec(module.model) == KVQuantSpec(**SPEC)  # suspended only for the teacher
    assert (module(ids) - base).abs().max() > 1e-2


def test_distilled_qat_lowers_the_loss_under_the_spec_and_exports_the_spec(corpus_file, tmp_path):
    L.seed_everything(0)
    module = CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, lr=3e-3, warmup_steps=5,
                            distill_weight=0.5)
    export = tmp_path / "qat"
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[KVQuantCallback(bits=2, overrides=SPEC), ExportPretrained(str(export))],
                        accelerator="cpu", limit_val_batches=2, val_check_interval=30)
    trainer.fit(module, datamodule=LMDataModule(str(corpus_file), seq_len=48, batch_size=8))
    assert trainer.callback_metrics["val/loss"] < 7.0  # from ln(4096) = 8.32 at init
    assert trainer.callback_metrics["train/kl"] > 0
    assert KVQuantSpec.resolve(str(export)) == KVQuantSpec(key_bits=2, value_bits=2, **SPEC)


def test_eval_reports_perplexity_and_measured_bytes_under_a_spec(tiny_model_dir, corpus_file, tmp_path):
    spec_file = tmp_path / "int8.json"
    spec_file.write_text(json.dumps(dict(key_bits=8, value_bits=8, key_axis="token", residual=0,
                                         key_group_size=16, value_group_size=16)))
    out = tmp_path / "eval.json"
    main(["eval", "--model", str(tiny_model_dir), "--data", str(corpus_file), "--seq_len", "64",
          "--max_batches", "2", "--kv", str(spec_file), "--output", str(out), "--baseline", "false"])
    full, int8 = json.loads(out.read_text())["rows"]
    # head_dim 16, 2 KV heads, 2 layers, K and V: fp32 is 2*2*2*16*4 = 512 bytes/token; int8 codes
    # (1 byte) plus an fp16 scale and zero per 16 channels (0.25 byte/element) are 1.25 bytes/element.
    assert full["kv_bytes_per_token"] == 512 and int8["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 1.25
    assert int8["ppl"] == pytest.approx(full["ppl"], rel=2e-3) and int8["ppl"] != full["ppl"]


def test_eval_rejects_a_group_size_that_does_not_divide_head_dim(tiny_model_dir, corpus_file):
    with pytest.raises(ValueError, match="value_group_size=32 does not divide head_dim=16"):
        main(["eval", "--model", str(tiny_model_dir), "--data", str(corpus_file), "--seq_len", "64",
              "--max_batches", "1", "--kv", "kivi2", "--output", "null"])


def test_a_checkpoint_carries_the_spec_it_was_trained_with(corpus_file, tmp_path):
    from kvtrain.callbacks.export import load_checkpoint, module_from_checkpoint
    from kvtrain.callbacks.kv_quant import spec_from_checkpoint

    user_fit(corpus_file, KVQuantCallback(bits=4, overrides=SPEC), steps=2, ckpt_dir=tmp_path)
    checkpoint = load_checkpoint(tmp_path / "last.ckpt")
    assert spec_from_checkpoint(checkpoint) == KVQuantSpec(key_bits=4, value_bits=4, **SPEC)
    assert spec_from_checkpoint({"callbacks": {}}) is None
    # a user's own module is not rebuilt from its checkpoint by guessing: the error says what to do
    with pytest.raises(ValueError, match="not a kvtrain module.*save_pretrained"):
        module_from_checkpoint(tmp_path / "last.ckpt")


def test_cache_nbytes_counts_every_tensor_or_refuses():
    from types import SimpleNamespace

    from kvtrain.eval import cache_nbytes

    quantized_layer = SimpleNamespace(keys=torch.zeros(1, 2, 3, 4), values=torch.zeros(1, 2, 3, 4),
                                      _quantized_keys=(torch.zeros(10, dtype=torch.uint8), {"scale": torch.zeros(5)}))
    assert cache_nbytes(SimpleNamespace(layers=[quantized_layer])) == 2 * 24 * 4 + 10 + 5 * 4
    odd_layer = SimpleNamespace(keys=torch.zeros(2), codebook=torch.zeros(3))
    with pytest.raises(TypeError, match=r"\['codebook'\]"):
        cache_nbytes(SimpleNamespace(layers=[odd_layer]))


def test_learned_levels_train_checkpoint_and_export_with_the_model(corpus_file, tmp_path):
    """nf with learnable levels under KVQuantCallback, distilling (the teacher detaches and re-attaches the
    spec every step): the optimizer moves the levels, checkpoints hold them, the export writes them next to
    kv_spec.json, and a model loaded from the export or rebuilt from the checkpoint gets them back."""
    from kvtrain.callbacks.export import export_checkpoint, load_checkpoint, module_from_checkpoint
    from kvtrain.cli import load_for_eval
    from kvtrain.kv import CODEC_STATE_FILE, KVSpec, codec_state_dict
    from kvtrain.quant.codebook import normal_float_levels

    learnable = dict(codec="nf", bits=2, learnable=True)
    spec = KVSpec(key=dict(learnable, granularity="per_channel(8)"), value=dict(learnable, granularity="per_token(8)"),
                  residual=0)
    L.seed_everything(0)
    module = CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, lr=3e-3, distill_weight=0.5)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_last=True)
    trainer = L.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[KVQuantCallback(spec), checkpoint, ExportPretrained(str(tmp_path / "export"))],
                        accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, datamodule=LMDataModule(str(corpus_file), seq_len=48, batch_size=4))
    learned = codec_state_dict(module.model)  # detached after fit: kept aside for the spec
    assert sorted(learned) == [f"{layer}.{t}.levels" for layer in range(2) for t in ("key", "value")]
    assert all((levels - normal_float_levels(2).float()).abs().max() > 1e-4 for levels in learned.values())
    saved = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["state_dict"]
    assert {k for k in saved if "kv_codec_state" in k} == {
        f"model.model.layers.{layer}.self_attn.kv_codec_state.{name}"
        for name in ("key.levels", "value.levels") for layer in range(2)}
    for folder in (tmp_path / "export", export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "from-ckpt")):
        assert (folder / CODEC_STATE_FILE).is_file()
        reloaded, _, reloaded_spec = load_for_eval(str(folder))
        attach(reloaded, reloaded_spec)
        assert all(torch.equal(t, learned[n]) for n, t in codec_state_dict(reloaded).items())
    rebuilt, _ = module_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(t, learned[n]) for n, t in codec_state_dict(rebuilt.model).items())


def test_codec_lr_trains_the_codec_state_at_its_own_rate(corpus_file, tmp_path):
    """One AdamW step from zero moments moves each parameter by lr * g / (|g| + eps), i.e. by its group's lr:
    the NUQ levels step by codec_lr, the norms by lr, and without codec_lr the levels stay in the lr groups."""
    from kvtrain.kv import KVSpec, codec_state_dict
    from kvtrain.quant.codebook import normal_float_levels

    learnable = dict(codec="nf", bits=2, learnable=True)
    spec = KVSpec(key=dict(learnable, granularity="per_channel(8)"), value=dict(learnable, granularity="per_token(8)"),
                  residual=0)

    def one_step(codec_lr):
        L.seed_everything(0)
        module = CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, lr=1e-4, codec_lr=codec_lr,
                                warmup_steps=1, min_lr_ratio=1.0)
        norms = {n: p.detach().clone() for n, p in module.model.named_parameters() if "norm" in n}
        trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, callbacks=[KVQuantCallback(spec)], accelerator="cpu",
                            limit_val_batches=0)
        trainer.fit(module, datamodule=LMDataModule(str(corpus_file), seq_len=48, batch_size=2))
        groups = trainer.optimizers[0].param_groups
        levels = torch.stack(list(codec_state_dict(module.model).values()))
        norm_steps = torch.stack([(p - norms[n]).abs().max() for n, p in module.model.named_parameters() if n in norms])
        return groups, (levels - normal_float_levels(2).float()).abs(), norm_steps

    groups, level_steps, norm_steps = one_step(codec_lr=1e-2)
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups][-1] == (4, 1e-2, 0.0)  # 2 layers x K, V
    assert level_steps.max().item() == pytest.approx(1e-2, rel=1e-3) and level_steps.min().item() > 1e-3
    assert norm_steps.max().item() == pytest.approx(1e-4, rel=2e-3)  # (float32 steps of 1e-4 on weights near 1)
    groups, level_steps, _ = one_step(codec_lr=None)
    assert len(groups) == 2 and level_steps.max().item() == pytest.approx(1e-4, rel=2e-3)
    with pytest.raises(ValueError, match=r"codec_lr must be positive .* got 0"):
        CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, codec_lr=0.0)
