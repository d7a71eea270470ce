"""Smoke tests of the CPU benchmark scripts the README tells users to run, at tiny sizes.

They check that each command runs to the end and writes what it promises, not how fast
anything is (speed is reported by the benchmarks themselves, never asserted).
``forward_backward.py`` is left out: its start-up part compiles every kernel in a fresh
process with an empty cache, about ten seconds.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script, *args):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_microbench_times_every_op_and_writes_json(tmp_path):
    out = tmp_path / "micro.json"
    text = run("microbench.py", "-B", "4", "-T", "3", "-I", "5", "-H", "8", "--repeat", "2",
               "--backends", "reference", "cpu", "--json", str(out))
    rows = json.loads(out.read_text())["results"]
    assert {(r["backend"], r["op"]) for r in rows} >= {
        (b, op) for b in ("reference", "cpu")
        for op in ("forward-train", "forward-infer", "backward", "head+loss", "adam")}
    assert all(r["median_s"] > 0 for r in rows)
    assert "GFLOP/s" in text


def test_epoch_compares_and_writes_json(tmp_path):
    out = tmp_path / "epoch.json"
    run("epoch.py", "--samples", "256", "--batch", "64", "--hidden", "8", "--infer-samples", "64",
        "--infer-batch", "32", "--repeat", "1", "--no-estimator", "--json", str(out))
    results = json.loads(out.read_text())
    medians = results["medians"]
    assert medians["fastlstm"]["epoch_s"] > 0
    assert medians["fastlstm"]["inference_samples_per_s"] > 0
    floor = results["floor"]
    assert floor["floor"] == max(floor["probe"], floor["best_gemm"]) > 0
    assert medians["fastlstm"]["epoch_floor_fraction"] > 0
    if "PyTorch" in medians:
        paired = results["paired"]
        assert paired["fastlstm"]["epoch_s"] > 0 and paired["PyTorch"]["epoch_s"] > 0
        assert paired["epoch_time_ratio"] > 0 and paired["inference_throughput_ratio"] > 0


def test_paired_epoch_runs_every_minibatch_of_each_in_a_rotating_order(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _common import paired_epoch, paired_inference
    calls = []
    steps = {name: (lambda name: lambda start, idx: calls.append((name, start, list(idx))))(name)
             for name in "abc"}
    seconds = paired_epoch(steps, list(range(7)), 3)
    assert set(seconds) == set("abc") and all(s >= 0 for s in seconds.values())
    assert [c[0] for c in calls] == list("abc" "bca" "cab")
    assert [c[1:] for c in calls[::3]] == [(0, [0, 1, 2]), (3, [3, 4, 5]), (6, [6])]
    rows = []
    rates = paired_inference({"a": rows.append}, 5, 2)
    assert rows == [slice(0, 2), slice(2, 4), slice(4, 5)] and rates["a"] > 0


def test_blas_peak_reports_the_inference_ceiling_and_every_row_count():
    from fastlstm.kernels.gemm_cpu import MR
    text = run("blas_peak.py", "--size", "64", "--rows")
    assert "peak on fused multiply-adds alone" in text
    assert "the floor of this machine" in text and "of the floor" in text
    assert "with free gate math" in text and "packed 1 thr" in text
    assert re.search(r"forward step .* [\d.]+x the time", text)
    from fastlstm.kernels import gemm_bf16_cpu
    assert ("bfloat16's peak, vdpbf16ps alone" in text) == gemm_bf16_cpu.available()
    rows = re.findall(r"^ *(\d+) +[\d.]+ +[\d.]+x +[\d.]+$", text, re.M)
    assert [int(r) for r in rows] == list(range(1, 2 * MR + 2))


def test_vector_width_times_both_versions_and_writes_json(tmp_path):
    out = tmp_path / "width.json"
    text = run("vector_width.py", "--hidden", "8", "--rounds", "2", "--json", str(out))
    results = json.loads(out.read_text())
    assert len(results) == 2 and "inference chunk" in text
    for figures in results.values():
        assert set(figures["ms"]) == {"256-bit", "512-bit"} and figures["ratio_512_over_256"] > 0


def test_ragged_compares_every_contender_and_writes_json(tmp_path):
    out = tmp_path / "ragged.json"
    text = run("ragged.py", "--samples", "64", "--max-steps", "12", "--hidden", "8",
               "--batch", "32", "--infer-samples", "32", "--infer-batch", "16", "--repeat", "1",
               "--json", str(out))
    results = json.loads(out.read_text())
    fastlstm = {"fastlstm_ragged", "fastlstm_padded", "fastlstm_ragged_bi"}
    try:
        import torch  # noqa: F401
    except ImportError:
        expected = fastlstm
    else:
        expected = fastlstm | {"torch_packed", "torch_padded"}
    assert set(results["medians"]) == expected
    assert len(results["paired_epoch_s"]) == 1 and min(results["paired_epoch_s"][0]) > 0
    assert results["ratios"]["epoch_fastlstm_ragged_over_fastlstm_padded_paired"] > 0
    assert "minibatch by minibatch" in text
    for m in results["medians"].values():
        assert m["epoch_s"] > 0 and m["inference_samples_per_s"] > 0
    assert {"epoch_fastlstm_ragged_over_fastlstm_padded", "epoch_fastlstm_bi_over_uni",
            "inference_fastlstm_ragged_over_fastlstm_padded"} <= set(results["ratios"])
    if "torch_packed" in expected:
        assert "epoch_fastlstm_ragged_over_torch_packed" in results["ratios"]
    assert results["machine"] and "ragged.py" in results["command"]
    assert "fastlstm ragged / fastlstm padded" in text


def test_dropout_compares_each_pair_and_writes_json(tmp_path):
    out = tmp_path / "dropout.json"
    text = run("dropout.py", "--samples", "256", "--batch", "64", "--hidden", "8", "--repeat", "1",
               "--json", str(out))
    ratios = json.loads(out.read_text())["ratios"]
    assert set(ratios) == {"1 layer, recurrent_dropout / 1 layer", "2 layers, dropout / 2 layers"}
    assert all(r["cpu_s"] > 0 for r in ratios.values())
    assert "target <= 1.10x" in text


def test_fashion_recipe_fits_and_scores(tmp_path):
    out = tmp_path / "recipe.json"
    text = run("fashion_recipe.py", "--samples", "512", "--max-iter", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["epochs"] == 1 and result["train_samples"] == 512
    assert 0 <= result["test_accuracy"] <= 1
    assert "test accuracy" in text
