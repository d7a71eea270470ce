"""The launch plans of the CUDA recurrence kernels keep the invariants the kernels rely on.

Pure Python (no GPU): ``fastlstm/kernels/lstm_core.cuh`` assumes that a chunk's warp tasks fit in the
block, that chunks are whole warps, that the shared-memory layout it carves fits the bytes
launched with, and that the grid covers every hidden unit and batch row.
"""

import math

import pytest

from fastlstm.backends.cuda_support import DeviceLimits, THREADS, plan_recurrence

A100 = DeviceLimits(multiprocessors=108, shared_per_block=49152, shared_optin=166912,
                    cooperative=True)
H100 = DeviceLimits(multiprocessors=132, shared_per_block=49152, shared_optin=232448,
                    cooperative=True)
HIDDEN = [1, 2, 3, 5, 31, 32, 33, 100, 127, 128, 129, 256, 300, 512, 513, 1024, 2048, 5000]
BATCH = [1, 2, 31, 32, 33, 50, 96, 128, 129, 1000, 1024, 4096]


def shared_elements(direction, hidden, plan):
    """What the kernels carve: weights (all K rows if persistent, else KC) + stage + partials."""
    k = hidden if direction == "forward" else 4 * hidden
    ncol = (4 if direction == "forward" else 1) * plan.slice_units
    weight_rows = k if plan.persistent else plan.stage_rows
    return weight_rows * ncol + plan.stage_rows * plan.chunk_rows + plan.threads * plan.vector


@pytest.mark.parametrize("limits", [A100, H100], ids=["A100", "H100"])
@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_plans_keep_kernel_invariants(direction, itemsize, limits):
    warps = THREADS // 32
    for hidden in HIDDEN:
        for batch in BATCH:
            for persistent in (True, False):
                plan = plan_recurrence(direction, hidden, batch, itemsize, limits, persistent)
                if plan is None:
                    assert persistent, "the per-step plan must always exist"
                    continue
                where = f"{direction} H={hidden} B={batch} persistent={persistent}: {plan}"
                ncol = (4 if direction == "forward" else 1) * plan.slice_units
                assert plan.chunk_rows % 32 == 0 and plan.chunk_rows >= 32, where
                assert ncol % plan.vector == 0, where
                assert (ncol // plan.vector) * (plan.chunk_rows // 32) <= warps, where
                assert plan.shared_bytes == shared_elements(direction, hidden, plan) * itemsize
                assert plan.shared_bytes <= limits.shared_optin, where
                assert plan.grid[0] == math.ceil(hidden / plan.slice_units), where
                k = hidden if direction == "forward" else 4 * hidden
                assert 1 <= plan.stage_rows <= k, where
                if persistent:
                    assert plan.grid[1] == 1 and plan.grid[0] <= limits.multiprocessors, where
                else:
                    assert plan.grid[1] * plan.chunk_rows >= batch, where
                    assert (plan.grid[1] - 1) * plan.chunk_rows < batch, where


def test_persistent_plan_exists_for_the_issue_shapes():
    for hidden, batch in [(128, 128), (128, 1024), (100, 50), (512, 128)]:
        for direction in ("forward", "backward"):
            for itemsize in (4, 8):
                assert plan_recurrence(direction, hidden, batch, itemsize, H100, True) is not None


def test_persistent_plan_refuses_what_cannot_fit():
    assert plan_recurrence("forward", 5000, 64, 4, H100, True) is None


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        plan_recurrence("sideways", 4, 4, 4, H100, True)
