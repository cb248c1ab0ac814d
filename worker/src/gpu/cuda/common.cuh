// What tessera's kernels share: the element types (stored as raw bits, converted to f32 for
// arithmetic), the warp-level matrix instructions, shuffles and barriers. Compiled two ways:
// by nvcc to PTX (the real instructions below), and by the host compiler for the CPU
// emulation in emu.h, which gives each of these the meaning the PTX ISA documents, so the
// kernels' indexing is tested on the CPU (worker/src/gpu/emulator.rs).
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define TS_DEVICE __device__ __forceinline__
#define TS_GLOBAL extern "C" __global__
#define TS_BOUNDS(threads) __launch_bounds__(threads)
#define TS_SHARED __shared__
#define TS_ALIGN16 __align__(16)
#define TS_NEG_INF (__int_as_float(0xff800000))
#else
#include "emu.h"
#endif

namespace ts {

// Element types: `Bits` is the storage, `load` widens to f32, `store` rounds to nearest even.
struct F32 {
  typedef float Bits;
  static TS_DEVICE float load(float v) { return v; }
  static TS_DEVICE float store(float v) { return v; }
};

struct F16 {
  typedef uint16_t Bits;
#ifdef __CUDACC__
  static TS_DEVICE float load(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  static TS_DEVICE uint16_t store(float v) { return __half_as_ushort(__float2half_rn(v)); }
#else
  static float load(uint16_t v) { return emu::f16_to_f32(v); }
  static uint16_t store(float v) { return emu::f32_to_f16(v); }
#endif
};

struct BF16 {
  typedef uint16_t Bits;
#ifdef __CUDACC__
  static TS_DEVICE float load(uint16_t v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  static TS_DEVICE uint16_t store(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
#else
  static float load(uint16_t v) { return emu::bf16_to_f32(v); }
  static uint16_t store(float v) { return emu::f32_to_bf16(v); }
#endif
};

// Two 16-bit elements in one register, the lower column in the lower half (the layout of
// mma fragments and of memory).
template <class T>
TS_DEVICE uint32_t pack2(float lo, float hi) {
  return (uint32_t)T::store(lo) | ((uint32_t)T::store(hi) << 16);
}

#ifdef __CUDACC__
TS_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices from shared memory; lanes 8j..8j+7 give the row addresses of matrix j.
TS_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// The same, each matrix transposed on the way.
TS_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// d += a · b for one 16x8x16 tile (A row-major 16x16, B column-major 16x8, f32 accumulators).
template <class T>
TS_DEVICE void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
TS_DEVICE void mma16816<F16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
TS_DEVICE void mma16816<BF16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

TS_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// 16 bytes from global memory, and to shared memory.
TS_DEVICE void copy16(uint16_t* dst, const uint16_t* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}
TS_DEVICE void zero16(uint16_t* dst) { *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0); }

TS_DEVICE void sync_threads() { __syncthreads(); }
#else
using emu::ldmatrix_x4;
using emu::ldmatrix_x4_trans;
using emu::shfl_xor;
using emu::sync_threads;

template <class T>
void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma16816(d, a, b0, b1, &T::load);
}

inline void copy16(uint16_t* dst, const uint16_t* src) {
  emu::check16(dst, "16-byte store to shared memory");
  emu::check16(src, "16-byte load from global memory");
  for (int i = 0; i < 8; ++i) dst[i] = src[i];
}
inline void zero16(uint16_t* dst) {
  emu::check16(dst, "16-byte store to shared memory");
  for (int i = 0; i < 8; ++i) dst[i] = 0;
}
#endif

}  // namespace ts
