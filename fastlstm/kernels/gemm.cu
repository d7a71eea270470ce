// The CUDA backend's own GEMM: C = op(A) op(B) (C += ... where accumulate) on row-major
// operands with any leading dimension and offset, float32 accumulating in float32 and float64
// in float64.  Plain kernels, so that a CUDA graph captures them (CuPy refuses any cuBLAS call
// during stream capture).  The host side, with the launch plan and the reasons for the tile
// sizes (not measured on a GPU), is KernelGemm in fastlstm/backends/cuda_gemm.py, which mirrors
// TILE, TILE_K and THREADS.
//
// A block computes one TILE x TILE tile of C over one split of K, TILE_K deep at a time: 256
// threads, thread (ty, tx) = (t / 16, t % 16) owning the 4 x 4 elements of rows ty + 16 r and
// columns tx + 16 s.  Both operand tiles are kept K-major in shared memory (sa[kk][i],
// sb[kk][j]), so the inner loop's reads are conflict-free whatever the transpositions: a warp
// reads 2 addresses of sa (broadcasts) and 16 consecutive ones of sb.  The transpositions (the
// template's TA, TB) decide only which thread loads which element, so that the global loads run
// along each operand's contiguous dimension and the shared stores do not conflict either (see
// `pitch`).  The next K tile is loaded into registers while the current one is multiplied.
// Elements past m, n or the split's end of K load as zero and results past m, n are not stored.
//
// Split K: gridDim.y = row tiles x splits; each split writes its partial tile to a workspace
// (pitch n, `split_stride` elements apart) and gemm_sum_splits adds the partials in split order,
// so a result is the same bits on every run (no atomics).

namespace fastlstm {
namespace gemm {

constexpr int TILE = 64;     // rows and columns of C per block
constexpr int TILE_K = 16;   // K per shared-memory stage
constexpr int THREADS = 256;
constexpr int SIDE = 16;     // threads per side of the block's 16 x 16 thread grid
constexpr int MICRO = TILE / SIDE;               // rows (and columns) of C per thread
constexpr int LOADS = TILE * TILE_K / THREADS;   // elements of each operand tile per thread
static_assert(SIDE * SIDE == THREADS && MICRO * SIDE == TILE, "one micro-tile per thread");
static_assert(LOADS * THREADS == TILE * TILE_K && THREADS % TILE == 0 && THREADS % TILE_K == 0,
              "every thread loads the same number of elements of each tile");

// Row pitch of the shared tiles, for the stores of a K-contiguous operand (the other layout
// stores consecutive rows: no conflict at any pitch).  float: a warp stores 16 depths x 2
// consecutive rows at once, element depth * 66 + row, bank (2 * depth + row) mod 32, all
// distinct.  double: a half-warp at a time stores 16 depths of one row, element depth * 65 +
// row, banks 2 x ((depth + row) mod 16), all distinct.
template <typename T>
constexpr int pitch = sizeof(T) == 4 ? TILE + 2 : TILE + 1;

// One thread's share of one operand's K tile.  The operand is seen as `rows x K` (op(A) by its
// rows, op(B) by its columns); element (r, p) lies at ptr[r * ld + p] where K_CONTIGUOUS, else at
// ptr[p * ld + r].  Consecutive threads take consecutive addresses: coalesced loads.
template <typename T, bool K_CONTIGUOUS>
struct TileLoader {
    const T* ptr;
    long long ld;
    int rows;  // rows of the operand
    int r0;    // the block's first row
    T v[LOADS];

    __device__ int row(int l) const {
        return K_CONTIGUOUS ? threadIdx.x / TILE_K + l * (THREADS / TILE_K) : threadIdx.x % TILE;
    }
    __device__ int depth(int l) const {
        return K_CONTIGUOUS ? threadIdx.x % TILE_K : threadIdx.x / TILE + l * (THREADS / TILE);
    }
    __device__ void load(int k0, int k_end) {
#pragma unroll
        for (int l = 0; l < LOADS; ++l) {
            const int r = r0 + row(l), p = k0 + depth(l);
            const long long at = K_CONTIGUOUS ? r * ld + p : p * ld + r;
            v[l] = r < rows && p < k_end ? ptr[at] : T(0);
        }
    }
    __device__ void store(T (*tile)[pitch<T>]) const {
#pragma unroll
        for (int l = 0; l < LOADS; ++l) tile[depth(l)][row(l)] = v[l];
    }
};

// out (pitch ldo) = op(A) op(B) over K [split * k_chunk, min(k, (split + 1) * k_chunk)), or
// out += that where accumulate; split `split` writes `split * split_stride` elements further.
template <typename T, bool TA, bool TB>
__device__ void tile(const T* a, long long lda, const T* b, long long ldb, T* out, long long ldo,
                     long long split_stride, int m, int n, int k, int k_chunk, int accumulate) {
    __shared__ T sa[TILE_K][pitch<T>];
    __shared__ T sb[TILE_K][pitch<T>];
    const int row_tiles = (m + TILE - 1) / TILE;
    const int split = blockIdx.y / row_tiles;
    const int m0 = (blockIdx.y % row_tiles) * TILE, n0 = blockIdx.x * TILE;
    const int k_begin = split * k_chunk, k_end = min(k, k_begin + k_chunk);
    TileLoader<T, !TA> la{a, lda, m, m0};  // element (i, p) of op(A)
    TileLoader<T, TB> lb{b, ldb, n, n0};   // element (p, j) of op(B), as row j
    const int tx = threadIdx.x % SIDE, ty = threadIdx.x / SIDE;
    T acc[MICRO][MICRO];
#pragma unroll
    for (int r = 0; r < MICRO; ++r)
#pragma unroll
        for (int s = 0; s < MICRO; ++s) acc[r][s] = T(0);
    if (k_begin < k_end) {
        la.load(k_begin, k_end);
        lb.load(k_begin, k_end);
    }
    for (int k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        la.store(sa);
        lb.store(sb);
        __syncthreads();
        if (k0 + TILE_K < k_end) {
            la.load(k0 + TILE_K, k_end);
            lb.load(k0 + TILE_K, k_end);
        }
#pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            T x[MICRO], y[MICRO];
#pragma unroll
            for (int r = 0; r < MICRO; ++r) {
                x[r] = sa[kk][ty + SIDE * r];
                y[r] = sb[kk][tx + SIDE * r];
            }
#pragma unroll
            for (int r = 0; r < MICRO; ++r)
#pragma unroll
                for (int s = 0; s < MICRO; ++s) acc[r][s] += x[r] * y[s];
        }
        __syncthreads();  // the tiles are overwritten next
    }
    T* const dst = out + split * split_stride;
#pragma unroll
    for (int r = 0; r < MICRO; ++r)
#pragma unroll
        for (int s = 0; s < MICRO; ++s) {
            const int i = m0 + ty + SIDE * r, j = n0 + tx + SIDE * s;
            if (i < m && j < n) {
                T& o = dst[i * ldo + j];
                o = accumulate ? o + acc[r][s] : acc[r][s];
            }
        }
}

// c (m x n, pitch ldc) = the sum of the `splits` partials (each m x n, pitch n, split_stride
// apart), added in split order; c += that where accumulate.
template <typename T>
__device__ void sum_splits(const T* partials, int splits, long long split_stride, T* c,
                           long long ldc, int m, int n, int accumulate) {
    const long long total = (long long)m * n;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        T sum = partials[e];
        for (int q = 1; q < splits; ++q) sum += partials[q * split_stride + e];
        T& o = c[(e / n) * ldc + e % n];
        o = accumulate ? o + sum : sum;
    }
}

}  // namespace gemm
}  // namespace fastlstm

#define FASTLSTM_GEMM_TILE(NAME, SUFFIX, T, TA, TB)                                              \
    extern "C" __global__ void fastlstm_gemm_##NAME##_##SUFFIX(                                  \
        const T* a, long long lda, const T* b, long long ldb, T* out, long long ldo,            \
        long long split_stride, int m, int n, int k, int k_chunk, int accumulate) {              \
        fastlstm::gemm::tile<T, TA, TB>(a, lda, b, ldb, out, ldo, split_stride, m, n, k,        \
                                        k_chunk, accumulate);                                    \
    }

#define FASTLSTM_GEMM(SUFFIX, T)                                                                 \
    FASTLSTM_GEMM_TILE(nn, SUFFIX, T, false, false)                                              \
    FASTLSTM_GEMM_TILE(nt, SUFFIX, T, false, true)                                               \
    FASTLSTM_GEMM_TILE(tn, SUFFIX, T, true, false)                                               \
    FASTLSTM_GEMM_TILE(tt, SUFFIX, T, true, true)                                                \
    extern "C" __global__ void fastlstm_gemm_sum_splits_##SUFFIX(                                \
        const T* partials, int splits, long long split_stride, T* c, long long ldc, int m,      \
        int n, int accumulate) {                                                                 \
        fastlstm::gemm::sum_splits<T>(partials, splits, split_stride, c, ldc, m, n, accumulate); \
    }

FASTLSTM_GEMM(f32, float)
FASTLSTM_GEMM(f64, double)
