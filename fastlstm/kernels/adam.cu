// The optimizer over the ONE flat parameter buffer: a sum-of-squares pass for the gradient norm
// (per-block partial sums) and ONE Adam launch for all parameters, as torch.optim.Adam does it
// (L2 weight_decay, bias-corrected), same formula as fastlstm/kernels/adam_cpu.py.
//
// Everything a training step decides happens on the device, so a step never waits for the host:
// every Adam block sums the partials (same order: identical result in every block), skips the
// update when the norm or the loss is not finite or the batch's weights sum to zero, scales the gradient for clipping, and reads
// the step count from device memory; the last block to finish records the new count.  The
// settings are read from device memory too, so a captured CUDA graph stays valid when they
// change (a learning-rate schedule): the host writes them before each launch or replay.
#include "reduce.cuh"

namespace fastlstm {

// Indices into the settings buffer of the Adam kernel, doubles in the order of
// fastlstm.backends.cuda_support.ADAM_SETTINGS.
enum AdamSetting { LEARNING_RATE, BETA1, BETA2, EPS, WEIGHT_DECAY, GRAD_SCALE, CLIP };

template <typename T>
__device__ void sumsq_partials(const T* g, long long n, double* partials) {
    double s = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const double x = g[i];
        s += x * x;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// settings: see AdamSetting; settings[CLIP] <= 0: no clipping.
// partials == nullptr: no norm (no clipping, no finiteness check of the gradient);
// loss == nullptr: no finiteness check of the loss;
// weight_sum == nullptr: no check of the batch's weights (else no update unless *weight_sum > 0:
// a batch of no weight has a zero gradient, and Adam would still move on its momentum).
// step: count of applied updates (read, and incremented when this update is applied);
// done: zero-initialised scratch counter, back to zero after every launch.
template <typename T>
__device__ void adam(T* p, const T* g, T* m, T* v, long long n, const double* settings,
                     const double* partials, int n_partials, const double* loss,
                     const double* weight_sum, long long* step, unsigned int* done) {
    __shared__ double s_scale;
    __shared__ long long s_step;
    __shared__ int s_ok;
    double sumsq = 0.0;
    if (partials != nullptr) {
        for (int i = threadIdx.x; i < n_partials; i += blockDim.x) sumsq += partials[i];
        sumsq = block_sum(sumsq);
    }
    if (threadIdx.x == 0) {
        bool ok = true;
        const double grad_scale = settings[GRAD_SCALE], clip = settings[CLIP];
        double scale = grad_scale;
        if (partials != nullptr) {
            const double norm = sqrt(sumsq);
            ok = isfinite(norm);
            if (clip > 0.0 && norm > clip) scale = grad_scale * (clip / norm);
        }
        if (loss != nullptr) ok = ok && isfinite(*loss);
        if (weight_sum != nullptr) ok = ok && *weight_sum > 0.0;
        s_ok = ok;
        s_scale = scale;
        s_step = *step + 1;
    }
    __syncthreads();
    if (s_ok) {
        const double t = (double)s_step;
        const double beta1 = settings[BETA1], beta2 = settings[BETA2];
        const T step_size = (T)(settings[LEARNING_RATE] / (1.0 - pow(beta1, t)));
        const T bias_correction2_sqrt = (T)sqrt(1.0 - pow(beta2, t));
        const T scale = (T)s_scale, wd = (T)settings[WEIGHT_DECAY], b1 = (T)beta1, b2 = (T)beta2;
        const T e = (T)settings[EPS];
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
             i += (long long)gridDim.x * blockDim.x) {
            const T gi = scale * g[i] + wd * p[i];
            const T mi = b1 * m[i] + (T(1) - b1) * gi;
            const T vi = b2 * v[i] + (T(1) - b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] -= step_size * mi / (sqrt(vi) / bias_correction2_sqrt + e);
        }
    }
    // Every block has read *step (thread 0, before the barrier above); the last block to arrive
    // records the new count and re-arms the counter for the next launch.
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(done, 1u) == gridDim.x - 1) {
            if (s_ok) *step = s_step;
            *done = 0u;
        }
    }
}

}  // namespace fastlstm

#define FASTLSTM_ADAM(SUFFIX, T)                                                                 \
    extern "C" __global__ void fastlstm_sumsq_partials_##SUFFIX(const T* g, long long n,        \
                                                                double* partials) {             \
        fastlstm::sumsq_partials<T>(g, n, partials);                                            \
    }                                                                                            \
    extern "C" __global__ void fastlstm_adam_##SUFFIX(                                           \
        T* p, const T* g, T* m, T* v, long long n, const double* settings,                      \
        const double* partials, int n_partials, const double* loss, const double* weight_sum,   \
        long long* step, unsigned int* done) {                                                   \
        fastlstm::adam<T>(p, g, m, v, n, settings, partials, n_partials, loss, weight_sum, step, \
                          done);                                                                 \
    }

FASTLSTM_ADAM(f32, float)
FASTLSTM_ADAM(f64, double)
