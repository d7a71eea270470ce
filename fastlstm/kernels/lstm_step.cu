// Per-step recurrence kernels: one launch per time step (llm.c style, the simple version beside
// the persistent one in lstm_persistent.cu).  Grid: (slices of JS hidden units, chunks of BC
// batch rows); the weight slice is staged in shared memory KC rows at a time, so any H fits.
// A block whose chunk holds no row active at the step returns at once (`Schedule`,
// lstm_core.cuh): the launch count never depends on the lengths, so a captured CUDA graph
// serves every batch of its shape.
// Dynamic shared memory: (KC*ncol + KC*BC + 32*V*blockDim/32) elements.
//
// Also the two layout kernels of variable-length batches: a column gather (packing the input,
// gathering each row's last state, unpacking the input's gradient) and the zeroing of the
// columns past the packed steps.
#include "lstm_core.cuh"

namespace fastlstm {

template <typename T>
__device__ void forward_step(const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c,
                             int H, long long ld_seq, long long ld_state, const Schedule& sched,
                             int t, int store_gates, int JS, int BC, int KC) {
    const Step step = schedule_step(sched, t);
    const int b0 = blockIdx.y * BC;
    if (b0 >= step.rows) return;  // the whole block: no row of its chunk is active
    FASTLSTM_DYNAMIC_SHARED(smem);
    const Tile tile{H, 4 * JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, KC, tile);
    const ForwardWeights<T> weights{w_hh, H, j0};
    const ForwardEpilogue<T> epi{b_ih, b_hh, xg, h, c, ld_seq, ld_state, H, j0, store_gates,
                                 step};
    forward_step_chunks<T, false>(weights, epi, tile, sh, b0, b0 + BC);
}

template <typename T, int V>
__device__ void backward_step(const T* w_hh, const T* gates, const T* c, const T* dh_last,
                              const T* dh_seq, T* dz, T* dc, int H, int B, long long ld_seq,
                              long long ld_state, const Schedule& sched, int t, int JS, int BC,
                              int KC) {
    const Step step = schedule_step(sched, t);
    const int b0 = blockIdx.y * BC;
    if (b0 >= step.rows) return;
    FASTLSTM_DYNAMIC_SHARED(smem);
    const Tile tile{4 * H, JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, KC, tile);
    const BackwardWeights<T> weights{w_hh, H, j0};
    const BackwardEpilogue<T, V> epi{gates, c, dh_last, dh_seq, dz, dc, ld_seq, ld_state, H, B,
                                     j0, step};
    backward_step_chunks<T, V, false>(weights, epi, tile, sh, b0, b0 + BC);
}

// dst[c, f] = src[idx[c], f] for c < cols, f < features, zero where idx[c] < 0; each matrix
// with its own strides (elements) between columns and between features.
template <typename T>
__device__ void gather_columns(const T* src, long long src_col, long long src_feature,
                               const int* idx, T* dst, long long dst_col, long long dst_feature,
                               int features, int cols) {
    const long long n = (long long)features * cols;
    const bool features_inner = dst_feature == 1;  // walk dst contiguously
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const long long col = features_inner ? e / features : e % cols;
        const long long f = features_inner ? e % features : e / cols;
        const long long from = idx[col];
        dst[col * dst_col + f * dst_feature] =
            from >= 0 ? src[from * src_col + f * src_feature] : T(0);
    }
}

// a[r, c] = 0 for r < rows and *first <= c < cols (a: row length ld): the columns past the
// packed steps, whose count the host wrote for this batch.
template <typename T>
__device__ void zero_tail(T* a, long long ld, int rows, const int* first, int cols) {
    const long long begin = *first;
    const long long width = cols - begin;
    if (width <= 0) return;
    const long long n = rows * width;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x)
        a[(e / width) * ld + begin + e % width] = T(0);
}

}  // namespace fastlstm

// active, xcol, scol, steps, reverse: the recurrence's fastlstm::Schedule; t: the time step.
#define FASTLSTM_FORWARD_STEP(SUFFIX, T)                                                        \
    extern "C" __global__ void fastlstm_forward_step_##SUFFIX(                                  \
        const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c, int H,                  \
        long long ld_seq, long long ld_state, const int* active, const int* xcol,               \
        const int* scol, int steps, int reverse, int t, int store_gates, int JS, int BC,        \
        int KC) {                                                                               \
        const fastlstm::Schedule sched{active, xcol, scol, steps, reverse};                     \
        fastlstm::forward_step<T>(w_hh, b_ih, b_hh, xg, h, c, H, ld_seq, ld_state, sched, t,   \
                                  store_gates, JS, BC, KC);                                     \
    }

#define FASTLSTM_BACKWARD_STEP(SUFFIX, T, V)                                                    \
    extern "C" __global__ void fastlstm_backward_step_v##V##_##SUFFIX(                          \
        const T* w_hh, const T* gates, const T* c, const T* dh_last, const T* dh_seq, T* dz,    \
        T* dc, int H, int B, long long ld_seq, long long ld_state, const int* active,           \
        const int* xcol, const int* scol, int steps, int reverse, int t, int JS, int BC,        \
        int KC) {                                                                               \
        const fastlstm::Schedule sched{active, xcol, scol, steps, reverse};                     \
        fastlstm::backward_step<T, V>(w_hh, gates, c, dh_last, dh_seq, dz, dc, H, B, ld_seq,   \
                                      ld_state, sched, t, JS, BC, KC);                          \
    }

#define FASTLSTM_LAYOUT(SUFFIX, T)                                                              \
    extern "C" __global__ void fastlstm_gather_columns_##SUFFIX(                                \
        const T* src, long long src_col, long long src_feature, const int* idx, T* dst,         \
        long long dst_col, long long dst_feature, int features, int cols) {                     \
        fastlstm::gather_columns<T>(src, src_col, src_feature, idx, dst, dst_col, dst_feature,  \
                                    features, cols);                                            \
    }                                                                                           \
    extern "C" __global__ void fastlstm_zero_tail_##SUFFIX(T* a, long long ld, int rows,       \
                                                           const int* first, int cols) {        \
        fastlstm::zero_tail<T>(a, ld, rows, first, cols);                                       \
    }

FASTLSTM_FORWARD_STEP(f32, float)
FASTLSTM_FORWARD_STEP(f64, double)
FASTLSTM_BACKWARD_STEP(f32, float, 1)
FASTLSTM_BACKWARD_STEP(f64, double, 1)
FASTLSTM_BACKWARD_STEP(f32, float, 4)
FASTLSTM_BACKWARD_STEP(f64, double, 4)
FASTLSTM_LAYOUT(f32, float)
FASTLSTM_LAYOUT(f64, double)
