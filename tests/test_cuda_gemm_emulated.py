"""fastlstm's own CUDA GEMM (``fastlstm/kernels/gemm.cu`` through ``cuda_gemm.KernelGemm``),
run on the CPU by the emulator, against exact products; and its launch plan, in pure Python.

Every transposition with and without accumulation, sizes off every tile edge (1, 7, 33, 65,
130; K off the 16-deep stage), views with a leading dimension past their columns and an offset
(the elements around each view hold NaN, or a sentinel around the output, so a read or write
outside a view shows), split K (partials and their sum) where the plan splits, float32 and
float64, and the same bits on a repeated call, which allocates nothing.  Not covered here: the
GPU's memory model and speed (tests/test_cuda_backend.py runs the backend on a GPU).
"""

import math
import re
import shutil
import sys

import numpy as np
import pytest

from cuda_emulator import fake_cupy
from fastlstm.backends import cuda_gemm
from fastlstm.backends.cuda_gemm import KernelGemm, Mat, gemm_plan
from fastlstm.backends.cuda_support import cuda_source
from fastlstm.kernels import CUDA_SOURCE_DIR

needs_gpp = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed here")

#: (m, n, k): one element; edges of every tile and stage; no K at all; split K over one tile
#: (4 splits, the last one ending inside a stage) and over two row tiles (2 splits)
SHAPES = [(1, 7, 2), (65, 130, 17), (33, 1, 37), (3, 4, 0), (7, 3, 1100), (65, 5, 700)]
DTYPES = [np.float32, np.float64]
SENTINEL = 7.25
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def test_shapes_cover_every_path():
    plans = {shape: gemm_plan(*shape) for shape in SHAPES}
    split = [s for s, p in plans.items() if p.splits > 1]
    assert any(p.splits == 1 and s[2] % cuda_gemm.TILE_K for s, p in plans.items())
    assert any(s[2] % plans[s].k_chunk % cuda_gemm.TILE_K for s in split)  # a partial stage
    assert any(s[0] > cuda_gemm.TILE for s in split)  # split and row tiles share grid.y
    assert any(s[1] > 2 * cuda_gemm.TILE for s in SHAPES)


def test_tiling_constants_match_the_kernel():
    source = (CUDA_SOURCE_DIR / "gemm.cu").read_text()
    for name in ("TILE", "TILE_K", "THREADS"):
        value = re.search(rf"constexpr int {name} = (\d+);", source).group(1)
        assert int(value) == getattr(cuda_gemm, name), name


@pytest.mark.parametrize("m", [1, 2, 64, 65, 512, 4096])
@pytest.mark.parametrize("n", [1, 64, 128, 512, 1024, 4096, 30000])
@pytest.mark.parametrize("k", [0, 2, 16, 255, 256, 512, 3584, 30000, 100000])
def test_plan_covers_k_with_deep_nonempty_splits(m, n, k):
    plan = gemm_plan(m, n, k)
    row_tiles, col_tiles = math.ceil(m / cuda_gemm.TILE), math.ceil(n / cuda_gemm.TILE)
    assert plan.grid == (col_tiles, row_tiles * plan.splits)
    assert plan.grid[1] <= cuda_gemm.MAX_GRID_Y
    if plan.splits == 1:
        assert plan.k_chunk >= k
        return
    assert plan.k_chunk % cuda_gemm.TILE_K == 0
    assert (plan.splits - 1) * plan.k_chunk < k <= plan.splits * plan.k_chunk
    assert plan.k_chunk >= cuda_gemm.MIN_SPLIT_TILES * cuda_gemm.TILE_K
    assert row_tiles * col_tiles < cuda_gemm.TARGET_BLOCKS
    # the workspace stays below two target grids of tiles
    assert plan.splits * m * n < 2 * cuda_gemm.TARGET_BLOCKS * cuda_gemm.TILE ** 2


@pytest.fixture(scope="module")
def fake_device(tmp_path_factory):
    """The fake CuPy as ``cupy`` (KernelGemm allocates its workspaces with it) and a
    ``kernel(name, dtype)`` over the emulated ``gemm.cu``."""
    fake_cupy.RawModule.build_dir = tmp_path_factory.mktemp("emulated-gemm")
    module = fake_cupy.RawModule(code=cuda_source("gemm"))
    cupy = fake_cupy.modules()["cupy"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "cupy", cupy)
        yield cupy, lambda name, dtype: module.get_function(
            f"fastlstm_{name}_{_SUFFIX[np.dtype(dtype)]}")


class Stored:
    """A ``rows x cols`` view of a fake device buffer: leading dimension ``cols + 3``, 5 elements
    in, every other element of the buffer ``fill``."""

    PAD, OFFSET = 3, 5

    def __init__(self, values, fill):
        rows, cols = values.shape
        ld = cols + self.PAD
        host = np.full(self.OFFSET + rows * ld + self.PAD, fill, values.dtype)
        self._view(host, rows, cols, ld)[...] = values
        self.buffer = fake_cupy.asarray(host)
        self.rows, self.cols, self.ld = rows, cols, ld
        self.mat = Mat(self.buffer.data.ptr + self.OFFSET * host.itemsize, rows, cols, ld)

    def _view(self, flat, rows, cols, ld):
        return flat[self.OFFSET:self.OFFSET + rows * ld].reshape(rows, ld)[:, :cols]

    def values(self):
        return self._view(self.buffer.get(), self.rows, self.cols, self.ld)

    def outside(self):
        """The buffer's elements that are not in the view."""
        inside = np.zeros(self.buffer.shape, bool)
        self._view(inside, self.rows, self.cols, self.ld)[...] = True
        return self.buffer.get()[~inside]


def operands(shape, ta, tb, accumulate, dtype, seed=0):
    """Stored A, B (NaN around) and C (the sentinel around; NaN inside unless accumulating)."""
    m, n, k = shape
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    c0 = rng.standard_normal((m, n)).astype(dtype) if accumulate else np.full((m, n), np.nan,
                                                                              dtype)
    return Stored(a, np.nan), Stored(b, np.nan), Stored(c0, SENTINEL)


def exact(a, b, c0, ta, tb, accumulate):
    """op(a) @ op(b) (+ c0) in extended precision, and the bound on a correct kernel's error.

    Along any path an element meets at most k + 2 roundings: its product, the sums within its
    split and across the splits (at most k - 1 together), the accumulation; so a correct result
    is within gamma(k + 2) (|op(a)| @ |op(b)| + |c0|), gamma(j) = j u / (1 - j u), u the unit
    roundoff, plus the reference's own gamma(k) in its extended precision.
    """
    op_a = (a.T if ta else a).astype(np.longdouble)
    op_b = (b.T if tb else b).astype(np.longdouble)
    base = c0.astype(np.longdouble) if accumulate else np.zeros(c0.shape, np.longdouble)
    k = op_a.shape[1]

    def gamma(j, dtype):
        u = np.finfo(dtype).eps / 2
        return j * u / (1 - j * u)

    scale = np.abs(op_a) @ np.abs(op_b) + np.abs(base)
    bound = (gamma(k + 2, a.dtype) + gamma(k, np.longdouble)) * scale
    return op_a @ op_b + base, bound


@needs_gpp
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "accumulate"])
@pytest.mark.parametrize("ta, tb", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}-n{}-k{}".format(*s))
def test_gemm_matches_exact_product(fake_device, shape, ta, tb, accumulate, dtype):
    a, b, c = operands(shape, ta, tb, accumulate, dtype)
    want, bound = exact(a.values(), b.values(), c.values(), ta, tb, accumulate)
    KernelGemm(dtype, fake_device[1]).gemm(c.mat, a.mat, b.mat, ta=ta, tb=tb,
                                           accumulate=accumulate)
    got = c.values()
    assert np.all(np.abs(got.astype(np.longdouble) - want) <= bound)
    assert np.all(c.outside() == SENTINEL)


@needs_gpp
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(7, 3, 1100), (65, 130, 17)], ids=["split", "tiles"])
def test_a_repeated_call_allocates_nothing(fake_device, shape, dtype, monkeypatch):
    cupy, kernel = fake_device
    gemm = KernelGemm(dtype, kernel)
    results = []
    for call in range(2):
        a, b, c = operands(shape, True, False, True, dtype, seed=1)
        gemm.gemm(c.mat, a.mat, b.mat, ta=True, accumulate=True)
        results.append(c.values().tobytes())
        monkeypatch.setattr(cupy, "empty", None)  # a second allocation would fail
    assert results[0] == results[1]


def test_gemm_rejects_mismatched_shapes():
    gemm = KernelGemm(np.float32, kernel=None)
    with pytest.raises(ValueError, match="GEMM shapes do not match"):
        gemm.gemm(Mat(0, 2, 3, 3), Mat(0, 2, 4, 4), Mat(0, 5, 3, 3))
    with pytest.raises(TypeError, match="float32 and float64"):
        KernelGemm(np.float16, kernel=None)
