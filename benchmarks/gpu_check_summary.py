"""The JSON summary of ``benchmarks/gpu_check.sh``: one entry per stage, rewritten after each.

Standard library only, so the summary is written even where NumPy, CuPy or PyTorch are
broken.  ``record`` adds a stage (its exit status, seconds, timeout, log, and the key figures
read from its output file: pytest's JUnit XML, or the stage's JSON); ``finish`` marks the run
as complete and prints one line per stage.  The file is replaced atomically, so a run killed
midway leaves the stages that finished in a readable file.

    python benchmarks/gpu_check_summary.py record SUMMARY STAGE --rc 0 --seconds 12.3 ...
    python benchmarks/gpu_check_summary.py finish SUMMARY
"""

from __future__ import annotations

import argparse
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

#: exit statuses of ``timeout``: 124 when the stage ran past its limit, 137 when it was killed
#: after ignoring the first signal
TIMED_OUT = (124, 137)
#: a line of ``pytest -v``: the test's id, then its outcome
_VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
#: failed tests named in the summary at most (the log has all of them)
NAMED_FAILURES = 20


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return dict(stages=[], finished=False)


def save(summary, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, path)


def junit_counts(path):
    """Passed, failed, error and skipped counts from pytest's JUnit XML, and the failed ids."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = [f"{case.get('classname')}::{case.get('name')}"
              for suite in suites for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return dict(passed=counts["tests"] - counts["failures"] - counts["errors"]
                - counts["skipped"], failed=counts["failures"], errors=counts["errors"],
                skipped=counts["skipped"], failed_tests=failed[:NAMED_FAILURES], complete=True)


def verbose_counts(log):
    """The same counts from the ``pytest -v`` lines of a log, where pytest wrote no XML (it
    was killed, or stopped at collection): only the tests that finished, ``complete`` False."""
    outcomes = {}
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        match = _VERBOSE_LINE.match(line)
        if match:
            outcomes.setdefault(match.group(2), []).append(match.group(1))
    failed = outcomes.get("FAILED", []) + outcomes.get("ERROR", [])
    return dict(passed=len(outcomes.get("PASSED", [])) + len(outcomes.get("XPASS", [])),
                failed=len(outcomes.get("FAILED", [])), errors=len(outcomes.get("ERROR", [])),
                skipped=len(outcomes.get("SKIPPED", [])) + len(outcomes.get("XFAIL", [])),
                failed_tests=failed[:NAMED_FAILURES], complete=False)


def epoch_figures(results):
    """benchmarks/gpu_epoch.py's JSON: each row's seconds and graph use, and the targets."""
    rows = [dict(hidden=c["hidden"], batch=c["batch"], label=r["label"],
                 **{k: r[k] for k in ("train_epoch_s", "inference_s", "speedup_train",
                                      "speedup_inference", "graph_replays", "no_graph_reason",
                                      "error") if k in r})
            for c in results.get("configs", []) for r in c["rows"]]
    targets = [{k: t.get(k) for k in ("name", "value", "fastlstm_row", "met", "missing")}
               for t in results.get("targets", [])]
    return dict(rows=rows, targets=targets)


def accuracy_figures(results):
    """benchmarks/gpu_accuracy.py's JSON: each backend's test accuracy and training time, or
    why it did not run."""
    figures = {name: dict(accuracy=r["accuracy"], train_s=r["train_s"],
                          last_epoch_loss=r["epoch_losses"][-1] if r["epoch_losses"] else None)
               for name, r in results.get("results", {}).items()}
    figures.update({name: dict(error=error) for name, error in results.get("errors", {}).items()})
    return figures


#: how the key figures are read from a stage's JSON, by the stage's name; a stage not named
#: here records its JSON as it is (the environment's facts)
JSON_FIGURES = {"benchmark": epoch_figures, "accuracy": accuracy_figures}


def figures(stage, path, log):
    """The key figures of a stage from its output file, or ``None`` where it has none."""
    if not path:
        return None
    path = Path(path)
    if path.suffix == ".xml":
        return junit_counts(path) if path.is_file() else verbose_counts(log)
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except ValueError as exc:
        return dict(unreadable=f"{path.name}: {exc}")
    return JSON_FIGURES.get(stage, lambda r: r)(results)


def record(args):
    summary = load(args.summary)
    entry = dict(name=args.stage, command=args.command, timeout_s=args.timeout)
    if args.skipped:
        entry.update(skipped=args.skipped, rc=None)
    else:
        entry.update(rc=args.rc, timed_out=args.rc in TIMED_OUT, seconds=round(args.seconds, 2),
                     log=args.log and Path(args.log).name)
        try:
            entry["figures"] = figures(args.stage, args.figures, args.log)
        except Exception as exc:  # a figure that cannot be read must not lose the stage
            entry["figures"] = dict(unreadable=f"{type(exc).__name__}: {exc}")
    summary["stages"] = [s for s in summary["stages"] if s["name"] != args.stage] + [entry]
    summary.update(finished=False, **dict(args.meta or []))
    save(summary, args.summary)


def digest(stage):
    """One line of a stage for the end of the script's output (what a caller reads first)."""
    if "skipped" in stage:
        return f"{stage['name']}: skipped ({stage['skipped']})"
    line = f"{stage['name']}: exit {stage['rc']} after {stage['seconds']} s"
    if stage.get("timed_out"):
        line += f" (TIMED OUT at {stage['timeout_s']} s)"
    found = stage.get("figures") or {}
    if "passed" in found:
        line += (f"; {found['passed']} passed, {found['failed']} failed, {found['errors']} "
                 f"errors, {found['skipped']} skipped"
                 + ("" if found["complete"] else " (from the log: pytest did not finish)"))
    lines = [line] + [f"  FAILED {name}" for name in found.get("failed_tests", [])]
    lines += [f"  target {t['name']}: "
              + ("NOT MEASURED" if t["met"] is None else
                 f"{t['value']:.3f}, {'PASS' if t['met'] else 'FAIL'}")
              for t in found.get("targets", [])]
    lines += [f"  {name}: " + (f"test accuracy {r['accuracy']:.4f}" if "accuracy" in r else
                               f"ERROR {r['error']}")
              for name, r in found.items() if stage["name"] == "accuracy" and isinstance(r, dict)]
    return "\n".join(lines)


def finish(args):
    summary = load(args.summary)
    summary["finished"] = True
    summary["failed_stages"] = [s["name"] for s in summary["stages"]
                                if s.get("rc") not in (0, None)]
    save(summary, args.summary)
    for stage in summary["stages"]:
        print(digest(stage))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="action", required=True)
    rec = commands.add_parser("record", help="add one stage")
    rec.add_argument("summary")
    rec.add_argument("stage")
    rec.add_argument("--command", default="")
    rec.add_argument("--timeout", type=int, help="the stage's limit, seconds")
    rec.add_argument("--rc", type=int)
    rec.add_argument("--seconds", type=float, default=0.0)
    rec.add_argument("--log")
    rec.add_argument("--figures", help="the stage's JUnit XML or JSON")
    rec.add_argument("--skipped", help="why the stage did not run")
    rec.add_argument("--meta", nargs=2, action="append", metavar=("KEY", "VALUE"),
                     help="a top-level fact of the run")
    rec.set_defaults(run=record)
    fin = commands.add_parser("finish", help="mark the run complete")
    fin.add_argument("summary")
    fin.set_defaults(run=finish)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
