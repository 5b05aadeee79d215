"""kvtrain.rl against hand-computed values: rewards, advantages, losses (values and gradients)."""

import math

import pytest
import torch

from kvtrain import rl

TWO_GROUPS = torch.tensor([1.0, 1, 0, 0, 1, 0, 0, 0])


def test_grpo_group_advantages():
    # mean 0.5, unbiased std sqrt(1/3) = 0.57735: 0.5 / (0.57735 + 1e-4) = 0.8659
    adv = rl.group_advantages(torch.tensor([1.0, 1, 0, 0]), group_size=4)
    assert adv.tolist() == pytest.approx([0.8659, 0.8659, -0.8659, -0.8659], abs=1e-4)


def test_dr_grpo_advantages_are_mean_centered_only():
    adv = rl.group_advantages(torch.tensor([1.0, 1, 0, 0]), group_size=4, scale="none")
    assert adv.tolist() == [0.5, 0.5, -0.5, -0.5]


def test_batch_std_advantages():
    # batch rewards mean 3/8, unbiased std sqrt(1.875 / 7) = 0.51755
    adv = rl.group_advantages(TWO_GROUPS, group_size=4, scale="batch")
    assert adv.tolist() == pytest.approx([0.966, 0.966, -0.966, -0.966, 1.449, -0.483, -0.483, -0.483], abs=1e-3)


def test_dler_reinforce_pp_baseline_whitens_over_tokens():
    mask = torch.ones(8, 10)
    adv = rl.reinforce_pp_baseline(TWO_GROUPS, group_size=4, token_mask=mask)
    # centered [.5,.5,-.5,-.5,.75,-.25x3]; token mean 0; unbiased token var 0.21875 * 80/79 -> std 0.47066
    assert adv[:, 0].tolist() == pytest.approx([1.062, 1.062, -1.062, -1.062, 1.594, -0.531, -0.531, -0.531], abs=1e-3)
    assert torch.equal(adv, adv[:, :1].expand_as(adv))


def test_dler_estimator_weights_long_completions_by_their_tokens():
    mask = torch.ones(8, 10)
    mask[0, 5:] = 0  # a short correct answer: its tokens count less in the whitening statistics
    adv = rl.reinforce_pp_baseline(TWO_GROUPS, group_size=4, token_mask=mask)
    assert (adv[0, 5:] == 0).all()
    values = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.75, -0.25, -0.25, -0.25])[:, None] * mask
    n = mask.sum()
    mean = values.sum() / n
    std = math.sqrt((((values - mean) ** 2) * mask).sum() / (n - 1))
    assert adv[1, 0].item() == pytest.approx((0.5 - mean.item()) / std, rel=1e-5)


def test_group_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="7 rewards do not split into groups of 4"):
        rl.group_advantages(torch.ones(7), group_size=4)


@pytest.mark.parametrize(("adv", "ratio", "loss", "grad"), [(1.0, 1.5, -1.28, -1.28), (-1.0, 0.5, 0.8, 0.8),
                                                           (1.0, 1.1, -1.1, -1.1), (-1.0, 1.5, 1.5, 1.5)])
def test_gppo_keeps_a_gradient_on_clipped_tokens(adv, ratio, loss, grad):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    value = rl.gppo(logp, torch.zeros(1, 1), torch.tensor([adv]), eps_low=0.2, eps_high=0.28)
    value.sum().backward()
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert logp.grad.item() == pytest.approx(grad, abs=1e-6)


def test_ppo_clip_higher_has_no_gradient_on_clipped_tokens():
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    value = rl.ppo_clip(logp, torch.zeros(1, 1), torch.tensor([1.0]), eps_low=0.2, eps_high=0.28)
    value.sum().backward()
    assert value.item() == pytest.approx(-1.28)
    assert logp.grad.item() == 0.0
    # inside the clip range the surrogate is -A * ratio with gradient -A * ratio
    logp = torch.tensor([[math.log(1.1)]], requires_grad=True)
    rl.ppo_clip(logp, torch.zeros(1, 1), torch.tensor([1.0])).sum().backward()
    assert logp.grad.item() == pytest.approx(-1.1)


def test_dual_clip_caps_negative_advantage_losses():
    logp = torch.tensor([[math.log(20.0)]], requires_grad=True)
    value = rl.ppo_clip(logp, torch.zeros(1, 1), torch.tensor([-1.0]), dual_clip=10.0)
    value.sum().backward()
    assert value.item() == pytest.approx(10.0)  # -A * c instead of -A * ratio = 20
    assert logp.grad.item() == 0.0
    assert rl.ppo_clip(logp.detach(), torch.zeros(1, 1), torch.tensor([-1.0])).item() == pytest.approx(20.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        rl.ppo_clip(logp, torch.zeros(1, 1), torch.tensor([-1.0]), dual_clip=0.5)


def test_aggregations():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])
    assert rl.aggregate(per_token, mask, "token_mean").item() == pytest.approx(8 / 5)
    assert rl.aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((1 + 4) / 2)
    assert rl.aggregate(per_token, mask, "constant", max_tokens=8).item() == pytest.approx(8 / 16)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        rl.aggregate(per_token, mask, "sum")


def test_k3_kl():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    # exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    assert rl.k3_kl(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert rl.k3_kl(logp, logp).item() == 0.0


def test_drpo_weights_favour_short_correct_answers():
    weights = rl.drpo_weights(torch.tensor([2048, 4096]), max_len=8192, temperature=0.1)
    assert weights.tolist() == pytest.approx([0.924, 0.076], abs=1e-3)


def test_drpo_objective_by_hand():
    # one group: two correct (lengths 2, 4 tokens), one incorrect; old policy = current (no KL term)
    logp = torch.tensor([[-1.0, -1.0, 0, 0], [-2.0, -2.0, -2.0, -2.0], [-3.0, -1.0, 0, 0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    correct, lengths = torch.tensor([1, 1, 0]), torch.tensor([2, 4, 2])
    loss = rl.drpo(logp, logp.detach(), mask, correct, lengths, group_size=3, max_len=8, temperature=0.1, tau=10.0)
    w = torch.softmax(torch.tensor([(1 - 2 / 8) / 0.1, (1 - 4 / 8) / 0.1]), 0)
    expected = -(w[0] * -1.0 + w[1] * -2.0 - 10.0 * (-2.0 / 10.0))  # LSE of one element = itself
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert logp.grad[2, 0].item() == pytest.approx(1 / 2, abs=1e-6)  # pushes the wrong answer's mean logp down


def test_drpo_ignores_groups_without_both_kinds_and_penalizes_drift():
    logp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.ones(2, 2)
    same = rl.drpo(logp, logp.detach(), mask, torch.tensor([1, 1]), torch.tensor([2, 2]), group_size=2, max_len=8)
    assert same.item() == 0.0
    old = torch.full((2, 2), -0.5)  # KL_old > delta: the constraint is active
    drift = rl.drpo(logp, old, mask, torch.tensor([1, 1]), torch.tensor([2, 2]), group_size=2, max_len=8, beta=1e3)
    kl = math.exp(-0.5) + 0.5 - 1
    assert drift.item() == pytest.approx(1e3 * (kl - 1e-4) * kl, rel=1e-5)


def test_truncation_penalty_rewards_only_correct_answers_that_stopped():
    correct, truncated = torch.tensor([1, 1, 0, 0]), torch.tensor([False, True, False, True])
    assert rl.truncation_penalty(correct, truncated).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert rl.truncation_penalty(correct, truncated, factor=0.1).tolist() == pytest.approx([1.0, 0.1, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"truncation factor must be in \[0, 1\], got 2"):
        rl.truncation_penalty(correct, truncated, factor=2)


def test_soft_overlong():
    lengths = torch.tensor([100, 768, 896, 1024, 2000])
    assert rl.soft_overlong(lengths, max_len=1024, cache_len=256).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_kimi_group_length_reward():
    reward = rl.kimi_length_reward(torch.tensor([100, 200, 300]), torch.tensor([1, 1, 0]), group_size=3)
    assert reward.tolist() == pytest.approx([0.5, 0.0, -0.5])
    wrong_and_short = rl.kimi_length_reward(torch.tensor([100, 300]), torch.tensor([0, 1]), group_size=2)
    assert wrong_and_short.tolist() == pytest.approx([0.0, -0.5])  # incorrect: min(0, lambda)


def test_l1_rewards():
    correct, lengths = torch.tensor([1, 1, 0]), torch.tensor([1000, 4000, 1000])
    assert rl.l1_exact(correct, lengths, target=1000).tolist() == pytest.approx([1.0, 1 - 0.9, 0.0])
    assert rl.l1_max(correct, lengths, target=1000).tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert rl.l1_max(correct, torch.tensor([600, 600, 600]), target=1000).tolist() == pytest.approx([0.9, 0.9, 0.0])


def test_grpo_lambda_switches_on_the_most_correct_groups():
    correct = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0])
    lengths = torch.tensor([100, 200, 300, 50, 100, 200, 300, 400])
    reward = rl.grpo_lambda(correct, lengths, group_size=4, top_fraction=0.5, alpha=0.6)
    # group 0 (3/4 correct) is in the top half: 1 - 0.6 sigmoid(z), z over the correct lengths (population std)
    assert reward[:4].tolist() == pytest.approx([0.864, 0.700, 0.536, 0.0], abs=1e-3)
    assert reward[4:].tolist() == [1.0, 0.0, 0.0, 0.0]  # the rest keep 0/1


def test_weighted_sum_composes_named_terms():
    terms = {"correct": torch.tensor([1.0, 0.0]), "overlong": torch.tensor([-0.5, -1.0])}
    assert rl.weighted_sum(terms, {"correct": 1.0, "overlong": 0.5}).tolist() == [0.75, -0.5]
    with pytest.raises(KeyError, match="length"):
        rl.weighted_sum(terms, {"length": 1.0})


def test_informative_groups():
    keep = rl.informative_groups(torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]), group_size=4)
    assert keep.tolist() == [False, True, False]


def test_score_names_the_sample_a_reward_function_fails_on():
    def reward(prompt, completion, answer):
        if "boom" in completion:
            raise KeyError("no parse")
        return float("nan") if completion == "nan" else float(completion == answer)

    assert rl.score(reward, ["p0", "p1"], ["3", "4"], ["3", "3"]).tolist() == [1.0, 0.0]
    with pytest.raises(RuntimeError, match=r"reward function reward raised on sample 1: prompt='p1', completion='boom'"):
        rl.score(reward, ["p0", "p1"], ["3", "boom"], ["3", "3"])
    with pytest.raises(ValueError, match=r"returned nan on sample 0: prompt='p0', completion='nan', answer='3'"):
        rl.score(reward, ["p0"], ["nan"], ["3"])


def test_degenerate_batch_warning_names_all_truncated_batches():
    zeros = torch.zeros(8)
    message = rl.degenerate_batch_warning(zeros, torch.ones(8, dtype=torch.bool), group_size=4)
    assert message.startswith("all 8 completions hit max_new_tokens")
    assert "equal rewards" in rl.degenerate_batch_warning(torch.ones(8), torch.zeros(8, dtype=torch.bool), 4)
    assert rl.degenerate_batch_warning(TWO_GROUPS, torch.ones(8, dtype=torch.bool), group_size=4) is None
