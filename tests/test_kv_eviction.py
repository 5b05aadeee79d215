"""Token eviction (kvtrain.kv.eviction, kvtrain.kv.selectors): every registered selector makes the
same decisions in one training forward as the evicting cache makes decoding (float64, every family),
the scores are the selectors' on crafted attention patterns, bytes fall with the budget as held, and
misuse is refused by name."""

import math
from dataclasses import replace

import lightning as L
import pytest
import torch
from transformers import DynamicCache

from conftest import TINY
from kvtrain import QuantizedKVCache, attach, detach
from kvtrain.callbacks import KVQuantCallback
from kvtrain.data.lm import LMDataModule
from kvtrain.kv import KVSpec, codec_state_dict, spec_from_dict
from kvtrain.kv.attention import hf_model, set_prompt_lengths
from kvtrain.kv.cache import EvictingKVLayer, QuantizedKVLayer
from kvtrain.kv.eviction import EvictionPolicy, Survivors, attend
from kvtrain.kv.selectors import SELECTORS, Selector, build_selector, register
from kvtrain.modules import CausalLMModule
from test_kv_parity import ARCHS, TOL, build, decode, training_views


def evicting(selector="snapkv", options=None, **policy) -> KVSpec:
    fields = dict(selector=selector, budget=0.5, interval=8, sinks=2, recent=2, options=options or {}) | policy
    return KVSpec(key=None, value=None, eviction=fields)


SELECTOR_EXAMPLES = [(name, options) for name, cls in SELECTORS.items() for options in cls.examples]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma2"])
@pytest.mark.parametrize("selector,options", SELECTOR_EXAMPLES, ids=[f"{n}{o}" for n, o in SELECTOR_EXAMPLES])
def test_training_forward_equals_decoding_with_the_evicting_cache(arch, selector, options):
    spec, length = evicting(selector, options), 45
    model = build(arch)
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(1))
    full_precision, trained_view = training_views(model, ids, spec)
    assert (trained_view[:, 8:] - full_precision[:, 8:]).abs().max() > 1e-2, "eviction did not change the forward"
    torch.testing.assert_close(trained_view[:, :8], full_precision[:, :8], **TOL)  # nothing evicted before 8 tokens
    for splits in ([], [20], [5, 30]):  # a prefill past decisions, or none, then token by token
        decoded, cache = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, trained_view, **TOL, msg=f"prefill splits {splits}")
    held = cache.layers[0].held
    assert cache.get_seq_length() == length and held.total == length
    assert held.keys.shape[-2] == 20 + 5  # ceil(0.5 * 40) at the decision after 40 tokens, and 5 since
    assert (held.positions[..., :2] == torch.tensor([0, 1], dtype=torch.int32)).all()  # the sinks survive
    assert (held.positions[..., 18:20] == torch.tensor([38, 39], dtype=torch.int32)).all()  # and the recent two
    detach(model)


@pytest.mark.parametrize("selector,options", SELECTOR_EXAMPLES, ids=[f"{n}{o}" for n, o in SELECTOR_EXAMPLES])
def test_sliding_window_layers_attend_within_their_window_and_the_others_evict(selector, options):
    """Gemma 2 alternates sliding-window layers (48 tokens here) with full ones: past the window, the
    sliding layer keeps attending through the model's own mask and holds its tokens, the full layer
    evicts, in training as in the cache (softcapped attention too)."""
    spec, length = evicting(selector, options), 70
    model = build("gemma2")
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(1))
    _, trained_view = training_views(model, ids, spec)
    for splits in ([], [50], [5, 60]):
        decoded, cache = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, trained_view, **TOL, msg=f"prefill splits {splits}")
    sliding, full = cache.layers
    assert isinstance(sliding, QuantizedKVLayer) and isinstance(full, EvictingKVLayer)
    assert full.held.keys.shape[-2] == 32 + 6  # ceil(0.5 * 64), and 6 since
    learned = [name for name in codec_state_dict(model) if name.endswith("selector.weight")]
    assert learned == (["1.selector.weight"] if selector == "dms" else [])  # no logits where nothing is evicted
    detach(model)


@pytest.mark.parametrize("selector,options", SELECTOR_EXAMPLES, ids=[f"{n}{o}" for n, o in SELECTOR_EXAMPLES])
def test_eviction_at_the_end_of_the_prompt_matches_the_cache_row_by_row(selector, options):
    spec, prompts = evicting(selector, options, interval=0, budget=0.25), [24, 31]
    model = build("llama")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    attach(model, spec)
    with pytest.raises(ValueError, match=r"interval 0\) needs each row's prompt length"):
        model(ids, use_cache=False)
    set_prompt_lengths(model, prompts)
    with torch.no_grad():
        trained_view = model(ids, use_cache=False).logits
    for row, prompt in enumerate(prompts):  # the prompt in one forward, then token by token
        decoded, cache = decode(model, ids[row:row + 1], spec, [prompt])
        torch.testing.assert_close(decoded[0], trained_view[row], **TOL, msg=f"row {row}")
        assert cache.layers[1].held.keys.shape[-2] == math.ceil(0.25 * prompt) + 40 - prompt  # one decision


@pytest.mark.parametrize("interval", [0, 8])
def test_a_straight_through_selection_computes_the_cache_forward_and_passes_gradients_to_the_scores(interval):
    """With straight_through, training keeps every token, the evicted weighted 0: the forward is the
    hard selection's (so the cache's), and an answer-only loss now reaches the queries SnapKV scores
    with, which the hard top-k leaves without a gradient."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 40, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k2, v2 = k[:, :2], v[:, :2]  # 2 KV heads, 2 query heads each
    outs, grads = {}, {}
    for temperature in (0.0, 0.5):
        rule = EvictionPolicy("snapkv", 0.25, interval=interval, sinks=2, straight_through=temperature,
                              options={"window": 4, "kernel": 3})
        held = Survivors.empty(k2, v2, rule.build(), gated=temperature > 0)
        out, held = attend(q, k2, v2, held, rule, rule.build(), scaling=0.25, prompt=32 if not interval else None)
        outs[temperature] = out
        q.grad = None
        out[:, -1].sum().backward()  # the last query's answer only
        grads[temperature] = q.grad[:, :, 28:32].abs().sum()  # the prompt's last queries, which SnapKV observes
    torch.testing.assert_close(outs[0.5], outs[0.0], rtol=1e-12, atol=1e-12)
    assert grads[0.0] == 0 and grads[0.5] > 1e-6


def test_a_straight_through_training_forward_is_the_evicting_forward_on_a_model():
    model = build("qwen2")
    spec = evicting("h2o", interval=8, budget=0.25, straight_through=1.0)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(6))
    attach(model, spec)
    with torch.no_grad():
        hard = model(ids, use_cache=False).logits
    gated = model(ids, use_cache=False).logits  # with gradients: every token kept, the evicted weighted 0
    torch.testing.assert_close(gated, hard, **TOL)
    gated[:, -1].logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_the_callback_reads_prompt_lengths_from_the_loss_mask():
    model, spec = build("llama"), evicting("snapkv", interval=0)
    callback = KVQuantCallback(spec)
    callback._model = model
    attach(model, spec)
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    callback.on_train_batch_start(None, None, {"input_ids": torch.zeros(3, 6), "loss_mask": loss_mask}, 0)
    assert hf_model(model).kvtrain_state.prompts == [3, 5, 6]  # a row with no targets decides nothing


def one_head(keys: list[list[float]], queries: list[list[float]]):
    """(query, keys, values) of one batch row and one head, D = 2."""
    k = torch.tensor(keys, dtype=torch.float64)[None, None]
    return torch.tensor(queries, dtype=torch.float64)[None, None], k, torch.randn_like(k)


def decide(selector, keys, queries, budget, interval, **policy):
    """The survivors of running `queries` over `keys` (one head) under a selector, and what it held."""
    query, k, v = one_head(keys, queries)
    rule = EvictionPolicy(selector, budget, interval, **policy)
    chosen = rule.build()
    _, held = attend(query, k, v, Survivors.empty(k, v, chosen), rule, chosen, scaling=1.0)
    return held.positions[0, 0].tolist(), held


# A needle: token 2's key lines up with every query (e^10 against e^0), the other keys are orthogonal.
NEEDLE_KEYS = [[0.0, 1.0], [0.0, 1.0], [10.0, 0.0], [0.0, 1.0]]
QUERIES = [[1.0, 0.0]] * 4


def test_scores_on_a_needle_pattern_by_hand():
    assert decide("streaming_llm", NEEDLE_KEYS, QUERIES, 1, 4)[0] == [3]  # the newest
    assert decide("streaming_llm", NEEDLE_KEYS, QUERIES, 2, 4, sinks=1)[0] == [0, 3]
    assert decide("tova", NEEDLE_KEYS, QUERIES, 1, 4)[0] == [2]  # the last query's favourite
    assert decide("snapkv", NEEDLE_KEYS, QUERIES, 1, 4, options={"window": 2, "kernel": 1})[0] == [2]
    # H2O: token 0 has 1 + 1/2 (queries 0 and 1 see only plain keys) + 2/(e^10 + 2) + 3/(e^10 + 3) ...
    survivors, held = decide("h2o", NEEDLE_KEYS, QUERIES, 2, 4)
    e = math.exp(10)
    token0 = 1 + 1 / 2 + 1 / (e + 2) + 1 / (e + 3)
    needle = e / (e + 2) + e / (e + 3)
    assert survivors == [0, 2]  # token 1 (1/2 + ...) and 3 (1/(e+3)) go
    torch.testing.assert_close(held.attention[0, 0], torch.tensor([token0, needle], dtype=torch.float64))


def test_h2o_accumulates_uniform_attention_across_decisions():
    # zero queries: query p spreads 1/(its visible tokens) over them; budget 2, a decision every 4 tokens
    keys, queries = [[float(i), 1.0] for i in range(8)], [[0.0, 0.0]] * 8
    survivors, held = decide("h2o", keys, queries, 2, 4)
    first = [sum(1 / (p + 1) for p in range(j, 4)) for j in (0, 1)]  # tokens 0 and 1 win at 4 tokens
    later = [1 / 3 + 1 / 4 + 1 / 5 + 1 / 6] * 2  # queries 4..7 see 0, 1 and 1..4 new tokens
    assert survivors == [0, 1]
    torch.testing.assert_close(held.attention[0, 0], torch.tensor(first, dtype=torch.float64) + torch.tensor(later, dtype=torch.float64))


def test_snapkv_pools_the_window_attention_and_tova_averages_heads():
    snap = build_selector("snapkv", {"window": 2, "kernel": 3})
    attention = torch.tensor([[[0.0, 0.0, 3.0, 0.0, 0.0, 6.0]]])
    torch.testing.assert_close(snap.score(attention, None), torch.tensor([[[0.0, 1.0, 1.0, 1.0, 2.0, 2.0]]]))
    tova = build_selector("tova", {})
    heads = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    torch.testing.assert_close(tova.score(heads, None), torch.tensor([[[0.5, 1.5], [0.5, 1.5]]]))


def learned(weight: list[list[float]]) -> Selector:
    """The dms selector with its per-head logit directions set to `weight` (H, D)."""
    dms = build_selector("dms", {})
    state = dms.make_state(head_dim=len(weight[0]), kv_heads=len(weight))
    with torch.no_grad():
        state.weight.copy_(torch.tensor(weight))
    return dms.bound(state)


def test_dms_scores_each_value_on_its_head_direction_by_hand():
    dms = learned([[1.0, 0.0], [0.0, -2.0]])
    values = torch.tensor([[[[3.0, 1.0], [0.0, 5.0], [-1.0, 2.0]]] * 2], dtype=torch.float64)  # (1, 2, 3, 2)
    scores = dms.score(None, torch.arange(3)[None, None].expand(1, 2, 3), values)
    torch.testing.assert_close(scores, torch.tensor([[[3.0, 0.0, -1.0], [-2.0, -10.0, -4.0]]], dtype=torch.float64))
    rule = EvictionPolicy("dms", 2, interval=3)
    k = torch.randn_like(values)
    _, held = attend(torch.randn(1, 2, 3, 2, dtype=torch.float64), k, values, Survivors.empty(k, values, dms), rule,
                     dms, scaling=1.0)
    assert held.positions[0].tolist() == [[0, 1], [0, 2]]  # each head its two best, in position order
    with pytest.raises(ValueError, match="the dms selector scores with logits the model learns"):
        build_selector("dms", {}).score(None, None, values)


def test_dms_learns_through_the_straight_through_gate_to_keep_the_token_the_answer_needs():
    """One head, 16 tokens, budget 4 decided once at the end: only the needle's value (along channel 1)
    answers the last query. From logits that rank it last, gradient steps on the logit direction alone,
    through the gate, make the cache keep it (and the training forward stays the cache's)."""
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 16, 4, dtype=torch.float64)
    values = torch.randn(1, 1, 16, 4, dtype=torch.float64) * 0.1
    values[..., 0] = 1.0  # every token has this
    values[0, 0, 9, 1] = 3.0  # only the needle has this
    query = torch.randn(1, 1, 16, 4, dtype=torch.float64)
    dms = learned([[0.0, -1.0, 0.0, 0.0]])
    rule = EvictionPolicy("dms", 4, interval=0, straight_through=1.0)

    def kept_and_loss(gated: bool):
        held = Survivors.empty(keys, values, dms, gated=gated)
        out, held = attend(query, keys, values, held, rule, dms, scaling=0.5, prompt=15)
        alive = held.positions[0, 0].tolist() if held.gate is None else held.gate[0, 0].nonzero().flatten().tolist()
        return alive, (out[0, -1, 0, 1] - 3.0) ** 2  # the last query should read the needle's channel 1

    assert 9 not in kept_and_loss(False)[0]
    optimizer = torch.optim.SGD(dms.state.parameters(), lr=0.5)
    for _ in range(30):
        optimizer.zero_grad()
        kept_and_loss(True)[1].backward()
        optimizer.step()
    with torch.no_grad():
        assert 9 in kept_and_loss(False)[0] and kept_and_loss(True)[0] == kept_and_loss(False)[0]


def test_noise_perturbs_the_straight_through_selection_in_training_only():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    dms = learned(torch.randn(2, 8).tolist())
    chosen = {}
    for noise in (0.0, 2.0):
        rule = EvictionPolicy("dms", 0.25, interval=0, straight_through=1.0, noise=noise)
        held = attend(q, k, v, Survivors.empty(k, v, dms, gated=True), rule, dms, scaling=0.5, prompt=32)[1]
        chosen[noise] = held.gate.nonzero().tolist()
    decoded = attend(q, k, v, Survivors.empty(k, v, dms), rule, dms, scaling=0.5, prompt=32)[1]
    assert chosen[0.0] != chosen[2.0]  # the noisy ranking keeps other tokens
    assert len(chosen[2.0]) == len(chosen[0.0]) == 2 * (8 + 8)  # as many: a quarter of 32, and the 8 since
    kept = [[b, h, int(p)] for b in range(1) for h in range(2) for p in decoded.positions[b, h]]
    assert kept == chosen[0.0]  # without noise the gate keeps what the cache keeps


def test_dms_logits_train_save_and_reload_with_the_model(tmp_path):
    from safetensors.torch import load_file, save_file

    from kvtrain.kv import codec_state_dict

    model, spec = build("llama"), evicting("dms", straight_through=1.0)
    attach(model, spec)
    names = sorted(codec_state_dict(model))
    assert names == [f"{layer}.selector.weight" for layer in range(len(names))] and len(names) >= 2
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(7))
    model(ids, use_cache=False).logits[:, -1].logsumexp(-1).sum().backward()
    grads = [m.kv_codec_state["selector"].weight.grad for m in hf_model(model).kvtrain_state.modules]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the gate passes the loss to the logits
    with torch.no_grad():
        for m in hf_model(model).kvtrain_state.modules:
            m.kv_codec_state["selector"].weight.mul_(-1.0)
        trained = model(ids, use_cache=False).logits
    save_file(codec_state_dict(model), str(tmp_path / "kv_codec_state.safetensors"))
    detach(model)
    attach(model, spec, codec_state=tmp_path / "kv_codec_state.safetensors")
    fresh = build("llama")
    fresh.load_state_dict(model.state_dict(), strict=False)
    attach(fresh, spec, codec_state=tmp_path / "kv_codec_state.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, use_cache=False).logits, trained, **TOL)
    assert load_file(str(tmp_path / "kv_codec_state.safetensors")).keys() == set(names)


def test_the_schedule_budget_and_observed_queries():
    rule = EvictionPolicy("snapkv", 0.25, interval=8, sinks=1, recent=2, options={"window": 3})
    assert rule.segments(0, 20) == [(0, 8), (8, 16), (16, 20)]
    assert rule.segments(13, 1) == [(0, 1)] and rule.segments(15, 3) == [(0, 1), (1, 3)]
    assert [rule.kept(t) for t in (1, 3, 8, 16, 17)] == [1, 3, 3, 4, 5]  # never below sinks + recent
    assert EvictionPolicy("h2o", 10).kept(8) == 8 and EvictionPolicy("h2o", 10).kept(64) == 10
    assert EvictionPolicy("h2o", 0.1).kept(30) == 3  # not 4 from 0.1 * 30 = 3.0000000000000004
    once = EvictionPolicy("snapkv", 0.25, interval=0, options={"window": 3})
    assert once.segments(0, 20, prompt=12) == [(0, 12), (12, 20)] and once.segments(12, 1) == [(0, 1)]
    assert once.decides(12, prompt=12) and not once.decides(13) and not once.decides(12)
    assert once.observes(torch.arange(16), once.build(), 12).nonzero().flatten().tolist() == [9, 10, 11]
    observed = rule.observes(torch.arange(16), build_selector("snapkv", {"window": 3}))
    assert observed.nonzero().flatten().tolist() == [5, 6, 7, 13, 14, 15]  # the 3 queries before each decision


def test_bytes_fall_with_the_budget_as_held():
    model, ids = build("llama"), torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(2))
    measured = {}
    for budget in (1.0, 0.5, 0.25, 0.125):
        spec = evicting("h2o", budget=budget, interval=16, sinks=0, recent=0)
        attach(model, spec)
        _, cache = decode(model, ids, spec, [64])
        measured[budget] = cache.nbytes()
        for layer in cache.layers:  # what nbytes counts is the memory the tensors own, no larger buffer behind them
            held = layer.held
            for t in (held.keys, held.values, held.positions, held.attention):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        keys = cache.layers[0].held.keys
        assert keys.shape[-2] == math.ceil(budget * 128)
    full = DynamicCache()
    with torch.no_grad():
        detach(model)
        model(ids, past_key_values=full)
    full_bytes = sum(t.numel() * t.element_size() for layer in full.layers for t in (layer.keys, layer.values))
    assert measured[1.0] > full_bytes  # all kept, plus each token's position and score
    assert measured[1.0] > measured[0.5] > measured[0.25] > measured[0.125]
    assert measured[0.25] / measured[1.0] == pytest.approx(0.25, abs=0.01)


def test_generate_with_the_evicting_cache_follows_the_training_view():
    model, spec = build("qwen2"), evicting("tova", budget=12, interval=1, sinks=1, recent=0)
    attach(model, spec)
    prompt = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=QuantizedKVCache(spec), max_new_tokens=20, do_sample=False)
        logits = model(out, use_cache=False).logits
    assert out.shape[1] == 30
    assert torch.equal(logits[0, 9:-1].argmax(-1), out[0, 10:])  # each generated token is the view's argmax


def test_training_under_eviction_lowers_the_loss_with_gradients_through_the_kept_tokens(corpus_file):
    L.seed_everything(0)
    spec = evicting("snapkv", {"window": 4}, budget=0.25, interval=16, sinks=1, recent=4)
    module = CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, lr=3e-3, warmup_steps=5)
    trainer = L.Trainer(max_steps=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[KVQuantCallback(spec)], accelerator="cpu", limit_val_batches=2, val_check_interval=25)
    trainer.fit(module, datamodule=LMDataModule(str(corpus_file), seq_len=64, batch_size=8))
    assert trainer.callback_metrics["val/loss"] < 7.0  # from ln(4096) = 8.32 at init


def test_distillation_under_eviction_learns_from_the_full_cache_teacher(corpus_file):
    """distill_weight adds KL(teacher || student) with the teacher the frozen start on its full cache:
    at the first step the student differs from it only by what the learned selection evicts."""
    L.seed_everything(0)
    spec = evicting("dms", budget=0.25, interval=16, sinks=1, recent=4, straight_through=1.0)
    module = CausalLMModule("kvtrain-ref", init="random", config_overrides=TINY, lr=3e-3, warmup_steps=5,
                            distill_weight=1.0)
    kl = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kl.append(float(trainer.callback_metrics["train/kl"]))

    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[KVQuantCallback(spec), Record()], accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, datamodule=LMDataModule(str(corpus_file), seq_len=64, batch_size=8))
    # eviction moved the student from its teacher (observed 1.4e-3 per token at the random start)
    assert kl[0] > 1e-4 and all(math.isfinite(k) for k in kl)
    assert not hasattr(module.teacher, "kvtrain_state")  # whose cache is full


def test_the_registry_holds_the_shipped_selectors_and_refuses_a_second_name():
    assert set(SELECTORS) == {"streaming_llm", "snapkv", "h2o", "tova", "dms"}
    with pytest.raises(ValueError, match="a selector named 'h2o' is registered already"):
        register("h2o")(SELECTORS["tova"])

    class Untested(Selector):
        def score(self, attention, positions):
            return positions.float()

    with pytest.raises(ValueError, match=r"selector 'untested' needs `examples` \(options\) for the registry-driven tests"):
        register("untested")(Untested)
    assert "untested" not in SELECTORS


@pytest.mark.parametrize("fields,message", [
    (dict(budget=0), r"budget must be a token count \(int >= 1\) or a kept fraction \(float in \(0, 1\]\), got 0"),
    (dict(budget=1.5), r"got 1.5"),
    (dict(budget=True), r"got True"),
    (dict(interval=-1), r"interval \(tokens between eviction decisions; 0: once, at the end of the prompt\) must be a "
                        r"whole number >= 0, got -1"),
    (dict(budget=3, sinks=2, recent=2), r"a budget of 3 tokens cannot hold sinks=2 and recent=2"),
    (dict(selector="lru"), r"unknown selector 'lru'; registered: \['dms', 'h2o', 'snapkv', 'streaming_llm', 'tova'\]"),
    (dict(options={"windows": 4}), r"selector 'snapkv' has no option\(s\) \['windows'\]; its options: \['window', 'kernel'\]"),
    (dict(options={"window": 16}), r"snapkv observes the last 16 queries .* \(interval\): give it window <= 8"),
    (dict(options={"kernel": 4}), r"snapkv kernel must be odd"),
    (dict(straight_through=-1.0), r"straight_through must be a temperature >= 0 \(0: off\), got -1.0"),
    (dict(noise=0.5), r"noise must be >= 0 and needs straight_through > 0 .* got noise=0.5 with straight_through=0.0"),
    (dict(noise=-1.0, straight_through=1.0), r"got noise=-1.0"),
    (dict(selector="h2o", retain=dict(bits=2, granularity="per_channel(16)")), r"retain encodes the tokens a decision evicts, token by "
                                                               r"token: its granularity must be per_token\(G\) or "
                                                               r"per_token_head, got per_channel\(16\)"),
    (dict(selector="h2o", retain=dict(bits=2, granularity="per_token(16)"), straight_through=1.0),
     r"straight_through with retain is not supported yet"),
    (dict(selector="h2o", retain=dict(bits=2, granularity="per_token(16)", rotation="learned")),
     r"retain encodes the tokens a decision evicts: codecs with learnable state \(learnable, rotation 'learned', "
     r"rank\) are not supported under eviction yet"),
    (dict(selector="h2o", retain=dict(bits=2, granularity="per_token(16)", layer_bits={0: 4})),
     r"retain has one bit width for every layer, got layer_bits=\{0: 4\}"),
    (dict(selector="h2o", retain=dict(bits=9, granularity="per_token(16)")), r"supports 1 to 8 bits, got 9"),
    (dict(selector="h2o", merge=1), r"merge must be true or false, got 1"),
    (dict(selector="h2o", merge=True, merge_above=1.5), r"merge_above must be a cosine similarity in \[-1, 1\], got 1.5"),
    (dict(selector="h2o", merge=True, retain=dict(bits=2, granularity="per_token(16)")),
     r"merge averages the evicted tokens into the survivors: it does not combine with retain"),
    (dict(selector="h2o", merge=True, straight_through=1.0), r"or straight_through \(which weighs them 0\)"),
    (dict(selector="h2o", retain="int2"), r"retain must be a TensorPolicy, a dict of its fields or None, got 'int2'"),
])
def test_bad_policies_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        evicting(**fields)


def test_spec_errors_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match=r"under eviction key is quantized as each token arrives, token by token: its "
                                         r"granularity must be per_token\(G\) or per_token_head, got per_channel\(32\)"):
        KVSpec(value=None, eviction={"selector": "h2o"})
    with pytest.raises(ValueError, match="residual and sinks must be 0 .*got residual=128, sinks=0"):
        KVSpec(key=dict(granularity="per_token(32)"), value=None, eviction={"selector": "h2o"})
    with pytest.raises(ValueError, match="merge averages the survivors' K/V: it does not combine with quantized K/V"):
        KVSpec(key=None, value=dict(granularity="per_token(32)"), residual=0, eviction={"selector": "h2o", "merge": True})
    with pytest.raises(ValueError, match="placement must be 'post_rope', got 'pre_rope'"):
        KVSpec(key=None, value=None, placement="pre_rope", eviction={"selector": "h2o"})
    with pytest.raises(ValueError, match=r"eviction has no field\(s\) \['keep'\]"):
        KVSpec(key=None, value=None, eviction={"keep": 0.5})
    spec = evicting("snapkv", {"window": 4, "kernel": 3}, budget=64)
    assert spec_from_dict(spec.to_dict()) == spec
    spec.save(tmp_path)
    assert QuantizedKVCache(str(tmp_path)).spec == spec


def test_misuse_is_refused_by_name():
    model, spec = build("llama"), evicting("h2o")
    ids = torch.randint(0, 512, (1, 20))
    attach(model, spec)
    with torch.no_grad(), pytest.raises(ValueError, match="a DynamicCache holding 20 tokens cannot replay it"):
        cache = DynamicCache()
        model(ids, past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)
    with torch.no_grad(), pytest.raises(ValueError, match="decodes with a QuantizedKVCache of"):
        model(ids, past_key_values=QuantizedKVCache(evicting("tova")))
    from transformers import MistralConfig, MistralForCausalLM

    from test_kv_parity import SHAPE

    windowed = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=24))  # every layer slides
    with pytest.raises(ValueError, match="every attention layer of MistralForCausalLM attends within a sliding window"):
        attach(windowed, spec)


def test_completion_match_is_greedy_decoding_with_the_evicting_cache():
    """A completion the cache decodes greedily (the prompt in one forward, then token by token) is
    exactly what completion_match's one teacher-forced forward scores right; change one token and
    that row is wrong."""
    from kvtrain.eval import completion_match

    model, spec = build("llama"), evicting("snapkv", {"window": 4}, budget=0.25, interval=0)
    attach(model, spec)
    prompts = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(5))
    rows = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(prompt[None], past_key_values=QuantizedKVCache(spec), max_new_tokens=4, do_sample=False)
        rows.append(out[0])
    ids = torch.stack(rows)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 24:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    assert completion_match(model, [batch])["correct"] == [True, True, True]
    wrong = ids.clone()
    wrong[1, 26] = (wrong[1, 26] + 1) % 512
    assert completion_match(model, [dict(batch, input_ids=wrong)])["correct"] == [True, False, True]


RETAIN_EXAMPLES = {  # the evicted tokens at low precision (MiKV): KIVI's per-token groups, vLLM's format, a rotation
    "affine2-g16": dict(bits=2, granularity="per_token(16)"),
    "int8_per_token_head": dict(codec="int8_per_token_head", bits=8, granularity="per_token_head"),
    "affine3-hadamard": dict(bits=3, granularity="per_token(32)", rotation="random_hadamard"),
}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("retain", RETAIN_EXAMPLES)
def test_retained_tokens_decode_as_the_training_view_sees_them(arch, retain):
    """MiKV: the tokens a decision evicts stay, encoded once by the retain codec; the training view
    (the codec's simulation) equals decoding with the cache, and keeping them at low precision is
    closer to the full cache than dropping them."""
    spec, length = evicting("h2o", retain=RETAIN_EXAMPLES[retain]), 45
    model = build(arch)
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(1))
    _, dropped_view = training_views(model, ids, spec.with_(eviction=replace(spec.eviction, retain=None)))
    detach(model)
    full_precision, trained_view = training_views(model, ids, spec)
    for splits in ([], [20], [5, 30]):
        decoded, cache = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, trained_view, **TOL, msg=f"prefill splits {splits}")
    held, codec = cache.layers[0].held, spec.eviction.retention()
    assert held.keys.shape[-2] == 25 and held.retained.keys.shape[-2] == 20  # 45 - 25 evicted, none dropped
    error, dropped = ((view - full_precision)[:, 8:].abs().mean() for view in (trained_view, dropped_view))
    assert 0 < error < 0.5 * dropped
    # the retained keys are the full cache's keys at the positions no survivor holds, each once, as the
    # codec decodes them (a token-wise codec: each token's code is its own)
    full = DynamicCache()
    with torch.no_grad():
        detach(model)
        model(ids, past_key_values=full)
    keys = full.layers[0].keys
    expected = codec.decode(codec.encode(keys))
    evicted = torch.ones(keys.shape[:3], dtype=torch.bool).scatter(-1, held.positions.long(), False)
    retained = held.retained.keys.tensor()
    for b, h in ((b, h) for b in range(keys.shape[0]) for h in range(keys.shape[1])):
        candidates = expected[b, h][evicted[b, h]]
        match = torch.cdist(retained[b, h], candidates)
        assert match.min(-1).values.max() == 0 and match.argmin(-1).unique().numel() == 20


def test_retained_bytes_are_the_codes_and_scales_held():
    model, ids = build("llama"), torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(2))
    sizes = {}
    for retain in (None, dict(bits=2, granularity="per_token(16)"), dict(bits=4, granularity="per_token(16)")):
        spec = evicting("h2o", budget=0.25, interval=16, sinks=0, recent=0, retain=retain)
        attach(model, spec)
        _, cache = decode(model, ids, spec, [64])
        sizes[None if retain is None else retain["bits"]] = cache.nbytes()
        assert cache.layers[0].held.keys.shape[-2] == 32
    # 96 evicted tokens x 2 KV heads x 2 layers x (K and V): head_dim 32 at b bits, one fp16 scale and zero
    # per 16 channels
    for bits in (2, 4):
        assert sizes[bits] - sizes[None] == 96 * 2 * 2 * 2 * (32 * bits // 8 + 2 * 2 * 2)


def test_retention_at_the_end_of_the_prompt_batches_and_beams():
    """SnapKV's schedule with the evicted prompt tokens at 2 bits: row-by-row parity with the cache,
    the cache's rows selected as beam search does, and a head_dim the retain groups do not divide
    refused at attach."""
    spec = evicting("snapkv", {"window": 4}, interval=0, budget=0.25, retain=dict(bits=2, granularity="per_token(16)"))
    model, prompt = build("llama"), 24
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(6))
    attach(model, spec)
    set_prompt_lengths(model, [prompt, prompt])
    with torch.no_grad():
        trained_view = model(ids, use_cache=False).logits
    decoded, cache = decode(model, ids, spec, [prompt])
    torch.testing.assert_close(decoded, trained_view, **TOL)
    held = cache.layers[1].held
    assert held.keys.shape[-2] == 6 + 8 and held.retained.keys.shape[-2] == 18  # ceil(0.25 * 24) kept, 18 at 2 bits
    flipped = held.retained.tensors()[0].flip(0)
    cache.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(cache.layers[1].held.retained.tensors()[0], flipped, rtol=0, atol=0)
    detach(model)
    with pytest.raises(ValueError, match=r"eviction.retain.granularity group=48 does not divide head_dim=32"):
        attach(model, evicting("h2o", retain=dict(bits=2, granularity="per_token(48)")))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
@pytest.mark.parametrize("selector,interval", [("h2o", 8), ("snapkv", 0)])
def test_merged_tokens_decode_as_the_training_view_sees_them(arch, selector, interval):
    """EMS / D2O: evicted tokens averaged into their most similar survivors, the same in one training
    forward as decoding (float64); merging changes the forward against dropping, and every survivor's
    mass adds up to the tokens seen."""
    options = {"window": 4} if selector == "snapkv" else {}
    spec, length, prompt = evicting(selector, options, interval=interval, merge=True), 45, 30
    model = build(arch)
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(1))
    dropped_view = None
    for merge in (False, True):
        attach(model, spec.with_(eviction=replace(spec.eviction, merge=merge)))
        if not interval:
            set_prompt_lengths(model, [prompt, prompt])
        with torch.no_grad():
            view = model(ids, use_cache=False).logits
        dropped_view = view if not merge else dropped_view
    assert (view - dropped_view)[:, 8:].abs().max() > 1e-3
    for splits in ([], [20], [5, 30]) if interval else ([prompt],):
        decoded, cache = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, view, **TOL, msg=f"prefill splits {splits}")
    held = cache.layers[0].held
    assert (held.mass.sum(-1) == length).all() and (held.mass[..., :2] == 1).all()  # the sinks take no merges
    detach(model)


def test_merge_averages_each_evicted_token_into_its_nearest_survivor_by_hand():
    """Survivors at positions 0 (a sink), 2 and 3; the evicted 1 and 4 point like 3 and 2; a
    survivor's mass weighs its average."""
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 1.0], [3.0, 3.0]])[None, None]
    values = torch.arange(5.0)[None, None, :, None].expand(1, 1, 5, 2)
    held = Survivors(keys, values, torch.arange(5, dtype=torch.int32)[None, None], None, 5,
                     mass=torch.tensor([[[1, 1, 2, 3, 1]]], dtype=torch.int32))
    merged = held.kept(torch.tensor([[[0, 2, 3]]]), reset=False, sinks=1)
    assert merged.mass.tolist() == [[[1, 3, 4]]]
    torch.testing.assert_close(merged.keys[0, 0], torch.tensor([[1.0, 0.0], [5 / 3, 5 / 3], [0.0, 5 / 4]]))
    torch.testing.assert_close(merged.values[0, 0, :, 0], torch.tensor([0.0, (2 * 2 + 4) / 3, (3 * 3 + 1) / 4]))
    # with only the sink left, the evicted are dropped
    only_sink = held.kept(torch.tensor([[[0]]]), reset=False, sinks=1)
    assert only_sink.mass.tolist() == [[[1]]] and torch.equal(only_sink.keys, keys[:, :, :1])


def test_merge_holds_one_int32_count_per_survivor():
    model, ids = build("llama"), torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(2))
    sizes = {}
    for merge in (False, True):
        spec = evicting("h2o", budget=0.25, interval=16, sinks=0, recent=0, merge=merge)
        attach(model, spec)
        _, cache = decode(model, ids, spec, [64])
        sizes[merge] = cache.nbytes()
    assert sizes[True] - sizes[False] == 32 * 2 * 2 * 4  # 32 survivors x 2 KV heads x 2 layers x int32


def test_merge_threshold_and_proportional_attention_by_hand():
    """merge_above drops an evicted token whose nearest survivor is not similar enough; a merged
    survivor standing for 3 tokens draws 3 times the attention of a single one with the same key."""
    from kvtrain.kv.eviction import _segment_attention

    keys = torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, 1.0], [0.0, 1.0]])[None, None]  # 1: cos 0.83 with 2
    held = Survivors(keys, keys.clone(), torch.arange(4, dtype=torch.int32)[None, None], None, 4,
                     mass=torch.ones(1, 1, 4, dtype=torch.int32))
    assert held.kept(torch.tensor([[[0, 2, 3]]]), False, sinks=1, merge_above=0.9).mass.tolist() == [[[1, 1, 1]]]
    assert held.kept(torch.tensor([[[0, 2, 3]]]), False, sinks=1, merge_above=0.8).mass.tolist() == [[[1, 2, 1]]]
    same = Survivors(torch.ones(1, 1, 2, 2), torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]]),
                     torch.tensor([[[0, 1]]], dtype=torch.int32), None, 2, mass=torch.tensor([[[1, 3]]], dtype=torch.int32))
    out, probs = _segment_attention(torch.ones(1, 1, 1, 2), same, scaling=1.0, softcap=None)
    torch.testing.assert_close(probs.flatten(), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.75, 0.75]))


@pytest.mark.parametrize("evicted", [{}, {"retain": dict(bits=2, granularity="per_token(16)")}, {"merge": True}],
                         ids=["dropped", "retained", "merged"])
@pytest.mark.parametrize("selector,options,interval", [("h2o", {}, 8), ("snapkv", {"window": 4}, 0), ("tova", {}, 4)])
def test_a_left_padded_batch_evicts_as_its_cache_decodes_it(selector, options, interval, evicted):
    """Left padding (generate's and the rollouts'): the pads are seen by no query but their own and
    are evicted first (retained unseen, merged with no weight), the sinks are each row's first real
    tokens; the training forward with the padded layout equals decoding it with the evicting cache,
    prompt in one forward, then token by token."""
    spec = evicting(selector, options, interval=interval, budget=0.5, sinks=2, recent=1, **evicted)
    prompt = 20
    model = build("qwen2")
    ids = torch.randint(0, 512, (3, 36), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :5], mask[2, :2] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    attach(model, spec)
    set_prompt_lengths(model, [prompt] * 3)
    with torch.no_grad():
        view = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    cache, steps = QuantizedKVCache(spec), [(0, prompt), *((t, t + 1) for t in range(prompt, 36))]
    with torch.no_grad():
        decoded = torch.cat([model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=positions[:, a:b],
                                   past_key_values=cache, use_cache=True).logits for a, b in steps], 1)
    torch.testing.assert_close(decoded, view, **TOL)
    held = cache.layers[0].held
    assert held.pads.tolist() == [5, 0, 2]
    assert (held.positions[0] >= 5).all() and (held.positions[2] >= 2).all()  # no pad survives
    assert (held.positions[0, :, :2] == torch.tensor([5, 6], dtype=torch.int32)).all()  # the row's own sinks
    if "retain" in evicted:  # the 5 and 2 pads among row 0's and row 2's retained, unseen
        assert (~held.retained.real).sum(-1)[:, 0].tolist() == [5, 0, 2]
    if interval:  # row 1 has no pads: its own layout, with the same decisions
        with torch.no_grad():
            torch.testing.assert_close(view[1:2], model(ids[1:2], use_cache=False).logits, **TOL)


@pytest.mark.parametrize("evicted", [{}, {"retain": dict(bits=2, granularity="per_token(16)")}, {"merge": True}],
                         ids=["dropped", "retained", "merged"])
def test_a_padded_row_computes_what_the_row_alone_computes_under_a_token_budget(evicted):
    """SnapKV keeping 8 tokens at the prompt's end: a row behind 5 pads keeps, retains and merges what
    it does alone (pads rank last, are retained unseen and merge with no weight)."""
    spec = evicting("snapkv", {"window": 4}, interval=0, budget=8, sinks=2, recent=1, **evicted)
    model = build("qwen2")
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    attach(model, spec)
    set_prompt_lengths(model, [20, 20])
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
        set_prompt_lengths(model, [15])
        alone = model(ids[:1, 5:], use_cache=False)
    torch.testing.assert_close(padded.logits[0, 5:], alone.logits[0], **TOL)


QUANTIZED = dict(key=dict(bits=4, granularity="per_token(16)"), value=dict(bits=2, granularity="per_token(16)"), residual=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("retain", [None, dict(bits=2, granularity="per_token(16)")], ids=["dropped", "retained"])
def test_quantized_survivors_decode_as_the_training_view_sees_them(arch, retain):
    """Eviction over K at 4 bits and V at 2 (each token encoded once, on arrival): the cache holds the
    survivors encoded and gathers them encoded; one training forward equals decoding (float64); with
    retain (MiKV: important tokens at 4/2 bits, the rest at 2) as well."""
    from kvtrain.kv.eviction import Encoded

    fields = dict(selector="h2o", budget=0.5, interval=8, sinks=2, recent=2, retain=retain)
    spec, length = KVSpec(**QUANTIZED, eviction=fields), 45
    model = build(arch)
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(1))
    _, plain_view = training_views(model, ids, evicting("h2o", retain=retain))
    detach(model)
    full_precision, view = training_views(model, ids, spec)
    assert (view - plain_view)[:, 8:].abs().max() > 1e-3  # the quantization is seen
    for splits in ([], [20], [5, 30]):
        decoded, cache = decode(model, ids, spec, splits)
        torch.testing.assert_close(decoded, view, **TOL, msg=f"prefill splits {splits}")
    held = cache.layers[0].held
    assert isinstance(held.keys, Encoded) and held.keys.shape[-2] == 25
    full = DynamicCache()
    with torch.no_grad():
        detach(model)
        model(ids, past_key_values=full)
    codec, keys = spec.keys(0), full.layers[0].keys  # the survivors' keys, each encoded once as it arrived
    at = held.positions.long()
    expected = codec.decode(codec.encode(keys)).gather(2, at[..., None].expand(*at.shape, keys.shape[-1]))
    torch.testing.assert_close(held.keys.tensor(), expected, rtol=0, atol=0)


def test_quantized_survivors_hold_their_codes_and_scales():
    model, ids = build("llama"), torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(2))
    sizes = {}
    for quantized in (False, True):
        policy = dict(selector="h2o", budget=0.25, interval=16, sinks=0, recent=0)
        spec = KVSpec(**QUANTIZED, eviction=policy) if quantized else evicting(**policy)
        attach(model, spec)
        _, cache = decode(model, ids, spec, [64])
        sizes[quantized] = cache.nbytes()
    # 32 survivors x 2 KV heads x 2 layers: float64 K and V of 32 dims held instead as K at 4 bits (16 bytes of
    # codes) and V at 2 (8 bytes), each with an fp16 scale and zero per 16 channels (8 bytes)
    assert sizes[False] - sizes[True] == 32 * 2 * 2 * (2 * 32 * 8 - (16 + 8) - (8 + 8))
