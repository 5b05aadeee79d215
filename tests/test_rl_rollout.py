"""Rollouts: finish reasons and masks, and the first importance ratio of an update is 1 (training
forward vs sampling log-probs) with and without the compressed KV cache."""

import dataclasses

import pytest
import torch

from kvtrain.kv import KVQuantSpec, KVSpec, attached
from kvtrain.rl.rollout import completion_mask, policy_logprobs, sample

EOS, PAD = 2, 3


def test_completion_mask_and_finish_reasons():
    ids = torch.tensor([[5, 6, EOS, PAD, PAD],   # stopped by EOS: the EOS belongs to the completion
                        [5, 6, 7, 8, 9],         # ran out of tokens
                        [5, 6, PAD, PAD, PAD],   # stopped on a stop string ending in "6": padding follows
                        [5, 6, 7, 8, 9],         # a stop string completed on the last token
                        [EOS, PAD, PAD, PAD, PAD]])
    stopped_by_string = torch.tensor([False, False, True, True, False])
    mask, truncated = completion_mask(ids, EOS, PAD, stopped_by_string)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False, False, False]


def test_completion_mask_when_padding_is_eos():
    ids = torch.tensor([[5, 6, EOS, EOS], [5, 6, EOS, EOS]])  # row 1 stopped on a string: its EOS is padding
    mask, truncated = completion_mask(ids, EOS, EOS, torch.tensor([False, True]))
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]] and not truncated.any()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from kvtrain.models import load_model, load_tokenizer

    model = load_model(str(tiny_model_dir)).double().eval()  # float64: parity without fp32 rounding flips
    return model, load_tokenizer(str(tiny_model_dir))


PROMPTS = ["def add(a, b):\n    return", "import os\nimport sys\n\nclass Config:\n    def __init__(self"]


EVICTING = {  # rollouts under token eviction: H2O deciding every 8 tokens, SnapKV at the end of the prompts
    "h2o-16-every-8": KVSpec(key=None, value=None, eviction=dict(selector="h2o", budget=16, interval=8, sinks=2)),
    "snapkv-half-at-prompt-end": KVSpec(key=None, value=None, eviction=dict(selector="snapkv", budget=0.5, interval=0,
                                                                            sinks=1, options={"window": 4})),
}


@pytest.mark.parametrize("spec", [None, KVQuantSpec(residual=16, key_group_size=16, value_group_size=16),
                                  *EVICTING.values()],
                         ids=["full-precision", "kivi2-r16-g16", *EVICTING])
def test_first_importance_ratio_is_one(tiny, spec):
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = sample(model, tokenizer, PROMPTS, num_generations=2, max_new_tokens=40, temperature=0.9, spec=spec)
    assert rollouts.completion_ids.shape[0] == 4 and rollouts.prompt_mask[0].sum() < rollouts.prompt_mask[2].sum()
    assert rollouts.truncated.all() and (rollouts.lengths == 40).all()  # a random model never says EOS in 40 tokens
    if spec is None:
        now = policy_logprobs(model, rollouts, temperature=0.9)
    else:
        with attached(model, spec):
            now = policy_logprobs(model, rollouts, temperature=0.9)
    ratio = torch.exp(now - rollouts.logprobs)[rollouts.completion_mask.bool()]
    # generate hands out its logits cast to fp32: fp32 rounding of the logits is the tolerance (observed 8e-7)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    if spec is not None:  # the view matters: scoring with full-precision K/V gives other log-probs
        plain = policy_logprobs(model, rollouts, temperature=0.9)
        assert (plain - rollouts.logprobs).abs().max() > 1e-4


def test_sample_rejects_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample(model, tokenizer, PROMPTS, temperature=-1)
    with pytest.raises(ValueError, match="no prompts"):
        sample(model, tokenizer, [])


def test_greedy_rollouts_are_deterministic(tiny):
    model, tokenizer = tiny
    a = sample(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0)
    b = sample(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0)
    assert torch.equal(a.completion_ids, b.completion_ids)
    ratio = torch.exp(policy_logprobs(model, a) - a.logprobs)[a.completion_mask.bool()]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_stop_strings_end_completions(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = sample(model, tokenizer, PROMPTS, num_generations=3, max_new_tokens=30, stop=["e"])
    for text, length, truncated, ids in zip(rollouts.texts, rollouts.lengths.tolist(), rollouts.truncated.tolist(),
                                            rollouts.completion_ids):
        assert ("e" in text) != truncated  # stopped on the string, or ran out of tokens
        assert truncated or "e" in tokenizer.decode(ids[:length])  # the mask keeps the stopping token
        assert tokenizer.pad_token_id not in ids[:length].tolist()
    assert not rollouts.truncated.all() and (rollouts.lengths < 30).any()


def test_merged_generate_calls_keep_their_own_padding_so_the_first_ratio_stays_one(tiny):
    from kvtrain.modules.grpo import _concat_groups

    model, tokenizer = tiny
    spec = KVQuantSpec(residual=4, key_group_size=4, value_group_size=16)
    torch.manual_seed(0)
    short = sample(model, tokenizer, ["x ="], 2, max_new_tokens=20, temperature=0.9, spec=spec)  # prompt 2 tokens wide
    long = sample(model, tokenizer, PROMPTS, 1, max_new_tokens=12, temperature=0.9, spec=spec)  # prompts up to 19 wide
    parts = [(r, torch.zeros(len(r.texts)), torch.zeros(len(r.texts))) for r in (short, long)]
    merged, _, _ = _concat_groups(parts, tokenizer.pad_token_id, limit=3)  # dynamic sampling's refill keeps 3 rows
    assert merged.blocks == ((2, short.prompt_ids.shape[1]), (1, long.prompt_ids.shape[1]))
    assert merged.prompt_ids.shape[1] == long.prompt_ids.shape[1] > short.prompt_ids.shape[1]
    with attached(model, spec):
        now = policy_logprobs(model, merged, temperature=0.9)
        repadded = policy_logprobs(model, dataclasses.replace(merged, blocks=()), temperature=0.9)
    ratio = torch.exp(now - merged.logprobs)[merged.completion_mask.bool()]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    # scored in one forward with the short rows' extra left padding: key groups and the window count
    # from each row's first real token (kvtrain.kv.window.left_pads), so nothing shifts
    again = torch.exp(repadded - merged.logprobs)[merged.completion_mask.bool()]
    torch.testing.assert_close(again, torch.ones_like(again), rtol=0, atol=1e-5)
