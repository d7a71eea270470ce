"""``benchmarks/gpu_epoch.py`` without a GPU: its PyTorch rows on the CPU, the static-buffer
step that its graph row captures, its row labels and its targets.

The graph capture itself (``torch.cuda.graph``) and fastlstm's rows need a GPU; here
fastlstm's rows must report why they cannot run, and no row may be labelled "graph".
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_epoch(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_epoch
    return gpu_epoch


def test_torch_rows_run_on_the_cpu_and_fastlstm_rows_say_why_not(tmp_path, gpu_epoch):
    out = tmp_path / "epoch.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_epoch.py"), str(out),
                           "--samples", "200", "--test-samples", "16", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert [(c["hidden"], c["batch"]) for c in results["configs"]] == gpu_epoch.CONFIGS
    for config in results["configs"]:
        rows = config["rows"]
        torch_rows = {r["variant"]: r for r in rows if r["impl"] == "torch"}
        assert set(torch_rows) == {"eager", "fused", "graph"}
        assert all(r["train_epoch_s"] > 0 and r["inference_s"] > 0 for r in torch_rows.values())
        static = torch_rows["graph"]
        assert static["graph"] is False and static["graph_replays"] == 0
        assert "CUDA device" in static["no_graph_reason"]
        assert len({r["label"] for r in rows}) == len(rows)
        assert not any(r["label"].endswith("+ graph") for r in rows)
        fastlstm = [r for r in rows if r["impl"] == "fastlstm"]
        assert len(fastlstm) == len(gpu_epoch.FASTLSTM_VARIANTS)
    assert len(results["targets"]) == len(gpu_epoch.TARGETS)
    for target in results["targets"]:
        assert (target["met"] is None) == ("missing" in target)
        verdict = "NOT MEASURED" if target["met"] is None else ("PASS", "FAIL")[not target["met"]]
        assert f"target {target['name']}: " in done.stdout and verdict in done.stdout
    # gpu_check.sh's summary keeps each row and target
    summary = tmp_path / "summary.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check_summary.py"), "record",
                    str(summary), "benchmark", "--rc", "0", "--figures", str(out)],
                   check=True, timeout=60)
    figures = json.loads(summary.read_text())["stages"][0]["figures"]
    assert len(figures["rows"]) == sum(len(c["rows"]) for c in results["configs"])
    assert [t["name"] for t in figures["targets"]] == [t["name"] for t in results["targets"]]


def test_the_static_step_trains_as_the_eager_loop(gpu_epoch):
    """Without a graph, the graph row's step on static buffers (a short last batch
    included) gives the eager loop's losses and weights, bit for bit."""
    torch = pytest.importorskip("torch")
    from _common import torch_model, torch_train_epoch
    from torch_graph import TorchStaticSteps

    X = torch.as_tensor(np.random.default_rng(0).standard_normal((50, 5, 3), np.float32))
    y = torch.as_tensor(np.random.default_rng(1).integers(0, 4, 50))
    order = torch.as_tensor(np.random.default_rng(2).permutation(50))
    trained = []
    for static in (False, True):
        torch.manual_seed(0)
        net = torch_model(3, 6, 4)
        optimizer = gpu_epoch.torch_optimizer(net.parameters(), "graph")
        if static:
            steps = TorchStaticSteps(net, optimizer, X, y)
            totals = [steps.train_epoch(order, 16) for _ in range(2)]
            assert steps.replays == 0 and sorted(steps._steps) == [2, 16]
        else:
            totals = [torch_train_epoch(net, optimizer, X, y, order, 16) for _ in range(2)]
        trained.append((totals, [p.detach().clone() for p in net.parameters()]))
    (eager_totals, eager_params), (static_totals, static_params) = trained
    assert [float(t) for t in static_totals] == [float(t) for t in eager_totals]
    assert all(torch.equal(a, b) for a, b in zip(static_params, eager_params))


def test_a_row_is_labelled_graph_only_when_graphs_were_replayed(gpu_epoch):
    status = gpu_epoch.graph_status
    assert status(True, 10, 479, ["ignored"]) == dict(graph=True, graph_replays=469)
    assert gpu_epoch.row_label("fastlstm", ("step", True, "kernels"), status(True, 10, 479)) == \
        "fastlstm step (kernels GEMMs) + graph"
    for result, reason in ((status(True, 0, 0, ["capture failed: cuBLAS"]), "capture failed"),
                           (status(False, 0, 0), "graphs=False"),
                           (status(True, None, None), "no graph_replays counter")):
        assert result["graph"] is False and reason in result["no_graph_reason"]
        assert gpu_epoch.row_label("fastlstm", ("persistent", True, "cublas"), result) == \
            "fastlstm persistent (cublas GEMMs), no graph"
    assert gpu_epoch.row_label("fastlstm", ("persistent", True, "cublas"), dict(error="x")) == \
        "fastlstm persistent (cublas GEMMs), graph asked"
    assert gpu_epoch.row_label("torch", "graph", dict(graph=True)) == "torch fused Adam + graph"
    assert gpu_epoch.row_label("torch", "eager", {}) == "torch eager"


def row(impl, variant, epoch, inference, **extra):
    return dict(impl=impl, variant=variant, label=f"{impl} {variant}", train_epoch_s=epoch,
                inference_s=inference, **extra)


def test_targets_are_judged_from_the_measured_rows(gpu_epoch):
    configs = [
        dict(hidden=128, batch=128, rows=[
            row("torch", "eager", 1.0, 0.0070), row("torch", "fused", 0.9, 0.0070),
            row("torch", "graph", 0.3, 0.0070, graph=True),
            row("fastlstm", "a", 0.25, 0.0030), row("fastlstm", "b", 0.15, 0.0020),
            dict(impl="fastlstm", variant="c", label="broken", error="ValueError: no")]),
        dict(hidden=128, batch=1024, rows=[
            row("torch", "eager", 0.1, 0.0070), row("torch", "fused", 0.1, 0.0070),
            row("torch", "graph", 0.05, 0.0070, graph=False),
            row("fastlstm", "a", 0.05, 0.0030)]),
    ]
    judged = {(t["name"].split(":")[0], t["name"].split(": ")[1]): t
              for t in gpu_epoch.evaluate_targets(configs)}
    best = judged["H=128 batch=128", "fastlstm epoch s <= 0.2"]
    assert best["met"] is True and best["value"] == 0.15 and best["fastlstm_row"] == "fastlstm b"
    over_eager = judged["H=128 batch=128", "torch eager epoch / fastlstm epoch >= 5.0"]
    assert over_eager["met"] is True and over_eager["value"] == pytest.approx(1.0 / 0.15)
    over_graph = judged["H=128 batch=128", "torch graph epoch / fastlstm epoch > 1.0"]
    assert over_graph["met"] is True and over_graph["value"] == pytest.approx(2.0)
    large = judged["H=128 batch=1024", "torch eager epoch / fastlstm epoch >= 2.5"]
    assert large["met"] is False and large["value"] == pytest.approx(2.0)
    inference = judged["H=128 batch=128", "torch eager inference / fastlstm inference >= 3.0"]
    assert inference["met"] is True and inference["value"] == pytest.approx(3.5)
    inference = judged["H=128 batch=1024", "torch eager inference / fastlstm inference >= 3.0"]
    assert inference["met"] is False
    # a PyTorch graph row that ran without a graph measures nothing against "graph"
    configs[0]["rows"][2]["graph"] = False
    over_graph = next(t for t in gpu_epoch.evaluate_targets(configs) if "torch graph" in t["name"])
    assert over_graph["met"] is None and "graph row" in over_graph["missing"]
