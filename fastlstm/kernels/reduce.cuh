// Deterministic block-wide sum in double (fixed shuffle tree, then warp 0 over the warp sums):
// used by the loss kernels and the gradient norm.  Every thread of the block must call it; the
// result is returned to every thread.  blockDim.x must be a multiple of 32, at most 1024.
#pragma once

namespace fastlstm {

__device__ __forceinline__ double warp_sum(double x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T y = __shfl_xor_sync(0xffffffffu, x, offset);
        x = y > x ? y : x;
    }
    return x;
}

__device__ double block_sum(double x) {
    __shared__ double sums[32];
    __shared__ double total;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    x = warp_sum(x);
    if (lane == 0) sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        double y = lane < (int)(blockDim.x >> 5) ? sums[lane] : 0.0;
        y = warp_sum(y);
        if (lane == 0) total = y;
    }
    __syncthreads();
    const double result = total;
    __syncthreads();  // `sums` and `total` may be reused by the next call
    return result;
}

}  // namespace fastlstm
