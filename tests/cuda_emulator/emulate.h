// Runs fastlstm's CUDA kernels on the CPU, for tests on machines without a GPU.
//
// Force-included (g++ -include) before a fastlstm/kernels/*.cu source compiled as C++: every CUDA thread
// becomes an OS thread, __syncthreads / warp shuffles / grid.sync become barriers.  A
// non-cooperative launch runs its blocks one after another, so `__shared__` (static) arrays
// are the running block's shared memory; a cooperative launch runs all blocks at once (the
// persistent kernels use only dynamic shared memory, which is per block here).  It checks the
// kernels' logic (indices, tiling, barriers, reductions), not CUDA's timing or memory model.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __align__(n) alignas(n)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {

class Barrier {
  public:
    explicit Barrier(int count) : count_(count) {}
    void wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const long generation = generation_;
        if (++arrived_ == count_) {
            arrived_ = 0;
            ++generation_;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return generation != generation_; });
        }
    }

  private:
    std::mutex mutex_;
    std::condition_variable cv_;
    int count_, arrived_ = 0;
    long generation_ = 0;
};

struct Block {
    std::unique_ptr<Barrier> barrier;
    std::vector<std::unique_ptr<Barrier>> warp_barriers;
    std::vector<unsigned long long> exchange;  // one slot per thread, for warp shuffles
    std::vector<double> shared;                 // dynamic shared memory (double: 16-aligned)
};

inline dim3 grid_dim, block_dim;
inline thread_local dim3 thread_idx, block_idx;
inline thread_local Block* block = nullptr;
inline Barrier* grid_barrier = nullptr;  // set during a cooperative launch only
// grid.sync() outside a cooperative launch: on a GPU it traps (cooperative_groups checks
// is_valid()); here it is recorded, and the launch reports a failure.
inline std::atomic<bool> trapped{false};

inline unsigned char* dynamic_shared() { return reinterpret_cast<unsigned char*>(block->shared.data()); }

template <typename T>
T shuffle_xor(T value, int lane_mask) {
    const unsigned tid = thread_idx.x;
    const unsigned lane = tid & 31u, warp = tid >> 5;
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    block->exchange[tid] = bits;
    block->warp_barriers[warp]->wait();
    bits = block->exchange[warp * 32 + (lane ^ (unsigned)lane_mask)];
    block->warp_barriers[warp]->wait();
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

inline std::unique_ptr<Block> make_block(dim3 block_dim, size_t shared_bytes) {
    auto b = std::make_unique<Block>();
    const int threads = (int)block_dim.x;
    b->barrier = std::make_unique<Barrier>(threads);
    for (int w = 0; w < (threads + 31) / 32; ++w)
        b->warp_barriers.push_back(std::make_unique<Barrier>(std::min(32, threads - 32 * w)));
    b->exchange.assign(threads, 0);
    b->shared.assign(shared_bytes / sizeof(double) + 2, 0.0);
    return b;
}

template <class... A, size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// Runs the grid; returns 1 where a thread called grid.sync() in a launch that was not cooperative.
template <class... A>
int launch(void (*kernel)(A...), dim3 grid, dim3 block_shape, size_t shared_bytes,
            bool cooperative, void** args) {
    grid_dim = grid;
    block_dim = block_shape;
    auto run_block = [&](unsigned bx, unsigned by, Block* b, std::vector<std::thread>& threads) {
        for (unsigned t = 0; t < block_shape.x; ++t)
            threads.emplace_back([=] {
                thread_idx = dim3{t, 0, 0};
                block_idx = dim3{bx, by, 0};
                block = b;
                call(kernel, args, std::index_sequence_for<A...>{});
            });
    };
    if (cooperative) {
        Barrier barrier((int)(grid.x * grid.y * block_shape.x));
        grid_barrier = &barrier;
        std::vector<std::unique_ptr<Block>> blocks;
        std::vector<std::thread> threads;
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blocks.push_back(make_block(block_shape, shared_bytes));
                run_block(bx, by, blocks.back().get(), threads);
            }
        for (auto& t : threads) t.join();
        grid_barrier = nullptr;
    } else {
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                auto b = make_block(block_shape, shared_bytes);
                std::vector<std::thread> threads;
                run_block(bx, by, b.get(), threads);
                for (auto& t : threads) t.join();
            }
    }
    return trapped.exchange(false) ? 1 : 0;
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define FASTLSTM_DYNAMIC_SHARED(name) unsigned char* name = emu::dynamic_shared()

inline void __syncthreads() { emu::block->barrier->wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) { return emu::shuffle_xor(value, lane_mask); }
template <typename T>
T __ldcg(const T* p) { return *p; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline double __longlong_as_double(long long x) {
    double d;
    std::memcpy(&d, &x, sizeof d);
    return d;
}
using std::max;
using std::min;

namespace cooperative_groups {
struct grid_group {
    void sync() {
        if (emu::grid_barrier == nullptr)
            emu::trapped = true;
        else
            emu::grid_barrier->wait();
    }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups
