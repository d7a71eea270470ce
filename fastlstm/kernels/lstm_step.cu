// Per-step recurrence kernels: one launch per time step (llm.c style, the simple version beside
// the persistent one in lstm_persistent.cu).  Grid: (slices of JS hidden units, chunks of BC
// batch rows); the weight slice is staged in shared memory KC rows at a time, so any H fits.
// Dynamic shared memory: (KC*ncol + KC*BC + 32*V*blockDim/32) elements.
#include "lstm_core.cuh"

namespace fastlstm {

template <typename T>
__device__ void forward_step(const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c,
                             int H, int B, int steps, int slots, int t, int store_gates, int JS,
                             int BC, int KC) {
    FASTLSTM_DYNAMIC_SHARED(smem);
    const Tile tile{H, 4 * JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, KC, tile);
    const ForwardWeights<T> weights{w_hh, H, j0};
    const ForwardEpilogue<T> epi{b_ih, b_hh, xg, h, c, H, B, steps, slots, t, j0, store_gates};
    const int b0 = blockIdx.y * BC;
    forward_step_chunks<T, false>(weights, epi, tile, sh, b0, b0 + BC);
}

template <typename T, int V>
__device__ void backward_step(const T* w_hh, const T* gates, const T* c, const T* dh_last,
                              const T* dh_seq, T* dz, T* dc, int H, int B, int steps, int t,
                              int JS, int BC, int KC) {
    FASTLSTM_DYNAMIC_SHARED(smem);
    const Tile tile{4 * H, JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, KC, tile);
    const BackwardWeights<T> weights{w_hh, H, j0};
    const BackwardEpilogue<T, V> epi{gates, c, dh_last, dh_seq, dz, dc, H, B, steps, t, j0};
    const int b0 = blockIdx.y * BC;
    backward_step_chunks<T, V, false>(weights, epi, tile, sh, b0, b0 + BC);
}

}  // namespace fastlstm

#define FASTLSTM_FORWARD_STEP(SUFFIX, T)                                                        \
    extern "C" __global__ void fastlstm_forward_step_##SUFFIX(                                  \
        const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c, int H, int B, int steps, \
        int slots, int t, int store_gates, int JS, int BC, int KC) {                            \
        fastlstm::forward_step<T>(w_hh, b_ih, b_hh, xg, h, c, H, B, steps, slots, t,           \
                                  store_gates, JS, BC, KC);                                     \
    }

#define FASTLSTM_BACKWARD_STEP(SUFFIX, T, V)                                                    \
    extern "C" __global__ void fastlstm_backward_step_v##V##_##SUFFIX(                          \
        const T* w_hh, const T* gates, const T* c, const T* dh_last, const T* dh_seq, T* dz,    \
        T* dc, int H, int B, int steps, int t, int JS, int BC, int KC) {                        \
        fastlstm::backward_step<T, V>(w_hh, gates, c, dh_last, dh_seq, dz, dc, H, B, steps, t, \
                                      JS, BC, KC);                                              \
    }

FASTLSTM_FORWARD_STEP(f32, float)
FASTLSTM_FORWARD_STEP(f64, double)
FASTLSTM_BACKWARD_STEP(f32, float, 1)
FASTLSTM_BACKWARD_STEP(f64, double, 1)
FASTLSTM_BACKWARD_STEP(f32, float, 4)
FASTLSTM_BACKWARD_STEP(f64, double, 4)
