// GEGLU as diffusers' FeedForward computes it: the projection's last dimension holds
// [value | gate]; out = value · GELU(gate) with the exact (erf) GELU, as torch's F.gelu.
// One read of each input element, one write of each output, arithmetic in f32.
//
// Layout: p is [rows, 2·inner] contiguous, out [rows, inner]. Blocks cover 256 columns of a
// row; block rows step by the grid's height.
#pragma once
#include "common.cuh"

namespace ts {

constexpr int GEGLU_THREADS = 256;

template <class T>
TS_DEVICE void geglu(const typename T::Bits* p, typename T::Bits* out, int rows, int inner) {
  const int col = blockIdx.x * GEGLU_THREADS + threadIdx.x;
  if (col >= inner) return;
  for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
    const typename T::Bits* pr = p + row * 2 * inner;
    const float value = T::load(pr[col]);
    const float gate = T::load(pr[inner + col]);
    const float gelu = 0.5f * gate * (1.f + erff(gate * 0.70710678118654752f));
    out[row * inner + col] = T::store(value * gelu);
  }
}

}  // namespace ts

#define TS_GEGLU(SUFFIX, T)                                                                   \
  TS_GLOBAL void TS_BOUNDS(256) tessera_geglu_##SUFFIX(const T::Bits* p, T::Bits* out,        \
                                                        int rows, int inner) {                \
    ts::geglu<T>(p, out, rows, inner);                                                        \
  }
