"""Calibration (`kvtrain calibrate`, issue 12 item 4): sensitivity-weighted k-means codebooks fitted
to a model's K/V, written beside kv_spec.json, and found there by attach, the callback and eval."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_kv_parity import build

from kvtrain.cli import main
from kvtrain.kv import KVSpec, TensorPolicy, attach, attached_spec, detach
from kvtrain.kv.calibrate import calibrate, codebooks
from kvtrain.models import load_model
from kvtrain.quant.codebook import codebook_quantize, codebook_samples, fit_codebook, normal_float_levels, weighted_error

NF = dict(codec="nf", bits=2, learnable=True)
SPEC = KVSpec(key=dict(NF, granularity="per_channel(16)"), value=dict(NF, granularity="per_token(16)"), residual=16)


def test_fit_codebook_is_weighted_k_means_by_hand():
    """Lloyd's iterations from [-1, 0, 0.5, 1] (midpoints -0.5, 0.25, 0.75): -1, -0.9 -> level 0;
    0.1, 0.2 (weight 3) -> level 1, the weighted mean (0.1 + 0.6) / 4 = 0.175; nothing chooses 0.5,
    which stays; 0.9, 1 -> 0.95. The new midpoints keep the assignment: converged."""
    values = torch.tensor([-1.0, -0.9, 0.1, 0.2, 0.9, 1.0])
    weights = torch.tensor([1.0, 1, 1, 3, 1, 1])
    levels = fit_codebook(values, weights, torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    assert torch.allclose(levels, torch.tensor([-0.95, 0.175, 0.5, 0.95]), atol=1e-7)
    # (4 x 0.05^2 + 0.075^2 + 3 x 0.025^2) / 8
    assert weighted_error(values, weights, levels) == pytest.approx(0.0175 / 8, rel=1e-6)  # (float32 levels)
    assert weighted_error(values, weights, torch.tensor([-1.0, 0.0, 0.5, 1.0])) == pytest.approx(
        (0.01 + 0.01 + 3 * 0.04 + 0.01) / 8, rel=1e-6)  # before: -0.9, 0.1, 0.2 (x3), 0.9 off by 0.1, 0.1, 0.2, 0.1
    # zero weights: those values do not pull their level
    assert fit_codebook(values, torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.tensor([-1.0, 0.0, 0.5, 1.0])).tolist() == \
        pytest.approx([-1.0, 0.1, 0.5, 1.0])


def test_fit_codebook_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match=r"as many weights as values \(got \(3,\) values and \(2,\) weights\)"):
        fit_codebook(torch.zeros(3), torch.ones(2), normal_float_levels(2))
    with pytest.raises(ValueError, match="non-negative weights"):
        fit_codebook(torch.zeros(2), torch.tensor([1.0, -1.0]), normal_float_levels(2))
    with pytest.raises(ValueError, match="finite values"):
        fit_codebook(torch.tensor([0.0, float("nan")]), torch.ones(2), normal_float_levels(2))


def test_an_observing_codebook_passes_values_through_and_records_them_with_their_squared_gradients():
    """One group of 4 channels per token: [0, 1, 2, 4] has offset 2 and half-range 2, so it is
    normalized to [-1, -0.5, 0, 1]; a loss sum(c * y) gives each value the gradient c."""
    codec = TensorPolicy(codec="nf", bits=2, granularity="per_token(4)", learnable=True).codec_at(0)
    state = codec.make_state(4)
    bound = codec.bound(state)
    x = torch.tensor([[[[0.0, 1.0, 2.0, 4.0], [1.0, 1.0, 3.0, 3.0]]]], requires_grad=True)
    state.observed = []
    y = bound.simulate(x)
    assert torch.equal(y, x)  # full precision: calibration sees the model as it is
    c = torch.tensor([[[[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]]]])
    (y * c).sum().backward()
    values, weights = state.observed[0]
    assert values.tolist() == [-1.0, -0.5, 0.0, 1.0, -1.0, -1.0, 1.0, 1.0]
    assert weights.tolist() == [1.0, 4.0, 9.0, 16.0, 0.25, 0.0, 1.0, 4.0]
    assert x.grad is None  # observed values are leaves: backward stops there
    state.observed = None
    assert not torch.equal(bound.simulate(x), x)  # observing off: the codebook quantizes again
    # the samples are the values the codes are chosen from
    levels = normal_float_levels(2, torch.float32)
    codes = codebook_quantize(x.detach(), levels, 4).codes.flatten()
    nearest = (values[:, None] - levels).abs().argmin(-1)
    assert torch.equal(codes.long(), nearest)
    assert torch.equal(codebook_samples(x.detach(), c, 4)[1], weights)


def test_calibrate_fits_every_codebook_and_leaves_the_weights_alone():
    model = build("llama")  # float64, 2 layers, 2 KV heads of 32
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    rows = calibrate(model, SPEC, ids.split(2), progress=False)
    assert [(r["layer"], r["tensor"]) for r in rows] == [(0, "key"), (0, "value"), (1, "key"), (1, "value")]
    for r in rows:  # 4 windows x 2 heads x the 48 tokens older than the window x 32 channels
        assert r["values"] == 4 * 2 * 48 * 32
        assert r["error_after"] < r["error_before"]
    nf = normal_float_levels(2, torch.float64)
    books = codebooks(model)
    for (layer, tensor), book in books.items():
        row = next(r for r in rows if (r["layer"], r["tensor"]) == (layer, tensor))
        assert book.levels.tolist() == pytest.approx(row["levels"], abs=1e-6) and not torch.allclose(book.levels.double(), nf)
        assert book.observed is None
    assert attached_spec(model) == SPEC
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="has no codec state to calibrate"):
        calibrate(model, "kivi2", ids.split(2), progress=False)
    with pytest.raises(ValueError, match="saw no compressed keys in layer 0"):
        calibrate(model, SPEC.with_(residual=64), ids.split(2), progress=False)
    with pytest.raises(ValueError, match="got no batches"):
        calibrate(model, SPEC, [], progress=False)


def test_calibrate_command_writes_the_state_that_attach_the_callback_and_eval_start_from(
        tmp_path, corpus_file, tiny_model_dir):
    from kvtrain.callbacks import KVQuantCallback

    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    SPEC.save(spec_dir)
    out = tmp_path / "calibrated"
    main(["calibrate", str(spec_dir), str(out), f"--model={tiny_model_dir}", f"--data={corpus_file}",
          "--seq_len=64", "--windows=4", "--batch_size=2"])
    report = json.loads((out / "calibration.json").read_text())
    assert report["windows"] == 4 and report["split"] == "train" and len(report["rows"]) == 4
    assert json.loads((out / "kv_spec.json").read_text()) == SPEC.to_dict()
    state = load_file(str(out / "kv_codec_state.safetensors"))
    assert sorted(state) == ["0.key.levels", "0.value.levels", "1.key.levels", "1.value.levels"]
    for row in report["rows"]:
        assert state[f"{row['layer']}.{row['tensor']}.levels"].tolist() == pytest.approx(row["levels"], abs=1e-6)

    model = load_model(str(tiny_model_dir))
    attach(model, str(out))  # the folder: its state is loaded
    assert all(torch.equal(b.levels.detach(), state[f"{layer}.{t}.levels"]) for (layer, t), b in codebooks(model).items())
    with torch.no_grad():
        codebooks(model)[0, "key"].levels.add_(0.01)  # "trained" on
    detach(model)
    attach(model, SPEC)  # the spec alone: the state this model learned for it is kept
    assert torch.allclose(codebooks(model)[0, "key"].levels.detach(), state["0.key.levels"] + 0.01)
    attach(model, str(out))  # the folder: its state is loaded again
    assert torch.equal(codebooks(model)[0, "key"].levels.detach(), state["0.key.levels"])
    detach(model)

    callback = KVQuantCallback(spec=str(out))
    module = torch.nn.Module()
    module.model = load_model(str(tiny_model_dir))
    callback.setup(None, module, "fit")
    assert all(torch.equal(b.levels.detach(), state[f"{layer}.{t}.levels"])
               for (layer, t), b in codebooks(module.model).items())
    with torch.no_grad():
        codebooks(module.model)[1, "value"].levels.mul_(0.5)  # trained by the fit
    callback.teardown(None, module, "fit")
    callback.setup(None, module, "validate")  # a later stage validates what the fit trained
    assert torch.equal(codebooks(module.model)[1, "value"].levels.detach(), state["1.value.levels"] * 0.5)
    callback.teardown(None, module, "validate")

    rows = {kv: main_eval(tmp_path, tiny_model_dir, corpus_file, kv) for kv in (str(out), str(spec_dir))}
    assert rows[str(out)] != rows[str(spec_dir)]  # fitted levels, not NormalFloat's
    with pytest.raises(FileExistsError, match="kvtrain did not write"):
        main(["calibrate", str(spec_dir), str(spec_dir), f"--model={tiny_model_dir}"])


def main_eval(tmp_path, model, corpus_file, kv) -> float:
    out = tmp_path / "eval.json"
    main(["eval", f"--model={model}", f"--data={corpus_file}", "--seq_len=64", "--max_batches=1", f"--kv={kv}",
          "--baseline=false", f"--output={out}"])
    return json.loads(out.read_text())["rows"][1]["ppl"]
