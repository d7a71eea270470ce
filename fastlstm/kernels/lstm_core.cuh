// Device code shared by the per-step (lstm_step.cu) and persistent (lstm_persistent.cu)
// recurrence kernels: the same equations as fastlstm/kernels/lstm_cpu.py, PyTorch's gate order (i, f, g, o).
//
// Rows and steps: the rows of a batch are sorted by length, longest first (the host does it), so
// the rows still active at time step t are a prefix, active[t] of them; a step computes those
// only (the others are skipped, not masked).  The steps are stored PACKED, as PyTorch's
// PackedSequence: time t's rows take the columns xcol[t] + b, b < active[t], xcol[t] = the sum
// of active[u] over u < t (every row of every step: xcol[t] = t*B).  A reverse recurrence walks
// the same packed times from t = T-1 down to 0 (its active counts rise): a row whose last valid
// step is t starts there from its initial state.  `Schedule` holds these device arrays, written
// by the host for each batch (a captured CUDA graph reads them, so it serves every batch of its
// shape whatever the lengths).
//
// Layouts ("feature-major": batch is the fastest index, so a warp's 32 lanes, which own 32
// consecutive batch rows, make coalesced accesses):
//   xg, gates, dz : (4H, ld_seq)      row r = gate*H + unit, column xcol[t] + b
//   h, c          : (H, ld_state)     columns [0, B): the initial state of row b; time t's state
//                                     at column scol[t] + b (training and layers that feed
//                                     another: B + xcol[t], every step kept; the top layer in
//                                     inference: B + (t % 2)*B, two slots in turn)
//   dh_last, dc   : (H, B)
//   dh_seq        : (H, ld_seq)       gradient w.r.t. each step's output, from the layer above
//
// Work split: a block owns JS consecutive hidden units (a "slice").  Per step it computes the
// dot products of its slice for all batch rows, chunk by chunk (BC rows, a multiple of 32): one
// warp task = V weight columns x 32 batch rows, one batch row per lane; when there are fewer
// tasks than warps, the K dimension is split across warps (KS parts) and the parts are summed in
// a fixed order (deterministic).  The input rows (h_{t-1} forwards, dz_{t+1} backwards) are
// staged in shared memory KC rows at a time; the weight slice is either resident in shared
// memory for the whole kernel (persistent) or staged KC rows at a time (per-step).  Staging
// keeps several loads in flight per thread (`copy_in_flight`): the kernels wait on L2 round
// trips far more than they compute.
//
// Dropout (fastlstm/dropout.py defines it; a kernel's DROPOUT template flag compiles it in, so
// the kernels without it do no dropout work, not even a test of a null pointer): the masks are
// not read from memory but hashed where they apply, from one key per (mask, caller's row) that
// the host writes to a device buffer before each step (`Mask`), so a captured CUDA graph
// replays with a new seed and backward recomputes the masks instead of storing them.
// Recurrent dropout multiplies h_{t-1} as it is staged for the recurrent dot product (the
// stored h stays unmasked: it is the layer's output) and, backwards, the recurrent part of
// dL/dh_t, which is the gradient w.r.t. the masked read; dropout between layers writes a masked
// copy of the output sequence, packed, for the layer above's GEMMs (`dropped`), and multiplies
// the gradient coming back from the layer above.  The masks are hashed again at every step
// rather than kept in shared memory: a few integer operations per staged value, against a
// slice of the weights that already fills it.
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

// Values each thread loads before it stores any of them, in the staging loops below: a warp
// issues its loads in order and waits for one before the store that uses it, so loading a
// round of them first makes it wait one L2 round trip per round instead of one per value.
constexpr int IN_FLIGHT = 8;

// One round of copy_in_flight: N loads, then their N stores, the last value loaded first.
// ptxas keeps the order of stores it cannot prove apart, so every load of the round is issued
// before the first store waits.  (Stored in the order loaded, or loaded under a predicate,
// ptxas moved each store up to its load to reuse its register: one or two loads in flight
// again; hence rounds with no condition inside.)
template <int N, typename T, class Load, class Store>
__device__ __forceinline__ void copy_round(int i, int stride, const Load& load,
                                           const Store& store) {
    T v[N];
#pragma unroll
    for (int u = 0; u < N; ++u) v[u] = load(i + u * stride);
#pragma unroll
    for (int u = N - 1; u >= 0; --u) store(i + u * stride, v[u]);
}

// The rounds of N, N/2, ..., 1 values that the copy from i on has left (fewer than 2N).
template <int N, typename T, class Load, class Store>
__device__ __forceinline__ void copy_rest(int i, int end, int stride, const Load& load,
                                          const Store& store) {
    if (i + (N - 1) * stride < end) {
        copy_round<N, T>(i, stride, load, store);
        i += N * stride;
    }
    if constexpr (N > 1) copy_rest<N / 2, T>(i, end, stride, load, store);
}

// store(i, load(i)) for i = first, first + stride, ... below end: rounds of IN_FLIGHT values,
// then of 4, 2 and 1 for the rest.
template <typename T, class Load, class Store>
__device__ __forceinline__ void copy_in_flight(int first, int end, int stride, const Load& load,
                                               const Store& store) {
    int i = first;
    for (; i + (IN_FLIGHT - 1) * stride < end; i += IN_FLIGHT * stride)
        copy_round<IN_FLIGHT, T>(i, stride, load, store);
    copy_rest<IN_FLIGHT / 2, T>(i, end, stride, load, store);
}

// The forward slice starting at unit j0: weight column col = unit*4 + gate is W_hh[gate*H + j0 +
// unit, k], zero past unit H-1.
template <typename T>
struct ForwardWeights {
    const T* w_hh;
    int H, j0;
    // ws[kk*ncol + col] = column col at k = k0 + kk, for kk < rows.  A W_hh row is contiguous in
    // k, so each 8 lanes of a warp read 8 consecutive k of one gate row (whole 32-byte sectors),
    // the 4 groups of lanes the 4 gates of a unit: their stores land in 32 consecutive words of
    // shared memory where ncol == 4 (one unit a block).  A thread's loads in flight are the
    // slice's units (up to 8) at one k: it has few k, 2 of the per-step kernels' KC = 128 rows
    // with 8 warps.
    __device__ void load(T* ws, int k0, int rows, int ncol) const {
        const int lane = threadIdx.x & 31;
        const int gate = lane >> 3;
        const int units = ncol >> 2;
        const int present = min(units, H - j0);  // the units past H-1 are zeros
        const T* w = w_hh + ((long long)gate * H + j0) * H + k0;  // gate row of unit j0
        for (int kk = ((threadIdx.x >> 5) << 3) + (lane & 7); kk < rows;
             kk += (blockDim.x >> 5) << 3) {
            T* row = ws + kk * ncol + gate;
            copy_in_flight<T>(
                0, present, 1, [&](int unit) { return w[(long long)unit * H + kk]; },
                [&](int unit, T value) { row[unit * 4] = value; });
            for (int unit = present; unit < units; ++unit) row[unit * 4] = T(0);
        }
    }
};

// The backward slice: weight column col is W_hh[k, j0 + col] (k over all 4H gate rows), zero
// past unit H-1.
template <typename T>
struct BackwardWeights {
    const T* w_hh;
    int H, j0;
    // ws[kk*ncol + col] = column col at k = k0 + kk, for kk < rows.  A row of the slice is ncol
    // consecutive values of a W_hh row, so consecutive threads take its consecutive columns
    // (ncol rounded up to a power of two threads a row, the extra ones idle), then the next row.
    // With one unit a block (ncol == 1) every value is a sector of its own: only a transposed
    // W_hh would coalesce that.
    __device__ void load(T* ws, int k0, int rows, int ncol) const {
        int shift = 0;  // threads a row: 1 << shift
        while ((1 << shift) < ncol) ++shift;
        const int col = threadIdx.x & ((1 << shift) - 1);
        if (col >= ncol) return;
        const int first = threadIdx.x >> shift;
        const int stride = blockDim.x >> shift;
        const T* w = w_hh + (long long)k0 * H + j0 + col;
        if (j0 + col < H)
            copy_in_flight<T>(
                first, rows, stride, [&](int kk) { return w[(long long)kk * H]; },
                [&](int kk, T value) { ws[kk * ncol + col] = value; });
        else
            for (int kk = first; kk < rows; kk += stride) ws[kk * ncol + col] = T(0);
    }
};

// The time steps of one recurrence (see the top of this file): device arrays the host writes.
struct Schedule {
    const int* active;  // (steps,) rows active at time t: a prefix of the sorted rows
    const int* xcol;    // (steps,) first column of time t in the packed sequences (xg, dz, dh_seq)
    const int* scol;    // (steps,) first column of time t's state in h and c
    int steps;
    int reverse;        // from each row's last valid step back to step 0
};

// Where step t of a recurrence reads and writes: read from the Schedule once per step.
struct Step {
    int t;                // the time step
    int rows;             // rows active at t; the step computes these only
    long long xcol;       // first column of t in the packed sequences
    long long scol;       // first column of t's state
    int carried;          // rows whose state comes from the step before (the others start here)
    long long prev;       // first state column of the step before
    int carried_next;     // rows whose state the step after reads (the others end here)
    long long next_xcol;  // first packed column of the step after
    // the state column row b starts step t from: the step before's, or its initial state
    __device__ long long prev_col(int b) const { return b < carried ? prev + b : (long long)b; }
};

__device__ __forceinline__ Step schedule_step(const Schedule& s, int t) {
    const int before = s.reverse ? t + 1 : t - 1;
    const int after = s.reverse ? t - 1 : t + 1;
    const bool has_before = before >= 0 && before < s.steps;
    const bool has_after = after >= 0 && after < s.steps;
    Step step;
    step.t = t;
    step.rows = s.active[t];
    step.xcol = s.xcol[t];
    step.scol = s.scol[t];
    step.carried = has_before ? min(s.active[before], step.rows) : 0;
    step.prev = has_before ? (long long)s.scol[before] : 0;
    step.carried_next = has_after ? min(s.active[after], step.rows) : 0;
    step.next_xcol = has_after ? (long long)s.xcol[after] : 0;
    return step;
}

// ---- dropout masks: the device copy of fastlstm/dropout.py (tests/test_cuda_dropout_emulated.py
// checks it bit for bit)

// SplitMix64's increment and finaliser (fastlstm.dropout.GAMMA, _mix).
constexpr unsigned long long SPLITMIX_GAMMA = 0x9E3779B97F4A7C15ULL;
__device__ __forceinline__ unsigned long long splitmix_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// One mask of one recurrence, as the host writes it (fastlstm.backends.cuda_support.dropout_masks):
//   m[0] threshold (the high 32 bits of a unit's hash must reach it to keep the unit),
//   m[1] the kept value 1/(1-p) as the bits of a double, m[2] units per time step (0: the same
//   mask at every step, recurrent dropout), m[3] the first unit of this direction, m[4 + r] the
//   key of the caller's row r.  Everything that may change from one training step to the next
//   is in this buffer, none of it in a kernel argument: a graph replays with the new values.
struct Mask {
    const unsigned long long* m;  // nullptr: no such mask
    __device__ bool on() const { return m != nullptr; }
    // the mask of caller's row `row`, time step t, unit j of this direction: 0 or 1/(1-p)
    template <typename T>
    __device__ T value(int row, int t, int j) const {
        const unsigned long long unit = (unsigned long long)t * m[2] + m[3] + j;
        const unsigned long long hash = splitmix_mix(m[4 + row] + SPLITMIX_GAMMA * (unit + 1));
        return (hash >> 32) >= m[0] ? T(__longlong_as_double((long long)m[1])) : T(0);
    }
};

// The dropout of one recurrence (layer, direction).  The kernels see the rows sorted by length;
// the masks are those of the caller's rows (the masks of a sample never depend on the other
// samples' lengths), hence `row`.
struct Dropout {
    const int* row;  // (B,) the caller's row of each sorted row
    Mask recurrent;  // on h_{t-1} where this recurrence reads it
    Mask between;    // on this direction's output where the layer above reads it
};

// Columns of the recurrent input each row of a step reads (-1: none, it reads zeros), and what
// the staging does to a value it reads (`read`).
template <typename T, bool DROPOUT>
struct PrevStateCols {  // forwards: h of the step before, or the initial state, masked
    Step step;
    Dropout drop;
    __device__ long long operator()(int b) const { return step.prev_col(b); }
    __device__ T read(T h, int k, int b) const {
        if constexpr (DROPOUT) {
            // the initial state h0 is h_{-1}: masked like any other step's
            if (drop.recurrent.on()) return h * drop.recurrent.value<T>(drop.row[b], 0, k);
        }
        return h;
    }
};
struct NextStepCols {  // backwards: dz of the step after, for the rows it carried on
    Step step;
    __device__ long long operator()(int b) const {
        return b < step.carried_next ? step.next_xcol + b : -1;
    }
    template <typename T>
    __device__ T read(T dz, int, int) const { return dz; }
};

// stage[kk*BC + bb] = cols.read(in[k0 + kk, cols(b)], k0 + kk, b) for kk < kc, bb < BC, b = b0 +
// bb; zero for a row b past `rows` or without a column.  Lanes take consecutive rows b
// (coalesced: a row's columns are consecutive), warps the kk, each thread IN_FLIGHT of its kk at
// a time; a thread's row, and so its column, stays the same through the kk.
template <typename T, class Cols>
__device__ void stage_input(T* stage, const T* __restrict__ in, long long ld_in, const Cols& cols,
                            int rows, int b0, int BC, int k0, int kc) {
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    for (int bb = threadIdx.x & 31; bb < BC; bb += 32) {
        const int b = b0 + bb;
        const long long col = b < rows ? cols(b) : -1;
        if (col >= 0) {
            const T* src = in + (long long)k0 * ld_in + col;
            copy_in_flight<T>(
                warp, kc, nwarps,
                // __ldcg: the rows were written by other blocks (persistent kernel); bypass L1.
                [&](int kk) { return __ldcg(src + kk * ld_in); },
                [&](int kk, T value) { stage[kk * BC + bb] = cols.read(value, k0 + kk, b); });
        } else {
            for (int kk = warp; kk < kc; kk += nwarps) stage[kk * BC + bb] = T(0);
        }
    }
}

// One chunk of batch rows [b0, b0 + BC): acc[v] = sum_k in[k, cols(b)] * w[k, task*V + v]
// for each warp task, then epi(column group, b, acc) for every row b < rows.  `in == nullptr`
// means no recurrent input (acc = 0), so does cols(b) < 0 for that row; cols.read(value, k, b)
// is what is staged of a value read (the recurrent dropout's mask applied, forwards).  Every
// thread of the block must call this (it syncs).
template <typename T, int V, bool RESIDENT, class Weights, class Cols, class Epilogue>
__device__ void chunk_dot(const T* __restrict__ in, long long ld_in, const Cols& cols, int rows,
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
            stage_input(stage, in, ld_in, cols, rows, b0, tile.BC, k0, kc);
            if (!RESIDENT) weights.load(ws, k0, kc, tile.ncol);
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
    if (active && part == 0 && b0 + row < rows) epi(group, b0 + row, acc);
}

// Forward pointwise step for unit j0 + group, batch row b: gates, cell and hidden state (and,
// with dropout between layers, the masked copy of the hidden state the layer above reads).
template <typename T, bool DROPOUT>
struct ForwardEpilogue {
    const T* b_ih;
    const T* b_hh;
    T* xg;
    T* h;
    T* c;
    long long ld_seq, ld_state;  // row lengths of xg and of h, c
    int H, j0, store_gates;
    Step step;
    Dropout drop;  // read where DROPOUT
    T* dropped;    // (H, ld_seq) where drop.between is on: this direction's output, masked
    __device__ void operator()(int group, int b, const T (&z)[4]) const {
        const int j = j0 + group;
        if (j >= H) return;
        const long long tb = ld_seq;
        const long long col = step.xcol + b;
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
        const long long prev = (long long)j * ld_state + step.prev_col(b);
        const long long next = (long long)j * ld_state + step.scol + b;
        const T cell = f * c[prev] + i * g;
        c[next] = cell;
        const T hidden = o * dev_tanh(cell);
        h[next] = hidden;
        if constexpr (DROPOUT) {
            // packed like xg, so the layer above's GEMMs read it as they would read h
            if (drop.between.on())
                dropped[(long long)j * tb + col] =
                    hidden * drop.between.value<T>(drop.row[b], step.t, j);
        }
        if (store_gates) {
            xg[(long long)j * tb + col] = i;
            xg[((long long)H + j) * tb + col] = f;
            xg[((long long)2 * H + j) * tb + col] = g;
            xg[((long long)3 * H + j) * tb + col] = o;
        }
    }
};

// Backward pointwise step for units j0 + group*V + v, batch row b, given the recurrent part of
// dL/dh_t (dz of the step after @ W_hh, zero at the row's last step): writes dz_t, carries dc.
// With dropout, that recurrent part is the gradient w.r.t. the masked h_t the step after read,
// and dh_seq the gradient w.r.t. the masked output the layer above read: each is multiplied by
// its mask here (dh_last, read by the head unmasked, is not).
template <typename T, int V, bool DROPOUT>
struct BackwardEpilogue {
    const T* gates;
    const T* c;        // (H, ld_state), every step kept
    const T* dh_last;  // (H, B) or nullptr: gradient w.r.t. each row's last hidden state
    const T* dh_seq;   // (H, ld_seq) or nullptr
    T* dz;
    T* dc;             // (H, B): carried between steps, dL/dc_0 at the end
    long long ld_seq, ld_state;
    int H, B, j0;
    Step step;
    Dropout drop;  // read where DROPOUT
    __device__ void operator()(int group, int b, const T (&dh_rec)[V]) const {
        const long long tb = ld_seq;
        const long long col = step.xcol + b;
        const bool last = b >= step.carried_next;  // no later step reads this row's state
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const int j = j0 + group * V + v;
            if (j >= H) return;
            T grad_h = dh_rec[v];
            if constexpr (DROPOUT) {
                if (drop.recurrent.on()) grad_h *= drop.recurrent.value<T>(drop.row[b], 0, j);
            }
            if (last && dh_last != nullptr) grad_h += dh_last[(long long)j * B + b];
            if (dh_seq != nullptr) {
                T from_above = dh_seq[(long long)j * tb + col];
                if constexpr (DROPOUT) {
                    if (drop.between.on())
                        from_above *= drop.between.value<T>(drop.row[b], step.t, j);
                }
                grad_h += from_above;
            }
            const T i = gates[(long long)j * tb + col];
            const T f = gates[((long long)H + j) * tb + col];
            const T g = gates[((long long)2 * H + j) * tb + col];
            const T o = gates[((long long)3 * H + j) * tb + col];
            const T tc = dev_tanh(c[(long long)j * ld_state + step.scol + b]);
            const T c_prev = c[(long long)j * ld_state + step.prev_col(b)];
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

// One forward step for the chunk(s) of batch rows [b_begin, b_end) that are active at it.
template <typename T, bool RESIDENT, bool DROPOUT>
__device__ void forward_step_chunks(const ForwardWeights<T>& weights,
                                    const ForwardEpilogue<T, DROPOUT>& epi, const Tile& tile,
                                    const SharedLayout<T>& sh, int b_begin, int b_end) {
    const int rows = epi.step.rows;
    const PrevStateCols<T, DROPOUT> cols{epi.step, epi.drop};
    for (int b0 = b_begin; b0 < b_end && b0 < rows; b0 += tile.BC)
        chunk_dot<T, 4, RESIDENT>(epi.h, epi.ld_state, cols, rows, b0, tile, sh.ws, sh.stage,
                                  sh.partial, weights, epi);
}

// One backward step for the chunk(s) of batch rows [b_begin, b_end) that are active at it.
template <typename T, int V, bool RESIDENT, bool DROPOUT>
__device__ void backward_step_chunks(const BackwardWeights<T>& weights,
                                     const BackwardEpilogue<T, V, DROPOUT>& epi, const Tile& tile,
                                     const SharedLayout<T>& sh, int b_begin, int b_end) {
    const int rows = epi.step.rows;
    const T* in = epi.step.carried_next > 0 ? epi.dz : nullptr;
    const NextStepCols cols{epi.step};
    for (int b0 = b_begin; b0 < b_end && b0 < rows; b0 += tile.BC)
        chunk_dot<T, V, RESIDENT>(in, epi.ld_seq, cols, rows, b0, tile, sh.ws, sh.stage,
                                  sh.partial, weights, epi);
}

}  // namespace fastlstm
