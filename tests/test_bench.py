"""Every benchmark runs end to end at smoke size and writes what its report says it measured.
(`bench/rl_length.py` and `bench/scale.py` have theirs in test_rl_recipes.py and test_deepspeed.py.)"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO


def run_bench(script, tmp_path, *args, timeout=900):
    done = subprocess.run([sys.executable, f"bench/{script}", "--smoke", f"--out={tmp_path}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(home):
    """A (tiny, 3-step) kvtrain-ref in the test home: the benchmarks compare caches on it."""
    from conftest import run_kvtrain
    from kvtrain.models import embedded_model_path

    if not embedded_model_path().is_dir():
        args = ["fit", "--config", str(REPO / "recipes" / "pretrain_reference.yaml"), "--trainer.max_steps=3",
                "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1", "--trainer.logger=false",
                "--trainer.enable_progress_bar=false"]
        result = run_kvtrain(args, cwd=home)
        assert result.returncode == 0, result.stderr[-3000:]
    return embedded_model_path()


@pytest.mark.slow
def test_kv_quality_smoke(tmp_path, reference):
    run_bench("kv_quality.py", tmp_path)
    result = json.loads((tmp_path / "kv_quality_smoke.json").read_text())
    assert result["env"]["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert all(d < 1e-3 for d in result["parity_max_abs_diff"].values())
    names = [r["name"] for r in result["perplexity"]]
    # every documented axis combination of the peer at both bit widths, scored on the same decoded tokens
    assert names == ["fp", "kivi2", "kivi4", *[f"hqq{b}-k{k}v{v}" for b in (2, 4) for k in (0, 1) for v in (0, 1)]]
    assert len({r["tokens"] for r in result["perplexity"]}) == 1 == len({r["windows"] for r in result["perplexity"]})
    assert result["shape"] == {"layers": 4, "kv_heads": 2, "head_dim": 32}  # kvtrain-ref's, for the bytes caption
    best = result["best_peer_axes"]
    for bits in ("2", "4"):
        winner = min((r for r in result["perplexity"] if r["name"].startswith(f"hqq{bits}-")), key=lambda r: r["ppl"])
        assert winner["name"] == f"hqq{bits}-k{best[bits][0]}v{best[bits][1]}"
    rows = {(r["name"], r["state"]): r for r in result["bytes"]}
    # bf16: 4 layers x 2 KV heads x 32 dims x (K, V) x 2 bytes = 1024 bytes/token for DynamicCache. Ours kivi2
    # after a 512-token prefill: 384 tokens quantized (2-bit codes + fp16 scale/zero per 32 = 0.375 byte/element)
    # and the 128-token window in bf16: (384 x 0.375 + 128 x 2) x 512 / 512 = 400 bytes/token.
    assert rows["fp", "decoding"]["B/tok 512"] == 1024
    assert rows["kivi2", "prefill"]["B/tok 512"] == 400
    assert 400 < rows["kivi2", "decoding"]["B/tok 512"] < 460  # over the last 128 steps: more tokens in bf16


@pytest.mark.slow
def test_kv_quality_smoke_with_a_serving_format(tmp_path, reference):
    run_bench("kv_quality.py", tmp_path, "--ours", "int4_per_token_head", "--peer_bits", "4", "--peer_axes", "11")
    result = json.loads((tmp_path / "kv_quality_smoke.json").read_text())
    assert list(result["parity_max_abs_diff"]) == ["int4_per_token_head"]
    assert [r["name"] for r in result["perplexity"]] == ["fp", "int4_per_token_head", "hqq4-k1v1"]
    rows = {(r["name"], r["state"]): r for r in result["bytes"]}
    # every token stored: 4 layers x 2 KV heads x (K, V) x (16 bytes of 4-bit codes + a float32 scale) = 320
    assert rows["int4_per_token_head", "prefill"]["B/tok 512"] == rows["int4_per_token_head", "decoding"]["B/tok 256"] == 320


def test_kv_quality_peer_axes_option():
    sys.path.insert(0, str(REPO / "bench"))
    import kv_quality

    assert kv_quality.parse_args(["--smoke"]).peer_axes == ["00", "01", "10", "11"]  # all four by default
    assert kv_quality.parse_args(["--smoke", "--peer_axes", "11"]).peer_axes == ["11"]
    with pytest.raises(SystemExit):
        kv_quality.parse_args(["--peer_axes", "12"])  # not an axis pair transformers documents


def test_results_name_the_build_of_their_model_and_reports_refuse_to_mix_builds(tmp_path):
    """A model's build is the hash of its weight files (kvtrain-ref pretrained again is another build);
    a report that would add rows to ones measured on another build refuses, naming both."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_utils
    import kv_lowrank
    import readme_tables
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, tmp_path / "model.safetensors")
    build = bench_utils.model_build(str(tmp_path))
    assert build == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert bench_utils.model_build(str(tmp_path)) == build
    env = bench_utils.environment({"model": str(tmp_path)})
    assert env["models"] == {"model": build}
    save_file({"w": torch.tensor([1.0, 1.0, 2.0])}, tmp_path / "model.safetensors")
    assert bench_utils.model_build(str(tmp_path)) != build
    assert bench_utils.model_build(str(tmp_path / "nothing")) is None and "models" not in bench_utils.environment()
    readme_tables.check_same_builds(env, {"models": {"model": build}}, "same.json")
    readme_tables.check_same_builds(env, {"python": "3.11.7"}, "older.json")  # (results from before builds were recorded)
    report = tmp_path / "kv_lowrank.json"
    report.write_text(json.dumps({"env": {"models": {"model": "0123456789abcdef"}}, "trained": [{"point": "raw50"}]}))
    with pytest.raises(ValueError, match=rf"kv_lowrank.json holds results for another build of model \(weights "
                                         rf"0123456789abcdef, this run's {build}\)"):
        kv_lowrank.earlier_report(report, env)
    earlier = kv_lowrank.earlier_report(report, {"models": {"model": "0123456789abcdef"}})
    assert kv_lowrank.kept_rows(earlier, ["raw25"], "trained") == [{"point": "raw50"}]


def test_a_joint_point_holds_its_twins_numbers_in_one_latent():
    """joint25: raw25's key and value ranks (8 + 16) as one latent of K and V, otherwise raw25's spec;
    the README names it as a joint latent, not as ThinK's fractions."""
    sys.path.insert(0, str(REPO / "bench"))
    import kv_lowrank
    import readme_tables

    raw, joint = kv_lowrank.point_spec("raw25", scale=3), kv_lowrank.point_spec("joint25", scale=3)
    assert joint.joint_kv and joint.value is None and joint.key.rank == 3 * (8 + 16)
    assert joint.with_(joint_kv=False, key=raw.key, value=raw.value) == raw
    assert [readme_tables._point_kind(p) for p in ([8, 16, 16], [0.4, 0.0], {"joint rank": 24, "bits": 16})] == [
        "ranks", "pruned", "joint"]


def test_decode_ratios_are_the_median_of_ratios_within_a_round():
    """Rounds 1-3 with a slow minute in round 2 (every cache 3x slower): within-round ratios 2, 2, 2.5
    give 2, where the ratio of the medians (4 s vs 1.5 s, 2.67) would count the slow round against ours."""
    sys.path.insert(0, str(REPO / "bench"))
    import kv_speed

    runs = {"fp": [{"decode_s": s} for s in (1.0, 3.0, 1.0)], "kivi2": [{"decode_s": s} for s in (2.0, 6.0, 2.5)],
            "hqq2": [{"decode_s": s} for s in (4.0, 12.0, 5.0)]}
    assert kv_speed.decode_ratios(runs) == {"kivi2/fp": 0.5, "kivi2/hqq2": 2.0}


def test_qat_measures_without_the_control_arm_give_the_gap_left_only():
    sys.path.insert(0, str(REPO / "bench"))
    import qat_recovery

    rows = [{"model": "qat-seed1", "kv": kv, "split": "val", "ppl": ppl} for kv, ppl in (("full precision", 80.0), ("kivi2", 84.0))]
    assert qat_recovery.measures(rows, "val", 1) == {"gap_left": pytest.approx(0.05)}
    rows += [{"model": "control-seed1", "kv": kv, "split": "val", "ppl": ppl}
             for kv, ppl in (("full precision", 82.0), ("kivi2", 92.0))]
    assert qat_recovery.measures(rows, "val", 1) == {"recovered": pytest.approx(0.8), "gap_left": pytest.approx(0.05)}


def test_qat_recovery_takes_the_recipe_spec_or_another_with_its_state():
    """The recipe's spec and codec state; --spec's (a calibrated folder brings its state); --codec_state over either."""
    sys.path.insert(0, str(REPO / "bench"))
    import qat_recovery
    from kvtrain.kv import KVQuantSpec, load_spec

    nuq2, other = REPO / "recipes" / "qat_nuq2.yaml", Path("elsewhere/kv_codec_state.safetensors")
    spec, state = qat_recovery.run_spec(nuq2, None, None)
    assert spec.keys(0).make_state(64) is not None and state == Path("runs/qat_nuq2/calibrated/kv_codec_state.safetensors")
    assert qat_recovery.run_spec(nuq2, "kivi2", None) == (KVQuantSpec.preset("kivi2"), None)
    folder = REPO / "bench" / "results" / "smollm2" / "kv_combos" / "specs" / "rotnuq2_prerope_sinks"
    assert qat_recovery.run_spec(nuq2, str(folder), None) == (load_spec(folder / "kv_spec.json"), folder / "kv_codec_state.safetensors")
    assert qat_recovery.run_spec(nuq2, str(folder), other)[1] == other and qat_recovery.run_spec(nuq2, None, other)[1] == other
    assert qat_recovery.spec_name(spec, None) == "recipe spec" and qat_recovery.spec_name(spec, str(folder)) == "rotnuq2_prerope_sinks"
    named = [qat_recovery.spec_name(spec, f) for f in ("lowrank/raw50/calibrated", "raw50/spec/kv_spec.json", "calibrated")]
    assert named == ["raw50", "raw50", "calibrated"]


@pytest.mark.slow
def test_kv_speed_smoke(tmp_path, reference):
    run_bench("kv_speed.py", tmp_path)
    result = json.loads((tmp_path / "kv_speed_smoke.json").read_text())
    assert [r["variant"] for r in result["training"]["rows"]] == ["plain", "kivi2", "plain+distill", "kivi2+distill"]
    assert set(result["training"]["ratios"]) == {"kivi2/plain", "plain+distill/plain", "kivi2+distill/plain",
                                                 "kivi2+distill/plain+distill"}
    rows = result["decoding"]["by_batch"][0]["rows"]
    assert [r["cache"] for r in rows] == ["fp", "kivi2", "kivi4", "hqq2", "hqq4"]
    assert "axis_key=" in rows[3]["label"]  # the peer runs at named axes
    assert rows[0]["KV bytes/token"] == 2048 and all(r["KV bytes/token"] < 2048 for r in rows[1:])
    assert result["env"]["python"]


@pytest.mark.slow
def test_kv_lowrank_smoke(tmp_path, reference):
    """Every kind of row for two points: quantization alone, the SVD start, the calibration, a (2-step)
    trained seed with its own full-precision-KV row, the references read from their results; bytes
    from real caches."""
    run_bench("kv_lowrank.py", tmp_path, "--threads=1")
    result = json.loads((tmp_path / "kv_lowrank_smoke.json").read_text())
    kinds = [(r["point"], r["kind"]) for r in result["table"]]
    assert kinds[:7] == [("full precision", "-"), ("kivi2", "post-training"), ("kivi4", "post-training"), ("raw25", "svd"),
                         ("raw25", "calibrated"), ("int2_25", "svd"), ("int2_25", "calibrated")]
    assert kinds[7:10] == [("raw25f", "calibrated"), ("think50kv", "weights"), ("think50kv", "calibrated")]
    key_ranks, value_ranks, _ = result["points"]["raw25f"]  # raw25's ranks (8, 16) re-spent over the 4 layers
    assert sum(key_ranks) + sum(value_ranks) == 4 * (8 + 16) and nbytes_equal(result, "raw25f", "raw25")
    assert ("raw25", "trained, its cache") in kinds and ("int2_25", "trained, full-precision KV") in kinds
    assert ("think50kv", "trained, its cache") in kinds and ("raw25f", "trained, its cache") in kinds
    assert ("kivi2 QAT", "reference, its cache") in kinds
    nbytes = result["bytes"]
    # ThinK at half of K's and V's channels: 16 of 32 per head in float16, plus the 32-token window in full
    # (512 / 1024 * 32 = 16 B/token more) and at most 32 tokens encoded ahead of it (held twice: 16 more)
    assert 0.5 * 1024 + 16 < nbytes["think50kv"] < 0.5 * 1024 + 2 * 16
    # bf16, decoding at 1024: a DynamicCache holds 4 layers x 2 x 64 x 2 bytes per token; raw25's latents
    # are 24 float16 numbers per layer and token, plus a 32-token window, pre-RoPE positions and the
    # latents encoded ahead of the window; 2-bit latents hold fewer again
    assert nbytes["full precision"] == 1024 and 4 * 24 * 2 < nbytes["raw25"] < 0.3 * 1024
    assert nbytes["int2_25"] < nbytes["raw25"] and nbytes["kivi2 QAT"] == nbytes["kivi2"] == pytest.approx(311.3, abs=0.5)
    svd, calibrated = (next(r["ppl"] for r in result["post_training"] if (r["point"], r["init"]) == ("raw25", init))
                       for init in ("svd", "calibrated"))
    assert svd != calibrated  # the calibration moved the factors
    assert (tmp_path / "kv_lowrank_smoke.png").stat().st_size > 10_000
    # a run for one point keeps the other points' rows of the report it finds
    run_bench("kv_lowrank.py", tmp_path, "--threads=1", "--points", "think50kv")
    again = json.loads((tmp_path / "kv_lowrank_smoke.json").read_text())
    assert [(r["point"], r["kind"]) for r in again["table"]] == kinds
    assert again["post_training"][3:8] == result["post_training"][3:8]  # raw25's, int2_25's and raw25f's, carried over


def nbytes_equal(result: dict, a: str, b: str) -> bool:
    """Two points' cache bytes agree to the byte-per-token (a Fisher budget keeps the total rank)."""
    return abs(result["bytes"][a] - result["bytes"][b]) < 1


@pytest.mark.slow
def test_qat_recovery_smoke(tmp_path, reference):
    """The recipe (qat_kivi2.yaml) with another spec in its place (--spec kivi4): QAT trains and exports
    under it, and every model is evaluated under it."""
    run_bench("qat_recovery.py", tmp_path, "--threads=1", "--spec=kivi4")
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["seeds"] == [1, 2] and result["env"]["python"] and result["spec_name"] == "kivi4"
    from kvtrain.kv import KVQuantSpec, load_spec

    assert load_spec(tmp_path / "qat-seed1" / "model" / "kv_spec.json") == KVQuantSpec.preset("kivi4")
    assert not (tmp_path / "control-seed1" / "model" / "kv_spec.json").exists()
    models = {r["model"] for r in result["rows"]}
    assert models == {"start", "qat-seed1", "control-seed1", "qat-seed2", "control-seed2"}
    ppl = {(r["model"], r["kv"], r["split"]): r["ppl"] for r in result["rows"]}
    for split in ("val", "test"):
        for seed in ("1", "2"):
            m = result["measures"][split][seed]
            control_q, control_fp = ppl[f"control-seed{seed}", "kivi4", split], ppl[f"control-seed{seed}", "full precision", split]
            qat_q, qat_fp = ppl[f"qat-seed{seed}", "kivi4", split], ppl[f"qat-seed{seed}", "full precision", split]
            assert m["recovered"] == pytest.approx((control_q - qat_q) / (control_q - control_fp))
            assert m["gap_left"] == pytest.approx(qat_q / qat_fp - 1)
    table = (tmp_path / "table.md").read_text()
    assert "mean ± sd over 2 seeds" in table and "gap left" in table


@pytest.mark.slow
def test_kv_eviction_smoke(tmp_path, reference):
    """The base fine-tune, every selector at every kept fraction with bytes measured from real caches
    (falling with the budget), trained points (one learned) and their control measured every way, and the plot."""
    run_bench("kv_eviction.py", tmp_path, "--threads=1")
    result = json.loads((tmp_path / "kv_eviction_smoke.json").read_text())
    rows = result["training_free"]
    assert [(r["selector"], r["interval"], r["kept"]) for r in rows[:3]] == [
        ("full cache", "-", 1.0), ("streaming_llm", 0, 0.5), ("streaming_llm", 0, 0.25)]
    assert len(rows) == 37 and all(0 <= r["accuracy"] <= 1 for r in rows)
    for selector in ("streaming_llm", "snapkv", "h2o", "tova", "snapkv + merge", "h2o + merge"):
        for interval in (0, 16):
            ratios = [r["bytes_ratio"] for r in rows if (r["selector"], r["interval"]) == (selector, interval)]
            assert 1 > ratios[0] > ratios[1] > ratios[2] > 0.1
    equal = [r for r in result["equal_bytes"] if r["vs_dropping"] != "-"]  # MiKV at the bytes of dropping
    assert len(equal) == 8 and [r["method"] for r in result["equal_bytes"][8:]] == ["kivi2", "kivi3"]
    for r in equal:
        dropped = next(d for d in rows if (d["selector"], d["interval"], d["kept"]) == (
            r["method"].split()[0], 0, r["vs_dropping"]))
        assert r["bytes"] <= dropped["bytes"] and r["kept"] < r["vs_dropping"]
    for r in equal:  # the largest that fits: kept + (1 - kept) * 12 / 64 (a retained token's bytes) = the fraction
        assert r["kept"] == pytest.approx((r["vs_dropping"] - 12 / 64) / (1 - 12 / 64), abs=0.02)
    ppl = result["perplexity"]  # the pretrained model over long windows, every 16 tokens decided
    assert [r["selector"] for r in ppl[:2]] == ["full cache", "streaming_llm"] and len(ppl) == 1 + 6 * 3 + 2
    assert all(1 < r["ppl"] < 1e4 for r in ppl) and ppl[3]["ppl"] != ppl[0]["ppl"]  # 12.5% kept changes it
    assert [r["merge_above"] for r in result["merge_sweep"]] == [-1.0, 0.5, 0.8, 0.9, 0.95]
    quantized = {r["method"]: r["bytes"] for r in result["composed"]}  # fewer tokens and fewer bits
    snapkv = {r["kept"]: r["bytes"] for r in rows if (r["selector"], r["interval"]) == ("snapkv", 0)}
    assert quantized["snapkv 50% at 2 bits"] < quantized["snapkv 50% at 4 bits"] < snapkv[0.5]
    assert quantized["snapkv 25% at 4 bits"] < quantized["snapkv 50% at 4 bits"]
    controls = {("control", under): 1 for under in ("snapkv25", "snapkv25@16", "h2o25", "tova25", "streaming_llm25")}
    assert {(r["point"], r["under"]): r["seeds"] for r in result["trained"]} == {
        ("snapkv25", "snapkv25"): 1, ("dms25+st", "dms25"): 1, **controls}  # (learned logits: trained points only)
    assert (tmp_path / "trained" / "control-0.json").is_file()
    assert (tmp_path / "kv_eviction_smoke.png").stat().st_size > 10_000


def test_the_trained_frontier_reads_each_cache_from_its_runs_and_its_measured_bytes(tmp_path):
    """bench/trained_frontier.py: per cache the start's and the trained runs' perplexity (the runs' own
    numbers, mean and sd), the bytes its benchmark measured; runs on other windows are refused."""
    sys.path.insert(0, str(REPO / "bench"))
    import statistics

    import trained_frontier

    results = tmp_path / "results"
    for part in ("smollm2/qat_recovery", "smollm2/qat_rotnuq2", "smollm2/kv_combos", "lowrank/smollm2"):
        src = REPO / "bench" / "results" / part
        dest = results / part
        dest.mkdir(parents=True)
        for f in src.glob("*.json"):
            (dest / f.name).write_text(f.read_text())
    rows = trained_frontier.frontier(results)  # no sub2bit, raw50 or raw25 runs in this copy: skipped
    assert [(r["cache"], r["kind"]) for r in rows] == [("full precision", "start"), ("full precision", "plain fine-tune"),
                                                       ("kivi2", "post-training"), ("kivi2", "trained"),
                                                       ("rotnuq2", "post-training"), ("rotnuq2", "trained")]
    report = json.loads((results / "smollm2/qat_rotnuq2/results.json").read_text())
    runs = [r["ppl"] for r in report["rows"] if r["model"].startswith("qat-seed") and r["kv"] != "full precision" and r["split"] == "val"]
    ours = rows[-1]
    assert len(runs) == 3 and ours["val ppl"] == statistics.mean(runs) and ours["val sd"] == statistics.stdev(runs)
    assert ours["B/token"] == 7202 and ours["x fp"] == round(7201.802227166312 / 23040, 4) and rows[2]["B/token"] == 7004
    committed = json.loads((REPO / "bench" / "results" / "smollm2" / "trained_frontier.json").read_text())["rows"]
    assert committed == trained_frontier.frontier()  # the README's block is what the runs say today
    trained_frontier.plot(rows, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    (results / "smollm2/qat_rotnuq2/results.json").write_text(json.dumps({**report, "max_batches": 4}))
    with pytest.raises(ValueError, match="max_batches=4"):
        trained_frontier.frontier(results)
