"""``benchmarks/gpu_check.sh``, the one script run on a lent GPU machine, checked without a GPU.

That machine is lent for minutes, so the script must parse, fit its stages into 8 minutes,
never stop at the first failure, and leave a readable summary whatever fails.  Here every
GPU stage fails fast; the script is run with its timeouts scaled down
(``GPU_CHECK_SCALE_PERCENT``) and without the install stage (``GPU_CHECK_SKIP``), which would
replace this environment's editable install.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SUMMARY = ROOT / "benchmarks" / "gpu_check_summary.py"
STAGES = ["environment", "install", "test-cuda", "test-parity", "benchmark", "accuracy"]
#: what comes back from the GPU machine's $OUT: at most 8 files, plain names
MAX_FILES = 8
#: the lease's per-command limit leaves the script 8 minutes
SCRIPT_BUDGET_S = 480


def stage_lines():
    """(name, seconds) of each ``stage NAME SECONDS ...`` call, and the kill-after."""
    text = SCRIPT.read_text()
    stages = [(m.group(1), int(m.group(2)))
              for m in re.finditer(r"^stage (\S+) (\d+) ", text, re.MULTILINE)]
    kill_after = int(re.search(r"^KILL_AFTER=(\d+)$", text, re.MULTILINE).group(1))
    return stages, kill_after


def run_script(tmp_path, **env):
    """The script with this interpreter first on PATH (it calls ``python3``), writing to
    ``tmp_path / "out"``; returns the summary and the names of the files written."""
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OUT": str(out), **env}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    summary = json.loads((out / "gpu_check.json").read_text())
    return done, summary, sorted(p.name for p in out.iterdir())


def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_stages_fit_in_eight_minutes_environment_first():
    stages, kill_after = stage_lines()
    assert [name for name, _ in stages] == STAGES
    assert sum(seconds + kill_after for _, seconds in stages) <= SCRIPT_BUDGET_S


def test_no_stage_stops_the_next():
    text = SCRIPT.read_text()
    assert not re.search(r"(?<!\S)(-x|--exitfirst|--maxfail\S*)(?!\S)", text)
    assert not re.search(r"^\s*set\s+(-\S*e|-o\s+errexit)", text, re.MULTILINE)


def test_without_a_gpu_every_stage_is_recorded_within_its_timeout(tmp_path):
    done, summary, files = run_script(tmp_path, GPU_CHECK_SCALE_PERCENT="1",
                                      GPU_CHECK_SKIP="install")
    assert done.returncode == 1, done.stdout + done.stderr  # the GPU stages fail here
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert summary["finished"] is True
    by_name = {s["name"]: s for s in summary["stages"]}
    assert by_name["install"]["skipped"] == "GPU_CHECK_SKIP"
    for name in set(STAGES) - {"install"}:
        stage = by_name[name]
        assert isinstance(stage["rc"], int) and stage["log"] == f"{name}.log"
        # 1 s at this scale, then at most 1 s more before the kill, and the process start
        assert stage["timeout_s"] == 1 and stage["seconds"] < 4, stage
    assert set(summary["failed_stages"]) <= set(STAGES) - {"install"}
    assert len(files) <= MAX_FILES and all(re.fullmatch(r"[\w.-]+", f) for f in files)


def test_the_environment_stage_records_each_fact(tmp_path):
    done, summary, _ = run_script(
        tmp_path, GPU_CHECK_SKIP=" ".join(s for s in STAGES if s != "environment"))
    environment = summary["stages"][0]
    assert environment["name"] == "environment" and environment["rc"] == 0, done.stdout
    facts = environment["figures"]
    assert {"nvidia_smi", "gpu", "cuda_driver", "cuda_runtime", "nvrtc", "cupy", "numba",
            "setuptools", "torch", "fastlstm"} <= set(facts)
    import numba
    assert facts["numba"] == numba.__version__
    assert facts["fastlstm"]["path"] == str(ROOT / "fastlstm" / "__init__.py")


TINY_TESTS = """
import pytest
def test_passes(): pass
def test_fails(): assert False
@pytest.mark.skip(reason="skipped on purpose")
def test_skipped(): pass
"""


def test_pytest_counts_come_from_its_xml_or_else_from_its_log(tmp_path):
    (tmp_path / "test_tiny.py").write_text(TINY_TESTS)
    log, xml = tmp_path / "tiny.log", tmp_path / "tiny.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", "test_tiny.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    log.write_text(done.stdout + done.stderr)
    summary = tmp_path / "summary.json"
    expected = dict(passed=1, failed=1, errors=0, skipped=1)
    for name, figures, complete in (("whole", xml, True), ("killed", tmp_path / "absent.xml",
                                                           False)):
        subprocess.run([sys.executable, str(SUMMARY), "record", str(summary), name, "--rc",
                        str(done.returncode), "--seconds", "1", "--log", str(log),
                        "--figures", str(figures)], check=True, timeout=60)
        counts = json.loads(summary.read_text())["stages"][-1]["figures"]
        assert {k: counts[k] for k in expected} == expected, counts
        assert counts["complete"] is complete
        assert counts["failed_tests"] and counts["failed_tests"][0].endswith("test_fails")


def test_a_backend_that_fails_is_reported_and_the_stage_fails(tmp_path):
    """benchmarks/gpu_accuracy.py goes on past a backend that cannot run, records why in its
    JSON (which the summary keeps) and exits non-zero."""
    out, summary = tmp_path / "accuracy.json", tmp_path / "summary.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_accuracy.py"), str(out),
                           "--backends", "no-such-backend", "--epochs", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no-such-backend" in json.loads(out.read_text())["errors"]
    subprocess.run([sys.executable, str(SUMMARY), "record", str(summary), "accuracy", "--rc",
                    str(done.returncode), "--figures", str(out)], check=True, timeout=60)
    figures = json.loads(summary.read_text())["stages"][0]["figures"]
    assert "error" in figures["no-such-backend"]
