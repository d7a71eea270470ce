// Device code shared by the per-step (lstm_step.cu) and persistent (lstm_persistent.cu)
// recurrence kernels: the same equations as fastlstm/kernels/lstm_cpu.py, PyTorch's gate order (i, f, g, o).
//
// Layouts ("feature-major": batch is the fastest index, so a warp's 32 lanes, which own 32
// consecutive batch rows, make coalesced accesses):
//   xg, gates, dz : (4H, T*B)      row r = gate*H + unit, column t*B + b
//   h, c          : (H, S*B)       column s*B + b; slot 0 holds the initial state and step t
//                                  reads slot t % S and writes slot (t + 1) % S (S = T + 1 keeps
//                                  every step; S = 2 alternates two slots for inference)
//   dh_last, dc   : (H, B)
//   dh_seq        : (H, T*B)       gradient w.r.t. each step's output, from the layer above
//
// Work split: a block owns JS consecutive hidden units (a "slice").  Per step it computes the
// dot products of its slice for all batch rows, chunk by chunk (BC rows, a multiple of 32): one
// warp task = V weight columns x 32 batch rows, one batch row per lane; when there are fewer
// tasks than warps, the K dimension is split across warps (KS parts) and the parts are summed in
// a fixed order (deterministic).  The input rows (h_{t-1} forwards, dz_{t+1} backwards) are
// staged in shared memory KC rows at a time; the weight slice is either resident in shared
// memory for the whole kernel (persistent) or staged KC rows at a time (per-step).
#pragma once

// The block's dynamic shared memory (a hook, so that tests can run these kernels on the CPU).
#ifndef FASTLSTM_DYNAMIC_SHARED
#define FASTLSTM_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastlstm {

template <typename T> __device__ __forceinline__ T dev_exp(T x);
template <> __device__ __forceinline__ float dev_exp<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ double dev_exp<double>(double x) { return exp(x); }

template <typename T> __device__ __forceinline__ T dev_tanh(T x);
template <> __device__ __forceinline__ float dev_tanh<float>(float x) { return tanhf(x); }
template <> __device__ __forceinline__ double dev_tanh<double>(double x) { return tanh(x); }

// Logistic function that never overflows: exp is only taken of -|z|.
template <typename T>
__device__ __forceinline__ T sigmoid(T z) {
    if (z >= T(0)) return T(1) / (T(1) + dev_exp(-z));
    const T e = dev_exp(z);
    return e / (T(1) + e);
}

// Shape of the block-level dot products.
struct Tile {
    int K;     // length of each dot product: H forwards, 4H backwards
    int ncol;  // weight columns of the slice: 4*JS forwards (column = unit*4 + gate), JS backwards
    int BC;    // batch rows per chunk, a multiple of 32
    int KC;    // input rows staged per pass
};

// Weight column `col` of the forward slice starting at unit j0: W_hh[gate*H + j0 + unit, k].
template <typename T>
struct ForwardWeights {
    const T* w_hh;
    int H, j0;
    __device__ T operator()(int k, int col) const {
        const int j = j0 + (col >> 2);
        return j < H ? w_hh[((long long)(col & 3) * H + j) * H + k] : T(0);
    }
};

// Weight column `col` of the backward slice: W_hh[k, j0 + col] (k runs over all 4H gate rows).
template <typename T>
struct BackwardWeights {
    const T* w_hh;
    int H, j0;
    __device__ T operator()(int k, int col) const {
        const int j = j0 + col;
        return j < H ? w_hh[(long long)k * H + j] : T(0);
    }
};

// Copy rows [k0, k0 + rows) of the slice's weights into shared memory (row-major, ncol wide).
template <typename T, class Weights>
__device__ void load_weights(T* ws, const Weights& weights, int k0, int rows, int ncol) {
    for (int e = threadIdx.x; e < rows * ncol; e += blockDim.x) {
        const int kk = e / ncol;
        ws[e] = weights(k0 + kk, e - kk * ncol);
    }
}

// One chunk of batch rows [b0, b0 + BC): acc[v] = sum_k in[k, col_in + b] * w[k, task*V + v]
// for each warp task, then epi(column group, b, acc) for every valid row.  `in == nullptr`
// means no recurrent input (acc = 0).  Every thread of the block must call this (it syncs).
template <typename T, int V, bool RESIDENT, class Weights, class Epilogue>
__device__ void chunk_dot(const T* __restrict__ in, long long ld_in, long long col_in, int B,
                          int b0, const Tile& tile, T* ws, T* stage, T* partial,
                          const Weights& weights, const Epilogue& epi) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    const int slabs = tile.BC >> 5;
    const int tasks = (tile.ncol / V) * slabs;  // the planner guarantees tasks <= nwarps
    const int parts = nwarps / tasks > 1 ? nwarps / tasks : 1;
    const int task = warp % tasks;
    const int part = warp / tasks;
    const bool active = part < parts;
    const int group = task / slabs;
    const int row = (task - group * slabs) * 32 + lane;  // batch row within the chunk

    T acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = T(0);

    if (in != nullptr) {
        for (int k0 = 0; k0 < tile.K; k0 += tile.KC) {
            const int kc = min(tile.KC, tile.K - k0);
            for (int e = threadIdx.x; e < kc * tile.BC; e += blockDim.x) {
                const int kk = e / tile.BC;
                const int b = b0 + (e - kk * tile.BC);
                // __ldcg: the rows were written by other blocks (persistent kernel); bypass L1.
                stage[e] = b < B ? __ldcg(in + (long long)(k0 + kk) * ld_in + col_in + b) : T(0);
            }
            if (!RESIDENT) load_weights(ws, weights, k0, kc, tile.ncol);
            __syncthreads();
            if (active) {
                const T* w = (RESIDENT ? ws + (long long)k0 * tile.ncol : ws) + group * V;
                for (int kk = part; kk < kc; kk += parts) {
                    const T x = stage[kk * tile.BC + row];
                    const T* wk = w + kk * tile.ncol;
#pragma unroll
                    for (int v = 0; v < V; ++v) acc[v] += x * wk[v];
                }
            }
            __syncthreads();
        }
    }

    if (parts > 1) {
        if (active) {
#pragma unroll
            for (int v = 0; v < V; ++v) partial[(warp * V + v) * 32 + lane] = acc[v];
        }
        __syncthreads();
        if (active && part == 0) {
            for (int p = 1; p < parts; ++p) {
#pragma unroll
                for (int v = 0; v < V; ++v) acc[v] += partial[((p * tasks + task) * V + v) * 32 + lane];
            }
        }
        __syncthreads();
    }
    if (active && part == 0 && b0 + row < B) epi(group, b0 + row, acc);
}

// Forward pointwise step for unit j0 + group, batch row b: gates, cell and hidden state.
template <typename T>
struct ForwardEpilogue {
    const T* b_ih;
    const T* b_hh;
    T* xg;
    T* h;
    T* c;
    int H, B, steps, slots, t, j0, store_gates;
    __device__ void operator()(int group, int b, const T (&z)[4]) const {
        const int j = j0 + group;
        if (j >= H) return;
        const long long tb = (long long)steps * B;
        const long long col = (long long)t * B + b;
        T a[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int r = q * H + j;
            a[q] = z[q] + xg[r * tb + col] + b_ih[r] + b_hh[r];
        }
        const T i = sigmoid(a[0]);
        const T f = sigmoid(a[1]);
        const T g = dev_tanh(a[2]);
        const T o = sigmoid(a[3]);
        const long long sb = (long long)slots * B;
        const long long prev = (long long)j * sb + (long long)(t % slots) * B + b;
        const long long next = (long long)j * sb + (long long)((t + 1) % slots) * B + b;
        const T cell = f * c[prev] + i * g;
        c[next] = cell;
        h[next] = o * dev_tanh(cell);
        if (store_gates) {
            xg[(long long)j * tb + col] = i;
            xg[((long long)H + j) * tb + col] = f;
            xg[((long long)2 * H + j) * tb + col] = g;
            xg[((long long)3 * H + j) * tb + col] = o;
        }
    }
};

// Backward pointwise step for units j0 + group*V + v, batch row b, given the recurrent part of
// dL/dh_t (dz_{t+1} @ W_hh, zero at the last step): writes dz_t and carries dc.
template <typename T, int V>
struct BackwardEpilogue {
    const T* gates;
    const T* c;        // (H, (T+1)*B)
    const T* dh_last;  // (H, B) or nullptr: gradient w.r.t. the last hidden state
    const T* dh_seq;   // (H, T*B) or nullptr
    T* dz;
    T* dc;             // (H, B): carried between steps, dL/dc_0 at the end
    int H, B, steps, t, j0;
    __device__ void operator()(int group, int b, const T (&dh_rec)[V]) const {
        const long long tb = (long long)steps * B;
        const long long sb = tb + B;
        const long long col = (long long)t * B + b;
        const bool last = t == steps - 1;
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const int j = j0 + group * V + v;
            if (j >= H) return;
            T grad_h = dh_rec[v];
            if (last && dh_last != nullptr) grad_h += dh_last[(long long)j * B + b];
            if (dh_seq != nullptr) grad_h += dh_seq[(long long)j * tb + col];
            const T i = gates[(long long)j * tb + col];
            const T f = gates[((long long)H + j) * tb + col];
            const T g = gates[((long long)2 * H + j) * tb + col];
            const T o = gates[((long long)3 * H + j) * tb + col];
            const T tc = dev_tanh(c[(long long)j * sb + col + B]);
            const T c_prev = c[(long long)j * sb + col];
            const T grad_c = (last ? T(0) : dc[(long long)j * B + b]) + grad_h * o * (T(1) - tc * tc);
            dz[(long long)j * tb + col] = grad_c * g * i * (T(1) - i);
            dz[((long long)H + j) * tb + col] = grad_c * c_prev * f * (T(1) - f);
            dz[((long long)2 * H + j) * tb + col] = grad_c * i * (T(1) - g * g);
            dz[((long long)3 * H + j) * tb + col] = grad_h * tc * o * (T(1) - o);
            dc[(long long)j * B + b] = grad_c * f;
        }
    }
};

// Shared memory of a block: [weights | staged input | K-split partial sums].
template <typename T>
struct SharedLayout {
    T* ws;
    T* stage;
    T* partial;
    __device__ SharedLayout(unsigned char* raw, long long weight_rows, const Tile& tile) {
        ws = reinterpret_cast<T*>(raw);
        stage = ws + weight_rows * tile.ncol;
        partial = stage + (long long)tile.KC * tile.BC;
    }
};

// One forward step t for the chunk(s) of batch rows [b_begin, b_end).
template <typename T, bool RESIDENT>
__device__ void forward_step_chunks(const ForwardWeights<T>& weights, const ForwardEpilogue<T>& epi,
                                    const Tile& tile, const SharedLayout<T>& sh, int b_begin,
                                    int b_end) {
    const long long ld = (long long)epi.slots * epi.B;
    const long long col_in = (long long)(epi.t % epi.slots) * epi.B;
    for (int b0 = b_begin; b0 < b_end; b0 += tile.BC)
        chunk_dot<T, 4, RESIDENT>(epi.h, ld, col_in, epi.B, b0, tile, sh.ws, sh.stage, sh.partial,
                                  weights, epi);
}

// One backward step t for the chunk(s) of batch rows [b_begin, b_end).
template <typename T, int V, bool RESIDENT>
__device__ void backward_step_chunks(const BackwardWeights<T>& weights,
                                     const BackwardEpilogue<T, V>& epi, const Tile& tile,
                                     const SharedLayout<T>& sh, int b_begin, int b_end) {
    const long long ld = (long long)epi.steps * epi.B;
    const T* in = epi.t == epi.steps - 1 ? nullptr : epi.dz;
    const long long col_in = (long long)(epi.t + 1) * epi.B;
    for (int b0 = b_begin; b0 < b_end; b0 += tile.BC)
        chunk_dot<T, V, RESIDENT>(in, ld, col_in, epi.B, b0, tile, sh.ws, sh.stage, sh.partial,
                                  weights, epi);
}

}  // namespace fastlstm
