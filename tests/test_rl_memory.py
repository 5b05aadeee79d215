"""RL memory: chunked log-probs, micro-batched policy updates equal to one pass, their peak memory, and
the KV bytes each answer's real cache holds."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvtrain.kv import KVQuantSpec, attached
from kvtrain.rl import rollout
from kvtrain.rl.rollout import Rollouts, policy_logprobs, sample, token_entropy, token_logprobs


def test_chunked_logprobs_equal_log_softmax_in_value_and_gradient(monkeypatch):
    monkeypatch.setattr(rollout, "LOGPROB_CHUNK_BYTES", 4 * 50 * 3)  # 3 positions per chunk of a 50-token vocab
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 50, (2, 7))
    weights = torch.randn(2, 7, dtype=torch.float64)
    ours = token_logprobs(logits, tokens, temperature=0.7)
    (ours * weights).sum().backward()
    grad, logits.grad = logits.grad.clone(), None
    reference = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, logits.grad, rtol=0, atol=1e-12)
    p = torch.softmax(logits.detach() / 0.7, -1)
    torch.testing.assert_close(token_entropy(logits.detach(), 0.7), -(p * p.log()).sum(-1), rtol=0, atol=1e-12)
    assert token_logprobs(logits.detach().bfloat16(), tokens).dtype == torch.float32  # at least fp32
    with pytest.raises(ValueError, match="temperature > 0, got 0"):
        token_logprobs(logits, tokens, temperature=0)


@pytest.fixture(scope="module")
def grpo_tiny(tiny_model_dir):
    from kvtrain.models import load_tokenizer
    from kvtrain.modules import GRPOModule

    def module(**kwargs):
        torch.manual_seed(0)
        m = GRPOModule(str(tiny_model_dir), num_generations=2, temperature=0.9, max_new_tokens=10, **kwargs).double()
        m.manual_backward = lambda loss: loss.backward()  # no Trainer: plain autograd
        return m

    return module, load_tokenizer(str(tiny_model_dir))


def merged_rollouts(model, tokenizer, spec):
    """Rollouts from two generate calls with different prompt widths, merged as dynamic sampling does."""
    from kvtrain.modules.grpo import _concat_groups

    torch.manual_seed(1)
    a = sample(model, tokenizer, ["x =", "def f(a):"], 2, max_new_tokens=10, temperature=0.9, spec=spec)
    b = sample(model, tokenizer, ["import os\nimport sys\n\nclass A:"], 2, max_new_tokens=7, temperature=0.9, spec=spec)
    parts = [(r, torch.tensor([1.0, 0.0] * (len(r.texts) // 2)), torch.zeros(len(r.texts))) for r in (a, b)]
    merged, correct, _ = _concat_groups(parts, tokenizer.pad_token_id, limit=6)
    return merged, correct


@pytest.mark.parametrize("settings", [
    dict(loss="ppo", kl_weight=0.1, aggregation="seq_mean_token_mean"),
    dict(loss="drpo"),
    dict(loss="gppo", aggregation="constant"),
], ids=["ppo-kl", "drpo", "gppo"])
def test_micro_batched_update_equals_one_pass(grpo_tiny, settings):
    build, tokenizer = grpo_tiny
    spec = KVQuantSpec(residual=4, key_group_size=4, value_group_size=16)
    results = []
    for micro in (None, 1, 4):
        module = build(micro_batch_size=micro, **settings)
        with attached(module.model, spec):
            rollouts, correct = merged_rollouts(module.model, tokenizer, spec)
            old = rollouts.logprobs.double() - 0.05 * rollouts.completion_mask  # ratios off 1: clipping matters
            rewards = correct.double()
            advantages = module._advantages(rewards, rollouts.completion_mask) if settings["loss"] != "drpo" else None
            reference = module._reference_logprobs(rollouts) if settings.get("kl_weight") else None
            loss, stats = module._backward(rollouts, old, advantages, correct, reference)
        grads = [p.grad.clone() for p in module.model.parameters() if p.requires_grad]
        results.append((loss, stats, grads))
    assert len(rollouts.blocks) == 2  # two generate calls, two prompt widths
    (loss, stats, grads), *others = results
    assert loss.abs() > 0 and sum(g.abs().sum() for g in grads) > 0
    for other_loss, other_stats, other_grads in others:
        torch.testing.assert_close(other_loss, loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(other_stats["entropy"], stats["entropy"], rtol=0, atol=1e-6)
        for a, b in zip(other_grads, grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from kvtrain.modules import GRPOModule
    from kvtrain.rl.rollout import Rollouts

    micro = None if sys.argv[1] == "none" else int(sys.argv[1])
    rows, prompt, completion, vocab = 8, 4, 64, 150_000
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab)
    torch.manual_seed(0)
    module = GRPOModule("kvtrain-ref", init="random", config_overrides=tiny, micro_batch_size=micro,
                        num_generations=2, max_new_tokens=completion)
    module.manual_backward = lambda loss: loss.backward()
    ids = torch.randint(2, 4000, (rows, completion))
    ones = torch.ones(rows, completion, dtype=torch.long)
    rollouts = Rollouts(torch.randint(2, 4000, (rows, prompt)), torch.ones(rows, prompt, dtype=torch.long), ids,
                        ones, torch.full((rows, completion), -11.9), torch.zeros(rows, dtype=torch.bool), [""] * rows)
    old, advantages = rollouts.logprobs, torch.linspace(-1, 1, rows)

    def status(field):  # kB in /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: only the pass below counts
    before = status("VmRSS:")
    module._backward(rollouts, old, advantages, torch.zeros(rows), None)
    print(json.dumps({"peak_above_start": status("VmHWM:") - before, "before": before}))
""")


def peak_bytes(micro: str, home) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}  # freed blocks leave RSS
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, micro], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_above_start"]


@pytest.mark.slow
def test_log_prob_pass_peak_memory_is_bounded_by_the_micro_batch(home):
    # A 150k vocabulary (Qwen2's 151,936 is the hub template's) on a tiny model: 8 rows x 64 completion
    # tokens, one update (forward + backward). Logits of one row: 65 positions x 150k x 4 bytes = 39 MB.
    # The bound for micro-batches of 1 row: the parameter gradients (embedding + LM head, 2 x 150k x 64 x 4
    # = 77 MB), four row-sized fp32 tensors (the LM head's output, its gradient, and the log-softmax's two
    # chunk temporaries), and 64 MB for everything else (activations of a 64-wide model, allocator slack).
    row = 65 * 150_000 * 4
    bound = 2 * 150_000 * 64 * 4 + 4 * row + 64 * 2**20
    micro = peak_bytes("1", home)
    assert micro < bound, f"micro-batched peak {micro / 2**20:.0f} MiB above the bound {bound / 2**20:.0f} MiB"
    # the bound is not loose: one pass over all 8 rows holds 8 rows of logits and their gradient
    whole = peak_bytes("none", home)
    assert whole > bound + 8 * row, f"one pass peaked at {whole / 2**20:.0f} MiB"


def test_answer_kv_bytes_are_each_answers_real_cache(tiny_model_dir):
    from kvtrain.eval import answer_kv_bytes
    from kvtrain.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    spec = KVQuantSpec(residual=0, key_group_size=4, value_group_size=16)
    torch.manual_seed(0)
    out = sample(model, tokenizer, ["x =", "import os\nimport sys\n\nclass A:"], 2, max_new_tokens=9, temperature=1.0)
    held = (out.prompt_mask.sum(1) + out.lengths).tolist()  # prompt without padding + completion
    assert len(set(held)) > 1
    # tiny model: 2 layers x 2 KV heads x head_dim 16, fp32. Per token and head: keys in whole 4-token groups
    # take 16 channels x (2 bits + fp16 scale and zero / 4 tokens) = 20 bytes, keys still waiting for their
    # group (up to 3) 16 x 4 = 64 bytes; values 16 x 2 bits + one fp16 scale and zero = 8 bytes.
    expected = [4 * (20 * (n // 4 * 4) + 64 * (n % 4) + 8 * n) for n in held]
    assert answer_kv_bytes(model, out, spec).tolist() == expected
    assert answer_kv_bytes(model, out, None).tolist() == [2 * 2 * 2 * 16 * 4 * n for n in held]  # fp32 K and V
    # the storage is a function of the tokens held: another answer of the same length holds as many bytes
    other = Rollouts(out.prompt_ids[:1], out.prompt_mask[:1], (out.completion_ids[:1] + 1) % 4000,
                     out.completion_mask[:1], out.logprobs[:1], out.truncated[:1], out.texts[:1])
    assert answer_kv_bytes(model, other, spec).tolist() == expected[:1]
    measured = {}
    answer_kv_bytes(model, out, spec, measured)
    assert len(measured) == len(set(held))  # one real cache per distinct length
