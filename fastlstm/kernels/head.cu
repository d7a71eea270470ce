// Head kernels: softmax, and the two losses with their gradient w.r.t. the outputs (same
// definitions as fastlstm/kernels/head_cpu.py and fastlstm/reference.py).  The head's GEMMs go to cuBLAS.
// The losses run as ONE block so that the (weighted) mean is summed in a fixed order
// (deterministic) and written to a device scalar: no host synchronisation.  Both take the same arguments, so the
// backend launches a loss by its name alone.
#include "reduce.cuh"

namespace fastlstm {

// Max and log-sum-exp of one row, by one warp (every lane gets both).
template <typename T>
__device__ void row_max_logsumexp(const T* x, int cols, int lane, T* top, double* log_s) {
    T m = x[0];
    for (int k = lane; k < cols; k += 32) m = x[k] > m ? x[k] : m;
    m = warp_max(m);
    double s = 0.0;
    for (int k = lane; k < cols; k += 32) s += exp((double)(x[k] - m));
    *top = m;
    *log_s = log(warp_sum(s));
}

// Row-wise softmax, one warp per row (max-shifted: no overflow).
template <typename T>
__device__ void softmax(const T* logits, T* probs, int rows, int cols) {
    const int lane = threadIdx.x & 31;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    for (int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        const T* x = logits + (long long)r * cols;
        T top;
        double log_s;
        row_max_logsumexp(x, cols, lane, &top, &log_s);
        for (int k = lane; k < cols; k += 32)
            probs[(long long)r * cols + k] = (T)exp((double)(x[k] - top) - log_s);
    }
}

// The sum of the rows' weights (nullptr: every row weighs 1, and the sum is `rows`), in a fixed
// order; every thread of the block gets it.
__device__ double weight_total(const double* weight, int rows) {
    if (weight == nullptr) return (double)rows;
    double s = 0.0;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) s += weight[r];
    return block_sum(s);
}

// The losses weight each row by `weight` (nullptr: 1) and divide by the weights' sum, which they
// write to `weight_sum` where it is not nullptr.  A row's terms are multiplied by its weight
// before the division, so weights of 1 give the unweighted mean (up to how the compiler fuses
// the sums' multiply-adds).  Weights that sum to zero give a zero loss and gradient (the Adam
// kernel then skips the step).

// Weighted mean softmax cross-entropy; dlogits = w * (softmax - onehot(y)) / sum(w).
// A label outside [0, cols) makes the loss NaN (so a training step skips its update).
template <typename T>
__device__ void cross_entropy(const T* logits, const long long* y, const double* weight,
                              T* dlogits, double* loss, double* weight_sum, int rows, int cols) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const double wsum = weight_total(weight, rows);
    double total = 0.0;
    for (int r = threadIdx.x >> 5; r < rows; r += warps) {
        const T* x = logits + (long long)r * cols;
        const long long label = y[r];
        const bool valid = label >= 0 && label < cols;
        const double w = weight == nullptr ? 1.0 : weight[r];
        T top;
        double log_s;
        row_max_logsumexp(x, cols, lane, &top, &log_s);
        for (int k = lane; k < cols; k += 32) {
            const double p = exp((double)(x[k] - top) - log_s);
            const double d = w * (p - (k == label ? 1.0 : 0.0));
            dlogits[(long long)r * cols + k] = (T)(wsum > 0.0 ? d / wsum : 0.0);
        }
        if (lane == 0)
            total += valid ? w * (log_s - (double)(x[label] - top))
                           : __longlong_as_double(0x7ff8000000000000LL);
    }
    total = block_sum(total);
    if (threadIdx.x == 0) {
        *loss = wsum > 0.0 ? total / wsum : 0.0;
        if (weight_sum != nullptr) *weight_sum = wsum;
    }
}

// Weighted mean over the rows of sum((out - y)^2) / 2 / cols; dout = w * (out - y) / (sum(w) * cols).
template <typename T>
__device__ void squared_error(const T* out, const T* y, const double* weight, T* dout,
                              double* loss, double* weight_sum, int rows, int cols) {
    const long long size = (long long)rows * cols;
    const double wsum = weight_total(weight, rows);
    const double denominator = wsum * cols;
    double total = 0.0;
    for (long long n = threadIdx.x; n < size; n += blockDim.x) {
        const T d = out[n] - y[n];
        const double w = weight == nullptr ? 1.0 : weight[n / cols];
        total += w * ((double)d * (double)d);
        dout[n] = (T)(wsum > 0.0 ? w * (double)d / denominator : 0.0);
    }
    total = block_sum(total);
    if (threadIdx.x == 0) {
        *loss = wsum > 0.0 ? 0.5 * total / denominator : 0.0;
        if (weight_sum != nullptr) *weight_sum = wsum;
    }
}

}  // namespace fastlstm

#define FASTLSTM_HEAD(SUFFIX, T)                                                                 \
    extern "C" __global__ void fastlstm_softmax_##SUFFIX(const T* logits, T* probs, int rows,  \
                                                         int cols) {                            \
        fastlstm::softmax<T>(logits, probs, rows, cols);                                         \
    }                                                                                            \
    extern "C" __global__ void fastlstm_cross_entropy_##SUFFIX(                                  \
        const T* logits, const long long* y, const double* weight, T* dlogits, double* loss,     \
        double* weight_sum, int rows, int cols) {                                                \
        fastlstm::cross_entropy<T>(logits, y, weight, dlogits, loss, weight_sum, rows, cols);    \
    }                                                                                            \
    extern "C" __global__ void fastlstm_squared_error_##SUFFIX(                                  \
        const T* out, const T* y, const double* weight, T* dout, double* loss,                   \
        double* weight_sum, int rows, int cols) {                                                \
        fastlstm::squared_error<T>(out, y, weight, dout, loss, weight_sum, rows, cols);          \
    }

FASTLSTM_HEAD(f32, float)
FASTLSTM_HEAD(f64, double)
