// Per-step recurrence kernels: one launch per time step (llm.c style, the simple version beside
// the persistent one in lstm_persistent.cu).  Grid: (slices of JS hidden units, chunks of BC
// batch rows); the weight slice is staged in shared memory KC rows at a time, so any H fits.
// A block whose chunk holds no row active at the step returns at once (`Schedule`,
// lstm_core.cuh): the launch count never depends on the lengths, so a captured CUDA graph
// serves every batch of its shape.
// Dynamic shared memory: (KC*ncol + KC*BC + 32*V*blockDim/32) elements.
// Each recurrence kernel comes plain and with dropout compiled in (`_dropout`, see the top of
// lstm_core.cuh); both take the same arguments, the plain one ignores the dropout's.
//
// Also the layout kernels: a column gather (packing the input, gathering each row's last
// state, unpacking the input's gradient), the zeroing of the columns past the packed steps, and
// a gather through a dropout mask (the masked h_{t-1} for the weight gradient of W_hh, the
// gradient w.r.t. a masked h0).
#include "lstm_core.cuh"

namespace fastlstm {

template <typename T, bool DROPOUT>
__device__ void forward_step(const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c,
                             int H, long long ld_seq, long long ld_state, const Schedule& sched,
                             const Dropout& drop, T* dropped, int t, int store_gates, int JS,
                             int BC, int KC) {
    const Step step = schedule_step(sched, t);
    const int b0 = blockIdx.y * BC;
    if (b0 >= step.rows) return;  // the whole block: no row of its chunk is active
    FASTLSTM_DYNAMIC_SHARED(smem);
    const Tile tile{H, 4 * JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, KC, tile);
    const ForwardWeights<T> weights{w_hh, H, j0};
    const ForwardEpilogue<T, DROPOUT> epi{b_ih, b_hh, xg, h, c, ld_seq, ld_state, H, j0,
                                          store_gates, step, drop, dropped};
    forward_step_chunks<T, false, DROPOUT>(weights, epi, tile, sh, b0, b0 + BC);
}

template <typename T, int V, bool DROPOUT>
__device__ void backward_step(const T* w_hh, const T* gates, const T* c, const T* dh_last,
                              const T* dh_seq, T* dz, T* dc, int H, int B, long long ld_seq,
                              long long ld_state, const Schedule& sched, const Dropout& drop,
                              int t, int JS, int BC, int KC) {
    const Step step = schedule_step(sched, t);
    const int b0 = blockIdx.y * BC;
    if (b0 >= step.rows) return;
    FASTLSTM_DYNAMIC_SHARED(smem);
    const Tile tile{4 * H, JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, KC, tile);
    const BackwardWeights<T> weights{w_hh, H, j0};
    const BackwardEpilogue<T, V, DROPOUT> epi{gates, c, dh_last, dh_seq, dz, dc, ld_seq,
                                              ld_state, H, B, j0, step, drop};
    backward_step_chunks<T, V, false, DROPOUT>(weights, epi, tile, sh, b0, b0 + BC);
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

// dst[f, c] = src[f, from] * mask(caller's row rows[c] / steps, time step rows[c] % steps,
// unit f), from = idx[c] (or c where idx is null: in place), for f < features, c < cols; zero
// where from < 0.  src and dst feature-major (row lengths ld_src, ld_dst).  The weight gradient
// of W_hh needs h_{t-1} as the recurrence read it, masked: rather than keep a masked copy of
// every step from the forward pass, backward regathers it through the mask, with the schedule's
// `prev` (the state column each packed column started from) and `x` (the caller's row * T +
// step of each packed column).  The gradient w.r.t. h0 takes the mask in place (rows: the
// schedule's `row`, steps 1).
template <typename T>
__device__ void mask_columns(const T* src, long long ld_src, const int* idx, T* dst,
                             long long ld_dst, int features, int cols, const Mask mask,
                             const int* rows, int steps) {
    const long long n = (long long)features * cols;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int f = (int)(e / cols);
        const int c = (int)(e % cols);
        const long long from = idx != nullptr ? idx[c] : c;
        const int r = rows[c];
        dst[f * ld_dst + c] = from >= 0 && r >= 0
                                  ? src[f * ld_src + from] * mask.value<T>(r / steps, r % steps, f)
                                  : T(0);
    }
}

}  // namespace fastlstm

// active, xcol, scol, steps, reverse: the recurrence's fastlstm::Schedule; t: the time step;
// row, recurrent_mask, between_mask: its fastlstm::Dropout (read with dropout compiled in);
// dropped: where the forward writes its masked output (with a between mask).
#define FASTLSTM_FORWARD_STEP(NAME, SUFFIX, T, DROPOUT)                                         \
    extern "C" __global__ void fastlstm_##NAME##_##SUFFIX(                                        \
        const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c, int H,                    \
        long long ld_seq, long long ld_state, const int* active, const int* xcol,                 \
        const int* scol, int steps, int reverse, const int* row,                                  \
        const unsigned long long* recurrent_mask, const unsigned long long* between_mask,         \
        T* dropped, int t, int store_gates, int JS, int BC, int KC) {                             \
        const fastlstm::Schedule sched{active, xcol, scol, steps, reverse};                       \
        const fastlstm::Dropout drop{row, {recurrent_mask}, {between_mask}};                      \
        fastlstm::forward_step<T, DROPOUT>(w_hh, b_ih, b_hh, xg, h, c, H, ld_seq, ld_state,       \
                                           sched, drop, dropped, t, store_gates, JS, BC, KC);     \
    }

#define FASTLSTM_BACKWARD_STEP(NAME, SUFFIX, T, V, DROPOUT)                                      \
    extern "C" __global__ void fastlstm_##NAME##_v##V##_##SUFFIX(                                 \
        const T* w_hh, const T* gates, const T* c, const T* dh_last, const T* dh_seq, T* dz,      \
        T* dc, int H, int B, long long ld_seq, long long ld_state, const int* active,             \
        const int* xcol, const int* scol, int steps, int reverse, const int* row,                 \
        const unsigned long long* recurrent_mask, const unsigned long long* between_mask, int t,  \
        int JS, int BC, int KC) {                                                                 \
        const fastlstm::Schedule sched{active, xcol, scol, steps, reverse};                       \
        const fastlstm::Dropout drop{row, {recurrent_mask}, {between_mask}};                      \
        fastlstm::backward_step<T, V, DROPOUT>(w_hh, gates, c, dh_last, dh_seq, dz, dc, H, B,     \
                                               ld_seq, ld_state, sched, drop, t, JS, BC, KC);     \
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
    }                                                                                           \
    extern "C" __global__ void fastlstm_mask_columns_##SUFFIX(                                  \
        const T* src, long long ld_src, const int* idx, T* dst, long long ld_dst, int features, \
        int cols, const unsigned long long* mask, const int* rows, int steps) {                 \
        fastlstm::mask_columns<T>(src, ld_src, idx, dst, ld_dst, features, cols, {mask}, rows,  \
                                  steps);                                                       \
    }

FASTLSTM_FORWARD_STEP(forward_step, f32, float, false)
FASTLSTM_FORWARD_STEP(forward_step, f64, double, false)
FASTLSTM_FORWARD_STEP(forward_step_dropout, f32, float, true)
FASTLSTM_FORWARD_STEP(forward_step_dropout, f64, double, true)
FASTLSTM_BACKWARD_STEP(backward_step, f32, float, 1, false)
FASTLSTM_BACKWARD_STEP(backward_step, f64, double, 1, false)
FASTLSTM_BACKWARD_STEP(backward_step, f32, float, 4, false)
FASTLSTM_BACKWARD_STEP(backward_step, f64, double, 4, false)
FASTLSTM_BACKWARD_STEP(backward_step_dropout, f32, float, 1, true)
FASTLSTM_BACKWARD_STEP(backward_step_dropout, f64, double, 1, true)
FASTLSTM_BACKWARD_STEP(backward_step_dropout, f32, float, 4, true)
FASTLSTM_BACKWARD_STEP(backward_step_dropout, f64, double, 4, true)
FASTLSTM_LAYOUT(f32, float)
FASTLSTM_LAYOUT(f64, double)
