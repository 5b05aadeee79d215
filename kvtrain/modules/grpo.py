"""GRPOModule: length-penalized GRPO-family RL of any HF causal LM, rollouts under the KV cache
the model will be deployed with (the spec KVQuantCallback attaches), several policy updates per
rollout batch. The math is kvtrain.rl's; this module only sequences it."""

from __future__ import annotations

import contextlib
import copy
import importlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from kvtrain import rl
from kvtrain.data.tasks import is_correct
from kvtrain.eval import answer_kv_bytes
from kvtrain.kv import attached, attached_spec
from kvtrain.models import count_parameters, load_model, load_tokenizer
from kvtrain.modules.causal_lm import LoRASettings, apply_lora, export_pretrained, warmup_cosine
from kvtrain.rl.rollout import Rollouts, policy_logprobs, sample


@dataclass
class RewardSettings:
    """reward = correctness term + length terms, each weighted.

    Args:
        truncation_factor: DLER: a correct answer earns 1 only if it stopped within max_new_tokens;
            truncated ones are scaled by this (None: plain 0/1 correctness).
        grpo_lambda: GRPO-lambda: the top fraction of groups by accuracy get the efficiency reward
            1 - lambda_alpha * sigmoid(z(length)) on correct answers (None: off).
        l1, l1_target, l1_alpha, l1_delta: L1 (LCPO): "exact" gives 1[correct] - alpha * |length - target|,
            "max" gives 1[correct] * clip(alpha * (target - length) + delta, 0, 1), with a target length
            in tokens (alpha defaults: 3e-4 exact, 1e-3 max, as the paper).
        soft_overlong, overlong_cache: DAPO soft overlong punishment weight and its cache length.
        kimi: weight of Kimi k1.5's group length reward.
    """

    truncation_factor: float | None = None
    grpo_lambda: float | None = None
    lambda_alpha: float = 0.6
    l1: Literal["exact", "max"] | None = None
    l1_target: int | None = None
    l1_alpha: float | None = None
    l1_delta: float = 0.5
    soft_overlong: float = 0.0
    overlong_cache: int = 0
    kimi: float = 0.0

    def __post_init__(self) -> None:
        if self.soft_overlong and self.overlong_cache <= 0:
            raise ValueError("reward.soft_overlong needs reward.overlong_cache > 0 (tokens before the limit)")
        chosen = [name for name in ("truncation_factor", "grpo_lambda", "l1") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose one correctness term (truncation_factor, grpo_lambda or l1), got {chosen}")
        if self.l1 is not None and self.l1 not in ("exact", "max"):
            raise ValueError(f"reward.l1 must be 'exact' or 'max', got {self.l1!r}")
        if self.l1 is not None and (self.l1_target is None or self.l1_target < 1):
            raise ValueError(f"reward.l1={self.l1!r} needs reward.l1_target, a target length >= 1 token, got {self.l1_target}")


def completion_rewards(settings: RewardSettings, correct: torch.Tensor, rollouts: Rollouts,
                       group_size: int, max_new_tokens: int) -> torch.Tensor:
    lengths = rollouts.lengths.cpu()
    truncated = rollouts.truncated.cpu()
    if settings.truncation_factor is not None:
        reward = rl.truncation_penalty(correct, truncated, settings.truncation_factor)
    elif settings.grpo_lambda is not None:
        reward = rl.grpo_lambda(correct, lengths, group_size, settings.grpo_lambda, settings.lambda_alpha)
    elif settings.l1 == "exact":
        reward = rl.l1_exact(correct, lengths, settings.l1_target, settings.l1_alpha or 3e-4)
    elif settings.l1 == "max":
        reward = rl.l1_max(correct, lengths, settings.l1_target, settings.l1_alpha or 1e-3, settings.l1_delta)
    else:
        reward = correct.float()
    if settings.soft_overlong:
        reward = reward + settings.soft_overlong * rl.soft_overlong(lengths, max_new_tokens, settings.overlong_cache)
    if settings.kimi:
        reward = reward + settings.kimi * rl.kimi_length_reward(lengths, correct, group_size)
    return reward


def answer_matches(prompt: str, completion: str, answer: str) -> float:
    return float(is_correct(completion, answer))


def import_callable(path: str):
    module, _, name = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"verifier {path!r} is not an importable function (module.function)") from e
    if not callable(fn):
        raise ValueError(f"verifier {path!r} is not callable")
    return fn


class GRPOModule(L.LightningModule):
    """GRPO family on prompt/answer batches ({"prompt": [...], "answer": [...]}, e.g. TaskDataModule).

    Args:
        model, init, config_overrides, tokenizer, trust_remote_code, lora: as CausalLMModule.
        num_generations: completions sampled per prompt (the group).
        max_new_tokens, temperature, top_p, stop: rollout sampling; max_new_tokens is the length budget.
        reward: RewardSettings (DLER truncation, GRPO-lambda, DAPO overlong, Kimi).
        advantage: "group" (GRPO), "batch" (TRL's batch std), "none" (Dr. GRPO), "dler" (group mean,
            then token-weighted batch whitening).
        loss: "ppo" (clip-higher, optional dual clip), "gppo" or "drpo" (no advantages).
        eps_low, eps_high, dual_clip: clipping. aggregation: token_mean | seq_mean_token_mean | constant.
        num_iterations: policy updates per rollout batch (the first has importance ratio 1).
        micro_batch_size: rows per forward in the policy and reference passes (None: all rows of a
            generate call at once). With several micro-batches an update first computes every
            log-prob without gradients, takes the loss's gradient with respect to them, then
            back-propagates it one micro-batch at a time: the same loss and gradients as one pass
            (for every loss, DRPO's group terms included) for one extra forward without activations.
        kl_weight: weight of the k3 KL to the frozen starting policy (0: reference-free).
        drpo_temperature, drpo_tau: DRPO's lambda and tau.
        verifier: dotted path of a function (prompt, completion, answer) -> float scoring correctness
            (default: the extracted answer equals the task's answer, 1.0 or 0.0).
        dynamic_sampling: drop groups whose rewards are all equal and refill from more prompts of the
            training set, at most `max_sampling_rounds` extra generation rounds per step.
        lr, warmup_steps, min_lr_ratio, weight_decay: AdamW with warmup + cosine (constant by default).
        grad_clip: gradient norm clipping per update (the module steps its optimizer itself, so this
            replaces Trainer(gradient_clip_val)).
        seed: step s on rank r reseeds torch's global generator (which generate samples from) with
            (seed, s, r), so a run resumed from a checkpoint draws exactly the completions (and refill
            prompts) the uninterrupted run drew.
    """

    def __init__(
        self,
        model: str = "kvtrain-ref",
        init: Literal["pretrained", "random"] = "pretrained",
        config_overrides: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        num_generations: int = 8,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        reward: RewardSettings | dict | None = None,
        advantage: Literal["group", "batch", "none", "dler"] = "group",
        loss: Literal["ppo", "gppo", "drpo"] = "ppo",
        eps_low: float = 0.2,
        eps_high: float = 0.28,
        dual_clip: float | None = None,
        aggregation: rl.losses.Aggregation = "token_mean",
        num_iterations: int = 1,
        micro_batch_size: int | None = None,
        kl_weight: float = 0.0,
        drpo_temperature: float = 0.1,
        drpo_tau: float = 10.0,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 2,
        verifier: str | None = None,
        lr: float = 1e-5,
        grad_clip: float | None = 1.0,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        lora: LoRASettings | dict | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 (advantages compare a group), got {num_generations}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1, got {num_iterations}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1 row (or None), got {micro_batch_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0: GRPO compares {num_generations} samples of each prompt, "
                             f"and at temperature {temperature} they would all be the greedy answer")
        self.reward_settings = RewardSettings(**reward) if isinstance(reward, dict) else reward or RewardSettings()
        if loss == "drpo" and self.reward_settings != RewardSettings():
            raise ValueError(f"loss='drpo' scores answers by correctness and weighs them by length itself, so reward "
                             f"settings {self.reward_settings} would be ignored: remove them, or use loss='ppo'/'gppo'")
        lora = LoRASettings(**lora) if isinstance(lora, dict) else lora
        self.save_hyperparameters(ignore=["reward", "lora"])
        self.hparams["reward"] = asdict(self.reward_settings)
        self.hparams["lora"] = asdict(lora) if lora else None
        self.automatic_optimization = False  # several updates per rollout batch
        self.model = load_model(model, init, config_overrides, trust_remote_code)
        reference = copy.deepcopy(self.model).eval().requires_grad_(False) if kl_weight > 0 and lora is None else None
        self.lora = lora
        if lora is not None:
            self.model = apply_lora(self.model, lora, quantized=False)
        self.model.train()
        self.__dict__["reference"] = reference  # frozen, outside the module tree (not trained or saved)
        self.tokenizer_name = tokenizer or model
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        self.verifier = import_callable(verifier) if verifier else answer_matches
        self._kv_bytes: dict = {}  # (spec, tokens held) -> measured bytes, see answer_kv_bytes

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)
        trainable, total = count_parameters(self.model)
        self.print(f"kvtrain: {trainable:,} trainable / {total:,} parameters ({100 * trainable / total:.2f}%)")

    # -- rollouts -------------------------------------------------------------------------------
    def rollout(self, prompts: list[str], answers: list[str], greedy: bool = False) -> tuple[Rollouts, torch.Tensor]:
        """Completions for each prompt under the attached KV spec (a group of num_generations
        samples, or one greedy completion), and their correctness."""
        h = self.hparams
        per_prompt, temperature = (1, 0.0) if greedy else (h.num_generations, h.temperature)
        was_training = self.model.training
        self.model.eval()
        rollouts = sample(self.model, self.tokenizer, prompts, per_prompt, h.max_new_tokens, temperature, h.top_p,
                          h.stop, spec=attached_spec(self.model))
        self.model.train(was_training)
        expected = [a for a in answers for _ in range(per_prompt)]
        asked = [p for p in prompts for _ in range(per_prompt)]
        return rollouts, rl.score(self.verifier, asked, rollouts.texts, expected)

    def _collect(self, prompts: list[str], answers: list[str]) -> tuple[Rollouts, torch.Tensor, torch.Tensor, dict]:
        h = self.hparams
        rollouts, correct = self.rollout(prompts, answers)
        rewards = completion_rewards(self.reward_settings, correct, rollouts, h.num_generations, h.max_new_tokens)
        stats = {"rounds": 0, "dropped_groups": 0}
        if h.dynamic_sampling:
            rollouts, correct, rewards = self._refill(rollouts, correct, rewards, len(prompts), stats)
        message = rl.degenerate_batch_warning(rewards, rollouts.truncated.cpu(), h.num_generations)
        if message:
            warnings.warn(f"step {self.global_step}: {message}", stacklevel=2)
        return rollouts, correct, rewards, stats

    def _refill(self, rollouts, correct, rewards, want: int, stats: dict):
        h, parts = self.hparams, []
        source = self.trainer.datamodule.dataset("train") if self.trainer and self.trainer.datamodule else None
        for round_ in range(h.max_sampling_rounds + 1):
            keep = rl.informative_groups(rewards, h.num_generations)
            stats["dropped_groups"] += int((~keep).sum())
            parts.append(_select_groups((rollouts, correct, rewards), keep, h.num_generations))
            have = sum(len(p[1]) for p in parts) // h.num_generations
            if have >= want or source is None or round_ == h.max_sampling_rounds:
                break
            stats["rounds"] += 1
            picks = torch.randint(len(source), (want - have,)).tolist()  # seeded per step in training_step
            rollouts, correct = self.rollout([source[i]["prompt"] for i in picks], [source[i]["answer"] for i in picks])
            rewards = completion_rewards(self.reward_settings, correct, rollouts, h.num_generations, h.max_new_tokens)
        if not any(len(p[1]) for p in parts):  # nothing informative: the last round (zero advantages) it is
            return rollouts, correct, rewards
        return _concat_groups(parts, self.tokenizer.pad_token_id, want * h.num_generations)

    # -- updates --------------------------------------------------------------------------------
    def _advantages(self, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        if h.advantage == "dler":
            return rl.reinforce_pp_baseline(rewards.to(mask.device), h.num_generations, mask)
        return rl.group_advantages(rewards, h.num_generations, scale=h.advantage).to(mask.device)

    def _policy_loss(self, logp: torch.Tensor, entropy: torch.Tensor, rollouts: Rollouts, old: torch.Tensor,
                     advantages, correct, reference: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        h = self.hparams
        mask = rollouts.completion_mask.float()
        if h.loss == "drpo":
            loss = rl.drpo(logp, old, mask, correct.to(mask.device), rollouts.lengths, h.num_generations,
                           h.max_new_tokens, h.drpo_temperature, h.drpo_tau)
        else:
            fn = rl.gppo if h.loss == "gppo" else rl.ppo_clip
            extra = {"dual_clip": h.dual_clip} if h.loss == "ppo" else {}
            per_token = fn(logp, old, advantages, eps_low=h.eps_low, eps_high=h.eps_high, **extra)
            loss = rl.aggregate(per_token, mask, h.aggregation, h.max_new_tokens)
        stats = {"clip_fraction": rl.clip_fraction(logp.detach(), old, mask, h.eps_low, h.eps_high),
                 "entropy": rl.aggregate(entropy, mask)}
        if reference is not None:
            kl = rl.aggregate(rl.k3_kl(logp, reference), mask)
            loss = loss + h.kl_weight * kl
            stats["kl"] = kl.detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"policy loss is {loss.item()} at step {self.global_step}")
        return loss, stats

    def _backward(self, rollouts: Rollouts, old: torch.Tensor, advantages, correct,
                  reference: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The policy loss of the whole batch, back-propagated micro-batch by micro-batch."""
        h = self.hparams
        parts = rollouts.micro_batches(h.micro_batch_size)
        if h.micro_batch_size is None or len(parts) == 1:  # one graph (over every generate call)
            logp, entropy = policy_logprobs(self.model, rollouts, h.temperature, h.micro_batch_size, entropy=True)
            loss, stats = self._policy_loss(logp, entropy, rollouts, old, advantages, correct, reference)
            self.manual_backward(loss)
            return loss.detach(), stats
        with torch.no_grad():
            logp, entropy = policy_logprobs(self.model, rollouts, h.temperature, h.micro_batch_size, entropy=True)
        logp.requires_grad_(True)
        loss, stats = self._policy_loss(logp, entropy, rollouts, old, advantages, correct, reference)
        (grad,) = torch.autograd.grad(loss, logp)  # d loss / d log-prob: (B, T), cheap
        for rows, part in parts:
            part_logp = policy_logprobs(self.model, part, h.temperature)
            self.manual_backward((part_logp * grad[rows]).sum())
        return loss.detach(), stats

    @torch.no_grad()
    def _reference_logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """The frozen start's log-probs, seeing the same K/V view as the policy."""
        h = self.hparams
        if self.reference is None:  # LoRA: the base model is the reference
            with self.model.disable_adapter():
                return policy_logprobs(self.model, rollouts, h.temperature, h.micro_batch_size)
        spec = attached_spec(self.model)
        with attached(self.reference, spec) if spec is not None else contextlib.nullcontext():
            return policy_logprobs(self.reference, rollouts, h.temperature, h.micro_batch_size)

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        h = self.hparams
        # generate draws from the global generator: make it a function of (seed, step, rank)
        torch.manual_seed((h.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank)
        rollouts, correct, rewards, sampling = self._collect(batch["prompt"], batch["answer"])
        mask = rollouts.completion_mask
        old = rollouts.logprobs  # equal to the training forward's at these weights (parity)
        advantages = self._advantages(rewards, mask) if h.loss != "drpo" else None
        reference = self._reference_logprobs(rollouts) if h.kl_weight > 0 else None  # fixed for the batch
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        for _ in range(h.num_iterations):
            optimizer.zero_grad()
            loss, stats = self._backward(rollouts, old, advantages, correct, reference)
            if h.grad_clip:
                self.clip_gradients(optimizer, gradient_clip_val=h.grad_clip, gradient_clip_algorithm="norm")
            optimizer.step()
        scheduler.step()
        self._log_step(rollouts, correct, rewards, loss, stats, sampling)

    def _log_step(self, rollouts, correct, rewards, loss, stats, sampling) -> None:
        lengths = rollouts.lengths.float()
        kv_bytes = answer_kv_bytes(self.model, rollouts, attached_spec(self.model), self._kv_bytes)
        self.model.train()
        metrics = {
            "train/reward": rewards.mean(), "train/accuracy": correct.mean(), "train/length": lengths.mean(),
            "train/max_length": lengths.max(), "train/truncated": rollouts.truncated.float().mean(),
            "train/loss": loss, "train/kv_bytes_per_answer": kv_bytes.float().mean(),
            "train/groups": len(lengths) / self.hparams.num_generations,
            "train/resampled_rounds": float(sampling["rounds"]), "train/dropped_groups": float(sampling["dropped_groups"]),
            **{f"train/{k}": v for k, v in stats.items()},
        }
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()}, batch_size=len(lengths))
        self.log("reward", metrics["train/reward"], prog_bar=True, logger=False)
        self.log("len", metrics["train/length"], prog_bar=True, logger=False)

    # -- evaluation -----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        rollouts, correct = self.rollout(batch["prompt"], batch["answer"], greedy=True)
        n = len(correct)
        self.log("val/accuracy", correct.mean(), batch_size=n, prog_bar=True, sync_dist=True)
        self.log("val/length", rollouts.lengths.float().mean(), batch_size=n, prog_bar=True, sync_dist=True)
        self.log("val/truncated", rollouts.truncated.float().mean(), batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1
        warmup, floor = max(1, self.hparams.warmup_steps), self.hparams.min_lr_ratio
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def export(self, path: str | Path, merge_lora: bool = True) -> Path:
        """A `from_pretrained` folder, tokenizer included (see CausalLMModule.export)."""
        return export_pretrained(self.model, self.tokenizer, path, merge=self.lora is not None and merge_lora)


def _select_groups(parts, keep: torch.Tensor, group_size: int):
    rollouts, correct, rewards = parts
    index = keep.repeat_interleave(group_size).nonzero().flatten()
    return rollouts.rows(index), correct[index], rewards[index]


def _concat_groups(parts, pad_id: int, limit: int):
    """Concatenate rollouts of several rounds (prompts and completions re-padded to common widths;
    each round's own prompt width kept in `blocks` for the training forward)."""
    rollouts = [p[0] for p in parts if len(p[1])]
    width_p = max(r.prompt_ids.shape[1] for r in rollouts)
    width_c = max(r.completion_ids.shape[1] for r in rollouts)

    def left(t, width, value):
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    def right(t, width, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    merged = Rollouts(
        torch.cat([left(r.prompt_ids, width_p, pad_id) for r in rollouts])[:limit],
        torch.cat([left(r.prompt_mask, width_p, 0) for r in rollouts])[:limit],
        torch.cat([right(r.completion_ids, width_c, pad_id) for r in rollouts])[:limit],
        torch.cat([right(r.completion_mask, width_c, 0) for r in rollouts])[:limit],
        torch.cat([right(r.logprobs, width_c, 0.0) for r in rollouts])[:limit],
        torch.cat([r.truncated for r in rollouts])[:limit],
        [t for r in rollouts for t in r.texts][:limit],
        _blocks([(len(r.texts), r.prompt_ids.shape[1]) for r in rollouts], limit),
    )
    correct = torch.cat([p[1] for p in parts])[:limit]
    rewards = torch.cat([p[2] for p in parts])[:limit]
    return merged, correct, rewards


def _blocks(calls: list[tuple[int, int]], limit: int) -> tuple[tuple[int, int], ...]:
    """(rows, prompt width) per generate call, the first `limit` rows in all."""
    blocks, left = [], limit
    for rows, width in calls:
        if left > 0:
            blocks.append((min(rows, left), width))
            left -= rows
    return tuple(blocks)
