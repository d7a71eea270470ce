// Persistent recurrence kernels: ONE cooperative launch runs all T steps of a layer.  Each
// block keeps its slice of W_hh (JS hidden units: 4*JS rows x H forwards, 4H x JS backwards) in
// shared memory for the whole sequence, and a grid-wide barrier separates the steps.  The host
// (fastlstm/backends/cuda_support.py) launches it only where every block is co-resident
// (cooperative launch checks this too) and the slice fits in shared memory; elsewhere the
// per-step kernels of lstm_step.cu run.
// Dynamic shared memory: (K*ncol + KC*BC + 32*V*blockDim/32) elements, K = H or 4H.
#include <cooperative_groups.h>

#include "lstm_core.cuh"

namespace fastlstm {

template <typename T>
__device__ void forward_persistent(const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c,
                                   int H, int B, int steps, int slots, int store_gates, int JS,
                                   int BC, int KC) {
    FASTLSTM_DYNAMIC_SHARED(smem);
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    const Tile tile{H, 4 * JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, H, tile);
    const ForwardWeights<T> weights{w_hh, H, j0};
    load_weights(sh.ws, weights, 0, H, tile.ncol);
    __syncthreads();
    for (int t = 0; t < steps; ++t) {
        const ForwardEpilogue<T> epi{b_ih, b_hh, xg, h, c, H, B, steps, slots, t, j0, store_gates};
        forward_step_chunks<T, true>(weights, epi, tile, sh, 0, B);
        grid.sync();
    }
}

template <typename T, int V>
__device__ void backward_persistent(const T* w_hh, const T* gates, const T* c, const T* dh_last,
                                    const T* dh_seq, T* dz, T* dc, int H, int B, int steps, int JS,
                                    int BC, int KC) {
    FASTLSTM_DYNAMIC_SHARED(smem);
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    const Tile tile{4 * H, JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, 4 * H, tile);
    const BackwardWeights<T> weights{w_hh, H, j0};
    load_weights(sh.ws, weights, 0, 4 * H, tile.ncol);
    __syncthreads();
    for (int t = steps - 1; t >= 0; --t) {
        const BackwardEpilogue<T, V> epi{gates, c, dh_last, dh_seq, dz, dc, H, B, steps, t, j0};
        backward_step_chunks<T, V, true>(weights, epi, tile, sh, 0, B);
        grid.sync();
    }
}

}  // namespace fastlstm

#define FASTLSTM_FORWARD_PERSISTENT(SUFFIX, T)                                                  \
    extern "C" __global__ void fastlstm_forward_persistent_##SUFFIX(                            \
        const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c, int H, int B, int steps, \
        int slots, int store_gates, int JS, int BC, int KC) {                                   \
        fastlstm::forward_persistent<T>(w_hh, b_ih, b_hh, xg, h, c, H, B, steps, slots,        \
                                        store_gates, JS, BC, KC);                               \
    }

#define FASTLSTM_BACKWARD_PERSISTENT(SUFFIX, T, V)                                              \
    extern "C" __global__ void fastlstm_backward_persistent_v##V##_##SUFFIX(                    \
        const T* w_hh, const T* gates, const T* c, const T* dh_last, const T* dh_seq, T* dz,    \
        T* dc, int H, int B, int steps, int JS, int BC, int KC) {                               \
        fastlstm::backward_persistent<T, V>(w_hh, gates, c, dh_last, dh_seq, dz, dc, H, B,     \
                                            steps, JS, BC, KC);                                 \
    }

FASTLSTM_FORWARD_PERSISTENT(f32, float)
FASTLSTM_FORWARD_PERSISTENT(f64, double)
FASTLSTM_BACKWARD_PERSISTENT(f32, float, 1)
FASTLSTM_BACKWARD_PERSISTENT(f64, double, 1)
FASTLSTM_BACKWARD_PERSISTENT(f32, float, 4)
FASTLSTM_BACKWARD_PERSISTENT(f64, double, 4)
