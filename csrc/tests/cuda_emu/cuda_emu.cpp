// The fiber scheduler and the runtime calls of the CUDA emulator (see cuda_emu.h).
#include "cuda_emu.h"

#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include "include/cuda_runtime.h"

namespace pydiff_emu {

uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
dim3 block_dim, grid_dim;

namespace {

enum State { kRunnable, kAtBarrier, kAtCollective, kDone };

// A fiber starts on its own stack with setcontext, and later switches go through _setjmp /
// _longjmp, which (unlike swapcontext) make no system call to save and restore the signal mask.
struct Fiber {
  ucontext_t context;
  jmp_buf resume;
  bool started = false;
  void* fake_stack = nullptr;  // AddressSanitizer's, while the fiber is switched out
  State state = kRunnable;
  WarpOp op = kShflUp;
  unsigned mask = 0;
  uint64_t in = 0, out = 0;
  int arg = 0;
};

constexpr size_t kStackBytes = 64 * 1024;

std::vector<Fiber> fibers;
std::vector<std::vector<char>> stacks;
jmp_buf scheduler;
int current = -1;
void* scheduler_fake_stack = nullptr;
const void* scheduler_stack = nullptr;  // learned when the first fiber starts
size_t scheduler_stack_bytes = 0;

// AddressSanitizer follows the stack switches when told of them (no-ops in other builds).
void start_switch(void** fake_stack_save, const void* bottom, size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, bytes);
#else
  (void)fake_stack_save, (void)bottom, (void)bytes;
#endif
}
void finish_switch(void* fake_stack_save, const void** bottom_old, size_t* bytes_old) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, bytes_old);
#else
  (void)fake_stack_save, (void)bottom_old, (void)bytes_old;
#endif
}

const std::function<void()>* kernel_body = nullptr;
int last_error = 0;

[[noreturn]] void fail(const char* what, int warp) {
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u, warp %d)\n", what, block_idx.x, block_idx.y, warp);
  std::abort();
}

void fiber_main() {
  finish_switch(nullptr, &scheduler_stack, &scheduler_stack_bytes);
  (*kernel_body)();
  fibers[current].state = kDone;
  start_switch(nullptr, scheduler_stack, scheduler_stack_bytes);  // leaving this stack for good
  _longjmp(scheduler, 1);
}

void yield_to_scheduler(int me) {
  Fiber& f = fibers[me];
  if (!_setjmp(f.resume)) {
    start_switch(&f.fake_stack, scheduler_stack, scheduler_stack_bytes);
    _longjmp(scheduler, 1);
  }
  finish_switch(f.fake_stack, nullptr, nullptr);  // resumed
}

__attribute__((noinline)) void resume(int i) {  // its frame holds the scheduler's jump buffer
  if (_setjmp(scheduler)) {                     // the fiber yielded or ended
    finish_switch(scheduler_fake_stack, nullptr, nullptr);
    return;
  }
  Fiber& f = fibers[i];
  start_switch(&scheduler_fake_stack, stacks[i].data(), kStackBytes);
  if (f.started) _longjmp(f.resume, 1);
  f.started = true;
  setcontext(&f.context);
}

// Resolves warp `w` if every live lane waits at one collective; returns whether it did.
bool resolve_warp(int w, int nthreads) {
  const int first = 32 * w, last = first + 32 < nthreads ? first + 32 : nthreads;
  int waiting = 0, done = 0;
  for (int i = first; i < last; ++i) {
    waiting += fibers[i].state == kAtCollective;
    done += fibers[i].state == kDone;
  }
  if (waiting == 0 || waiting + done != last - first) return false;
  int leader = -1;
  for (int i = first; i < last && leader < 0; ++i)
    if (fibers[i].state == kAtCollective) leader = i;
  const WarpOp op = fibers[leader].op;
  for (int i = first; i < last; ++i) {
    const Fiber& f = fibers[i];
    if (f.state != kAtCollective) continue;
    if (f.op != op || f.mask != fibers[leader].mask)
      fail("lanes of one warp wait at different collectives", w);
    if ((f.mask >> (i - first) & 1u) == 0) fail("a lane outside its collective's mask took part", w);
  }
  for (int lane = 0; lane < last - first; ++lane)
    if ((fibers[leader].mask >> lane & 1u) && fibers[first + lane].state != kAtCollective)
      fail("a lane named in a collective's mask has exited", w);
  auto lane_in = [&](int lane) { return fibers[first + lane].in; };
  const int width = last - first;
  for (int lane = 0; lane < width; ++lane) {
    Fiber& f = fibers[first + lane];
    if (f.state != kAtCollective) continue;
    uint64_t r = 0;
    switch (op) {
      case kShflUp:
        r = lane - f.arg >= 0 ? lane_in(lane - f.arg) : f.in;
        break;
      case kShflDown:
        r = lane + f.arg < width ? lane_in(lane + f.arg) : f.in;
        break;
      case kShflIdx:
        r = lane_in(f.arg & 31);
        break;
      case kBallot:
        for (int j = 0; j < width; ++j)
          if (fibers[first + j].state == kAtCollective && lane_in(j)) r |= 1ull << j;
        break;
      case kMatchAny:
        for (int j = 0; j < width; ++j)
          if (fibers[first + j].state == kAtCollective && lane_in(j) == f.in) r |= 1ull << j;
        break;
    }
    f.out = r;
  }
  for (int i = first; i < last; ++i)
    if (fibers[i].state == kAtCollective) fibers[i].state = kRunnable;
  return true;
}

// Its own frame: getcontext counts as returning twice, and would make the caller's loop variables
// suspect (it never does here: the context is only a template for makecontext).
__attribute__((noinline)) void init_fiber(Fiber& f, char* stack) {
  f.state = kRunnable;
  f.started = false;
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;  // fiber_main never returns
  makecontext(&f.context, fiber_main, 0);
}

void run_block(int nthreads) {
  for (int i = 0; i < nthreads; ++i) init_fiber(fibers[i], stacks[i].data());
  const int nwarps = (nthreads + 31) / 32;
  for (bool ascending = true;; ascending = !ascending) {
    for (int k = 0; k < nthreads; ++k) {
      const int i = ascending ? k : nthreads - 1 - k;
      if (fibers[i].state != kRunnable) continue;
      current = i;
      thread_idx = uint3{unsigned(i) % block_dim.x, unsigned(i) / block_dim.x % block_dim.y,
                         unsigned(i) / (block_dim.x * block_dim.y)};
      resume(i);
    }
    bool progressed = false;
    for (int w = 0; w < nwarps; ++w) progressed |= resolve_warp(w, nthreads);
    if (progressed) continue;
    int live = 0, at_barrier = 0;
    for (int i = 0; i < nthreads; ++i) {
      live += fibers[i].state != kDone;
      at_barrier += fibers[i].state == kAtBarrier;
    }
    if (live == 0) return;
    if (at_barrier != live) fail("deadlock: threads wait at a collective that cannot complete", -1);
    for (int i = 0; i < nthreads; ++i)
      if (fibers[i].state == kAtBarrier) fibers[i].state = kRunnable;
  }
}

}  // namespace

void syncthreads() {
  const int me = current;
  fibers[me].state = kAtBarrier;
  yield_to_scheduler(me);
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg) {
  const int me = current;
  Fiber& f = fibers[me];
  f.state = kAtCollective;
  f.op = op;
  f.mask = mask;
  f.in = value;
  f.arg = arg;
  yield_to_scheduler(me);
  return fibers[me].out;
}

int run_grid(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (fibers.size() < nthreads) {
    fibers.resize(nthreads);
    stacks.resize(nthreads, std::vector<char>(kStackBytes));
  }
  kernel_body = &kernel;
  block_dim = block;
  grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = uint3{x, y, z};
        run_block(int(nthreads));
      }
  kernel_body = nullptr;
  return cudaSuccess;
}

void set_last_error(int e) {
  if (e && !last_error) last_error = e;
}

}  // namespace pydiff_emu

cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  return *p ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const int e = pydiff_emu::last_error;
  pydiff_emu::last_error = 0;
  return cudaError_t(e);
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void*) {
  attr->type = cudaMemoryTypeDevice;  // the emulated GPU's memory is this process's
  attr->device = 0;
  return cudaSuccess;
}
