"""The launch plans and step schedules of the CUDA recurrence kernels keep the invariants the
kernels rely on.

Pure Python (no GPU): ``fastlstm/kernels/lstm_core.cuh`` assumes that a chunk's warp tasks fit in the
block, that chunks are whole warps, that the shared-memory layout it carves fits the bytes
launched with, and that the grid covers every hidden unit and batch row; and that the schedule
of a variable-length batch (rows sorted longest first, steps packed) is what it says.
"""

import math

import numpy as np
import pytest

from fastlstm.backends.cuda_support import (STEP_BLOCKS_PER_SM, THREADS, DeviceLimits,
                                             plan_recurrence, step_schedule)

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
                    blocks = plan.grid[0] * plan.grid[1]
                    assert (blocks >= STEP_BLOCKS_PER_SM * limits.multiprocessors
                            or plan.chunk_rows == 32), where


def test_persistent_plan_exists_for_the_issue_shapes():
    for hidden, batch in [(128, 128), (128, 1024), (100, 50), (512, 128)]:
        for direction in ("forward", "backward"):
            for itemsize in (4, 8):
                assert plan_recurrence(direction, hidden, batch, itemsize, H100, True) is not None


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_per_step_plan_cuts_the_batch_into_chunks_for_several_blocks_per_sm(direction):
    # H=128, B=128: one chunk of the whole batch would make a (128, 1) grid on 132 SMs
    plan = plan_recurrence(direction, 128, 128, 4, H100, False)
    assert plan.chunk_rows == 32 and plan.grid == (128, 4)
    # a grid already large enough keeps its chunks: inference on B=10,000
    plan = plan_recurrence(direction, 128, 10_000, 4, H100, False)
    assert plan.chunk_rows == 256 and plan.grid == (128, 40)
    # the persistent plan keeps one block per multiprocessor
    plan = plan_recurrence(direction, 128, 128, 4, H100, True)
    assert plan.chunk_rows == 128 and plan.grid == (128, 1)


def test_persistent_plan_refuses_what_cannot_fit():
    assert plan_recurrence("forward", 5000, 64, 4, H100, True) is None


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        plan_recurrence("sideways", 4, 4, 4, H100, True)


def _brute_force_schedule(lengths, B, T):
    """The packed columns of (time, sorted row) by enumeration, and the rows' order."""
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    column = {}
    for t in range(T):
        for r in range(B):
            if sorted_lengths[r] > t:
                column[t, r] = len(column)
    return order, sorted_lengths, column


@pytest.mark.parametrize("B, T", [(1, 1), (5, 1), (1, 6), (7, 5), (33, 9)])
def test_step_schedule_packs_the_valid_steps_of_rows_sorted_by_length(B, T):
    rng = np.random.default_rng(B * 100 + T)
    for lengths in (rng.integers(1, T + 1, B), np.ones(B, np.int64), np.full(B, T)):
        order, sorted_lengths, column = _brute_force_schedule(lengths, B, T)
        s = step_schedule(lengths, B, T, columns=B * T)
        part = {name: s.data[start:start + math.prod(shape)].reshape(shape)
                for name, (start, shape) in s.offsets.items()}
        np.testing.assert_array_equal(s.order, order)
        np.testing.assert_array_equal(part["row"], order)  # the dropout masks' row index
        assert s.total == len(column) == lengths.sum() and part["total"][0] == s.total
        for t in range(T):
            rows = [r for r in range(B) if (t, r) in column]
            assert rows == list(range(part["active"][t])), "the active rows are a prefix"
            if rows:
                assert part["xcol"][t] == column[t, 0]
            assert part["scol"][t] == B + part["xcol"][t]
            assert part["ring"][t] == B + (t % 2) * B
        prev = {0: {}, 1: {}}
        for (t, r), col in column.items():
            prev[0][col] = B + column[t - 1, r] if t > 0 else r
            prev[1][col] = B + column[t + 1, r] if (t + 1, r) in column else r
            assert part["x"][col] == order[r] * T + t
        for d in (0, 1):
            np.testing.assert_array_equal(part["prev"][d, :s.total],
                                          [prev[d][c] for c in range(s.total)])
            assert (part["prev"][d, s.total:] == -1).all()
        assert (part["x"][s.total:] == -1).all()
        for r in range(B):
            last = sorted_lengths[r] - 1
            assert part["last"][0, r] == B + column[last, r]
            assert part["last"][1, r] == B + column[0, r]
            assert part["last_ring"][0, r] == part["ring"][last] + r
            assert part["last_ring"][1, r] == B + r
            assert part["first"][0, r] == column[0, r] and part["first"][1, r] == column[last, r]
        unpack = s.unpack().reshape(B, T)
        position = np.argsort(order)
        for b in range(B):
            for t in range(T):
                want = column[t, position[b]] if t < lengths[b] else -1
                assert unpack[b, t] == want
        # one buffer of a shape takes the schedule of every batch of that shape
        assert s.data.shape == step_schedule(None, B, T, columns=B * T).data.shape
        assert s.data.dtype == np.int32


def test_step_schedule_without_lengths_keeps_the_rows_and_every_step():
    s = step_schedule(None, 3, 4)
    assert s.order is None and s.total == s.columns == 12 and s.max_length == 4
    start, shape = s.offsets["row"]
    np.testing.assert_array_equal(s.data[start:start + shape[0]], np.arange(3))
    np.testing.assert_array_equal(s.xcol, [0, 3, 6, 9])
    with pytest.raises(ValueError, match="columns"):
        step_schedule(np.array([4, 4, 4]), 3, 4, columns=11)
