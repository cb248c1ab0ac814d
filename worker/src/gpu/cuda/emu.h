// A CPU emulation of the CUDA features tessera's kernels use, so the kernel sources themselves
// run in the tests on machines without a GPU. A block's threads are cooperative fibers
// (ucontext) on one OS thread, run until each reaches a barrier; `__syncthreads` waits for the
// block, warp-collective instructions for the warp. The warp instructions follow the PTX ISA's
// definitions: mma.m16n8k16 fragments (row groupID = lane/4, column pair 2·(lane%4)),
// ldmatrix (lanes 8j..8j+7 address the rows of matrix j; lane i receives row i/4, columns
// 2·(i%4) and +1, or the transpose), shfl.bfly. Misuse the hardware would punish — a barrier
// not reached by every thread, a collective with exited lanes, an unaligned 16-byte or
// ldmatrix access — aborts with a message.
#pragma once

#include <ucontext.h>

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define TS_DEVICE inline
#define TS_GLOBAL extern "C"
#define TS_BOUNDS(threads)
#define TS_SHARED static
#define TS_ALIGN16 __attribute__((aligned(16)))
#define TS_NEG_INF (-INFINITY)

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emu: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::exit(3);
}

inline float f16_to_f32(uint16_t v) {
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return (float)h;
}
inline uint16_t f32_to_f16(float v) {
  _Float16 h = (_Float16)v;  // round to nearest even
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return (uint16_t)(u >> 16);
}

constexpr int MAX_WARPS = 32;
enum Wait { RUNNING = 0, AT_BLOCK = 1, AT_WARP = 2 };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // owned by the launch, reused by every block
  bool done = false;
  int wait = RUNNING;
};

constexpr size_t STACK_BYTES = 128 * 1024;

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = -1;
  std::function<void()> body;
  // Per-warp exchange slots of the collectives.
  uint32_t word[MAX_WARPS][32];
  const uint16_t* addr[MAX_WARPS][32];
  uint32_t a[MAX_WARPS][32][4], b[MAX_WARPS][32][2];
};
inline Block* g_block = nullptr;

inline void wait_here(int kind) {
  Block* blk = g_block;
  Fiber& f = blk->fibers[blk->current];
  f.wait = kind;
  swapcontext(&f.ctx, &blk->sched);
}
inline void sync_threads() { wait_here(AT_BLOCK); }
inline void warp_sync() { wait_here(AT_WARP); }

inline void trampoline() {
  Block* blk = g_block;
  blk->body();
  blk->fibers[blk->current].done = true;  // uc_link returns to the scheduler
}

// Releases one barrier whose every participant waits; false when none can be released.
inline bool release(Block& blk) {
  const int n = (int)blk.fibers.size();
  bool all_block = true, any = false;
  for (const Fiber& f : blk.fibers) {
    if (f.done) continue;
    any = true;
    all_block = all_block && f.wait == AT_BLOCK;
  }
  if (any && all_block) {
    for (Fiber& f : blk.fibers) f.wait = RUNNING;
    return true;
  }
  bool released = false;
  for (int w = 0; w * 32 < n; ++w) {
    bool all = true;
    for (int l = 0; l < 32 && w * 32 + l < n; ++l) {
      const Fiber& f = blk.fibers[w * 32 + l];
      all = all && !f.done && f.wait == AT_WARP;
    }
    if (!all) continue;
    for (int l = 0; l < 32; ++l) blk.fibers[w * 32 + l].wait = RUNNING;
    released = true;
  }
  return released;
}

// Runs `kernel` over the grid, one block at a time. (The schedulers' locals live across
// swapcontext, which GCC conservatively warns about like setjmp: each saved context is
// resumed exactly once, so they are intact; the tests build with -Wno-clobbered.)
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  const int n = (int)(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || n % 32 != 0 || n / 32 > MAX_WARPS)
    fail("the emulation runs 1-D blocks of whole warps only");
  gridDim = grid;
  blockDim = block;
  std::vector<std::unique_ptr<char[]>> stacks;
  for (int i = 0; i < n; ++i) stacks.emplace_back(new char[STACK_BYTES]);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block blk;
        blk.body = kernel;
        blk.fibers.resize(n);
        g_block = &blk;
        blockIdx = dim3{x, y, z};
        for (int i = 0; i < n; ++i) {
          Fiber& f = blk.fibers[i];
          f.stack = stacks[i].get();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = STACK_BYTES;
          f.ctx.uc_link = &blk.sched;
          makecontext(&f.ctx, trampoline, 0);
        }
        for (;;) {
          for (int i = 0; i < n; ++i) {
            Fiber& f = blk.fibers[i];
            if (f.done || f.wait != RUNNING) continue;
            blk.current = i;
            threadIdx = dim3{(unsigned)i, 0, 0};
            swapcontext(&blk.sched, &f.ctx);
          }
          bool all_done = true, runnable = false;
          for (const Fiber& f : blk.fibers) {
            all_done = all_done && f.done;
            runnable = runnable || (!f.done && f.wait == RUNNING);
          }
          if (all_done) break;
          if (!runnable && !release(blk))
            fail("deadlock: a barrier or warp collective that not every thread reaches");
        }
        g_block = nullptr;
      }
}

inline int warp_of() { return (int)threadIdx.x / 32; }
inline int lane_of() { return (int)threadIdx.x % 32; }

inline float shfl_xor(float v, int mask) {
  const int w = warp_of(), l = lane_of();
  std::memcpy(&g_block->word[w][l], &v, 4);
  warp_sync();
  float r;
  std::memcpy(&r, &g_block->word[w][l ^ mask], 4);
  warp_sync();
  return r;
}

inline void check16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "emu: %s: address not 16-byte aligned\n", what);
    fail("misaligned access");
  }
}

inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  const int w = warp_of(), l = lane_of();
  check16(p, "ldmatrix row");
  g_block->addr[w][l] = p;
  warp_sync();
  for (int j = 0; j < 4; ++j) {
    const uint16_t* row = g_block->addr[w][j * 8 + l / 4];
    r[j] = (uint32_t)row[2 * (l % 4)] | ((uint32_t)row[2 * (l % 4) + 1] << 16);
  }
  warp_sync();
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  const int w = warp_of(), l = lane_of();
  check16(p, "ldmatrix row");
  g_block->addr[w][l] = p;
  warp_sync();
  for (int j = 0; j < 4; ++j) {
    const uint16_t* r0 = g_block->addr[w][j * 8 + 2 * (l % 4)];
    const uint16_t* r1 = g_block->addr[w][j * 8 + 2 * (l % 4) + 1];
    r[j] = (uint32_t)r0[l / 4] | ((uint32_t)r1[l / 4] << 16);
  }
  warp_sync();
}

// d += A·B for the warp's 16x8x16 tile, from every lane's fragments.
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                     float (*load)(uint16_t)) {
  const int w = warp_of(), l = lane_of();
  for (int i = 0; i < 4; ++i) g_block->a[w][l][i] = a[i];
  g_block->b[w][l][0] = b0;
  g_block->b[w][l][1] = b1;
  warp_sync();
  auto half_of = [](uint32_t reg, int k) { return (uint16_t)(reg >> (16 * (k % 2))); };
  auto A = [&](int row, int k) {
    const uint32_t reg = g_block->a[w][(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)];
    return load(half_of(reg, k));
  };
  auto B = [&](int k, int col) {
    const uint32_t reg = g_block->b[w][col * 4 + (k % 8) / 2][k >= 8];
    return load(half_of(reg, k));
  };
  const int g = l / 4, t = l % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    out[e] = d[e] + sum;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

}  // namespace emu
