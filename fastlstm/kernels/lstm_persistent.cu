// Persistent recurrence kernels: ONE cooperative launch runs all T steps of a layer in one
// direction.  Each block keeps its slice of W_hh (JS hidden units: 4*JS rows x H forwards, 4H x
// JS backwards) in shared memory for the whole sequence, and a grid-wide barrier separates the
// steps.  None follows the last step: within a step no block reads what another writes in it
// (forwards it reads the state columns of the step before and writes its own; backwards it
// reads the dz of the step after and writes its own, and dc is each thread's own), and the
// kernel's end orders the last step's writes before whatever reads them.  The host
// (fastlstm/backends/cuda_support.py) launches it only where every block is co-resident
// (cooperative launch checks this too) and the slice fits in shared memory; elsewhere the
// per-step kernels of lstm_step.cu run.  Each step covers its active rows only (`Schedule`,
// lstm_core.cuh); a step with none is skipped by every block alike.  Each kernel comes plain and
// with dropout compiled in (`_dropout`), as in lstm_step.cu.
// Dynamic shared memory: (K*ncol + KC*BC + 32*V*blockDim/32) elements, K = H or 4H.
#include <cooperative_groups.h>

#include "lstm_core.cuh"

namespace fastlstm {

template <typename T, bool DROPOUT>
__device__ void forward_persistent(const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c,
                                   int H, long long ld_seq, long long ld_state,
                                   const Schedule& sched, const Dropout& drop, T* dropped,
                                   int store_gates, int JS, int BC, int KC) {
    FASTLSTM_DYNAMIC_SHARED(smem);
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    const Tile tile{H, 4 * JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, H, tile);
    const ForwardWeights<T> weights{w_hh, H, j0};
    weights.load(sh.ws, 0, H, tile.ncol);
    __syncthreads();
    bool after_a_step = false;
    for (int s = 0; s < sched.steps; ++s) {
        const int t = sched.reverse ? sched.steps - 1 - s : s;
        const Step step = schedule_step(sched, t);
        if (step.rows == 0) continue;  // the same for every block: no barrier is missed
        if (after_a_step) grid.sync();  // step t reads the state all blocks wrote at the one before
        after_a_step = true;
        const ForwardEpilogue<T, DROPOUT> epi{b_ih, b_hh, xg, h, c, ld_seq, ld_state, H, j0,
                                              store_gates, step, drop, dropped};
        forward_step_chunks<T, true, DROPOUT>(weights, epi, tile, sh, 0, step.rows);
    }
}

template <typename T, int V, bool DROPOUT>
__device__ void backward_persistent(const T* w_hh, const T* gates, const T* c, const T* dh_last,
                                    const T* dh_seq, T* dz, T* dc, int H, int B, long long ld_seq,
                                    long long ld_state, const Schedule& sched,
                                    const Dropout& drop, int JS, int BC, int KC) {
    FASTLSTM_DYNAMIC_SHARED(smem);
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    const Tile tile{4 * H, JS, BC, KC};
    const int j0 = blockIdx.x * JS;
    const SharedLayout<T> sh(smem, 4 * H, tile);
    const BackwardWeights<T> weights{w_hh, H, j0};
    weights.load(sh.ws, 0, 4 * H, tile.ncol);
    __syncthreads();
    bool after_a_step = false;
    for (int s = 0; s < sched.steps; ++s) {  // the forward pass's steps, last first
        const int t = sched.reverse ? s : sched.steps - 1 - s;
        const Step step = schedule_step(sched, t);
        if (step.rows == 0) continue;
        if (after_a_step) grid.sync();  // step t reads the dz every block wrote at the one after
        after_a_step = true;
        const BackwardEpilogue<T, V, DROPOUT> epi{gates, c, dh_last, dh_seq, dz, dc, ld_seq,
                                                  ld_state, H, B, j0, step, drop};
        backward_step_chunks<T, V, true, DROPOUT>(weights, epi, tile, sh, 0, step.rows);
    }
}

}  // namespace fastlstm

// active, xcol, scol, steps, reverse: the recurrence's fastlstm::Schedule; row, recurrent_mask,
// between_mask: its fastlstm::Dropout (read with dropout compiled in); dropped: where the forward
// writes its masked output (with a between mask).
#define FASTLSTM_FORWARD_PERSISTENT(NAME, SUFFIX, T, DROPOUT)                                    \
    extern "C" __global__ void fastlstm_##NAME##_##SUFFIX(                                        \
        const T* w_hh, const T* b_ih, const T* b_hh, T* xg, T* h, T* c, int H,                    \
        long long ld_seq, long long ld_state, const int* active, const int* xcol,                 \
        const int* scol, int steps, int reverse, const int* row,                                  \
        const unsigned long long* recurrent_mask, const unsigned long long* between_mask,         \
        T* dropped, int store_gates, int JS, int BC, int KC) {                                    \
        const fastlstm::Schedule sched{active, xcol, scol, steps, reverse};                       \
        const fastlstm::Dropout drop{row, {recurrent_mask}, {between_mask}};                      \
        fastlstm::forward_persistent<T, DROPOUT>(w_hh, b_ih, b_hh, xg, h, c, H, ld_seq,           \
                                                 ld_state, sched, drop, dropped, store_gates, JS, \
                                                 BC, KC);                                         \
    }

#define FASTLSTM_BACKWARD_PERSISTENT(NAME, SUFFIX, T, V, DROPOUT)                                \
    extern "C" __global__ void fastlstm_##NAME##_v##V##_##SUFFIX(                                 \
        const T* w_hh, const T* gates, const T* c, const T* dh_last, const T* dh_seq, T* dz,      \
        T* dc, int H, int B, long long ld_seq, long long ld_state, const int* active,             \
        const int* xcol, const int* scol, int steps, int reverse, const int* row,                 \
        const unsigned long long* recurrent_mask, const unsigned long long* between_mask,         \
        int JS, int BC, int KC) {                                                                 \
        const fastlstm::Schedule sched{active, xcol, scol, steps, reverse};                       \
        const fastlstm::Dropout drop{row, {recurrent_mask}, {between_mask}};                      \
        fastlstm::backward_persistent<T, V, DROPOUT>(w_hh, gates, c, dh_last, dh_seq, dz, dc, H,  \
                                                     B, ld_seq, ld_state, sched, drop, JS, BC,    \
                                                     KC);                                         \
    }

FASTLSTM_FORWARD_PERSISTENT(forward_persistent, f32, float, false)
FASTLSTM_FORWARD_PERSISTENT(forward_persistent, f64, double, false)
FASTLSTM_FORWARD_PERSISTENT(forward_persistent_dropout, f32, float, true)
FASTLSTM_FORWARD_PERSISTENT(forward_persistent_dropout, f64, double, true)
FASTLSTM_BACKWARD_PERSISTENT(backward_persistent, f32, float, 1, false)
FASTLSTM_BACKWARD_PERSISTENT(backward_persistent, f64, double, 1, false)
FASTLSTM_BACKWARD_PERSISTENT(backward_persistent, f32, float, 4, false)
FASTLSTM_BACKWARD_PERSISTENT(backward_persistent, f64, double, 4, false)
FASTLSTM_BACKWARD_PERSISTENT(backward_persistent_dropout, f32, float, 1, true)
FASTLSTM_BACKWARD_PERSISTENT(backward_persistent_dropout, f64, double, 1, true)
FASTLSTM_BACKWARD_PERSISTENT(backward_persistent_dropout, f32, float, 4, true)
FASTLSTM_BACKWARD_PERSISTENT(backward_persistent_dropout, f64, double, 4, true)
