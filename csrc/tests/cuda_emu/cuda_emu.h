// A CPU emulator of the part of CUDA that csrc/ops/step_cuda.cu uses, so that ctest runs the CUDA
// twin's kernels on this GPU-less machine and compares them with the CPU twin bit for bit.
//
// Every thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another.
// A fiber runs until it reaches __syncthreads, a warp collective (__shfl*_sync, __ballot_sync,
// __match_any_sync) or its end; the scheduler then resolves the warps whose live lanes all wait at
// the same collective, and releases the barrier once every live thread waits there. Runnable fibers
// are resumed in alternating order (ascending, then descending thread index), so a read of another
// thread's shared-memory write that lacks a barrier sees stale data in one of the two orders.
// Divergent collectives, collectives with exited lanes and deadlocks abort with a message.
//
// What it does not model: concurrency within a warp (threads interleave only at the points above),
// the memory model, performance. It checks the kernels' logic (indexing, the selection, the
// compaction, the warp and block collectives), not their speed or their races.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one block at a time: a static is the block's shared memory
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

namespace pydiff_emu {

extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;

enum WarpOp : int { kShflUp, kShflDown, kShflIdx, kBallot, kMatchAny };

void syncthreads();
// The calling lane's result of a collective over its warp's lanes in `mask`.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg);
// Runs `kernel` once per thread of the grid; returns a cudaError_t value (0: ran).
int run_grid(dim3 grid, dim3 block, const std::function<void()>& kernel);
void set_last_error(int e);

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof v);
  return u;
}
template <class T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// `PYDIFF_LAUNCH(grid, block, stream, kernel)(args...)`: the emulated <<<grid, block, 0, stream>>>.
template <class... P>
struct Launch {
  dim3 grid, block;
  void (*kernel)(P...);
  template <class... A>
  void operator()(A&&... args) const {
    const auto k = kernel;
    set_last_error(run_grid(grid, block, [&] { k(args...); }));  // each thread: its own copy of the args
  }
};
template <class S, class... P>
Launch<P...> launch(dim3 grid, dim3 block, S /*stream*/, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, kernel};
}

}  // namespace pydiff_emu

#define threadIdx (::pydiff_emu::thread_idx)
#define blockIdx (::pydiff_emu::block_idx)
#define blockDim (::pydiff_emu::block_dim)
#define gridDim (::pydiff_emu::grid_dim)

inline void __syncthreads() {
  ::pydiff_emu::syncthreads();
}

template <class T>
T __shfl_up_sync(unsigned mask, T v, int delta) {
  using namespace pydiff_emu;
  return from_bits<T>(warp_collective(kShflUp, mask, to_bits(v), delta));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, int delta) {
  using namespace pydiff_emu;
  return from_bits<T>(warp_collective(kShflDown, mask, to_bits(v), delta));
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  using namespace pydiff_emu;
  return from_bits<T>(warp_collective(kShflIdx, mask, to_bits(v), src_lane));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  using namespace pydiff_emu;
  return unsigned(warp_collective(kBallot, mask, predicate != 0, 0));
}
inline unsigned __match_any_sync(unsigned mask, unsigned key) {
  using namespace pydiff_emu;
  return unsigned(warp_collective(kMatchAny, mask, key, 0));
}

inline int __popc(unsigned v) {
  return __builtin_popcount(v);
}
inline int __ffs(unsigned v) {
  return __builtin_ffs(int(v));
}

// One OS thread runs every fiber, and a fiber is switched out only at the points above, so the
// read-modify-writes are atomic by construction.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old > v ? old : v;
  return old;
}
inline unsigned max(unsigned a, unsigned b) {
  return a > b ? a : b;
}
