// GroupNorm (diffusers' formula: biased variance, f32 statistics for half inputs), optionally
// followed by SiLU, in two kernels over the same grid of (chunk, sample·group) blocks:
// `stats` reduces each chunk of a group to its count, mean and sum of squared deviations
// (Welford, merged with Chan et al.'s formula); `apply` merges its group's chunk moments and
// writes (x − mean)·rstd·w + b (then x·sigmoid(x)). Many chunks per group keep the whole GPU
// busy where one block per group would leave most of it idle (64 groups in an SDXL UNet).
//
// Layout: x and y are [batch, channels, hw] contiguous, so group (b, g) is the contiguous run
// of `group_len = channels / groups · hw` elements starting at (b·groups + g)·group_len.
#pragma once
#include "common.cuh"

namespace ts {

constexpr int GN_THREADS = 256;

struct Moments {
  float n, mean, m2;
};

TS_DEVICE Moments merge(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float delta = b.mean - a.mean;
  const float wb = b.n / n;
  return Moments{n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// The block's merged moments, in every thread.
TS_DEVICE Moments block_merge(Moments m, Moments* scratch) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int off = 16; off > 0; off /= 2) {
    const Moments o{shfl_xor(m.n, off), shfl_xor(m.mean, off), shfl_xor(m.m2, off)};
    m = merge(m, o);
  }
  if (lane == 0) scratch[warp] = m;
  sync_threads();
  if (warp == 0) {
    m = lane < GN_THREADS / 32 ? scratch[lane] : Moments{0.f, 0.f, 0.f};
    for (int off = 16; off > 0; off /= 2) {
      const Moments o{shfl_xor(m.n, off), shfl_xor(m.mean, off), shfl_xor(m.m2, off)};
      m = merge(m, o);
    }
    if (lane == 0) scratch[GN_THREADS / 32] = m;
  }
  sync_threads();
  return scratch[GN_THREADS / 32];
}

template <class T>
TS_DEVICE void group_norm_stats(const typename T::Bits* x, float* part, int group_len,
                                int chunk_len, int chunks) {
  TS_SHARED Moments scratch[GN_THREADS / 32 + 1];
  const int bg = blockIdx.y, c = blockIdx.x, tid = threadIdx.x;
  const typename T::Bits* base = x + (long long)bg * group_len;
  const int start = c * chunk_len;
  const int end = start + chunk_len < group_len ? start + chunk_len : group_len;
  Moments m{0.f, 0.f, 0.f};
  for (int i = start + tid; i < end; i += GN_THREADS) {
    const float v = T::load(base[i]);
    m.n += 1.f;
    const float delta = v - m.mean;
    m.mean += delta / m.n;
    m.m2 += delta * (v - m.mean);
  }
  m = block_merge(m, scratch);
  if (tid == 0) {
    float* p = part + ((long long)bg * chunks + c) * 3;
    p[0] = m.n;
    p[1] = m.mean;
    p[2] = m.m2;
  }
}

template <class T>
TS_DEVICE void group_norm_apply(const typename T::Bits* x, const typename T::Bits* w,
                                const typename T::Bits* bias, typename T::Bits* y,
                                const float* part, int group_len, int chunk_len, int chunks,
                                int groups, int hw, float eps, int silu) {
  TS_SHARED Moments scratch[GN_THREADS / 32 + 1];
  const int bg = blockIdx.y, c = blockIdx.x, tid = threadIdx.x;
  Moments m{0.f, 0.f, 0.f};
  for (int i = tid; i < chunks; i += GN_THREADS) {
    const float* p = part + ((long long)bg * chunks + i) * 3;
    m = merge(m, Moments{p[0], p[1], p[2]});
  }
  m = block_merge(m, scratch);
  const float mean = m.mean;
  const float rstd = 1.f / sqrtf(m.m2 / m.n + eps);

  const long long off = (long long)bg * group_len;
  const int first_channel = (bg % groups) * (group_len / hw);
  const int start = c * chunk_len;
  const int end = start + chunk_len < group_len ? start + chunk_len : group_len;
  // Channel and position of this thread's first element, then stepped without division.
  int i = start + tid;
  int ch = i / hw, rem = i % hw;
  for (; i < end; i += GN_THREADS) {
    const float scale = rstd * T::load(w[first_channel + ch]);
    float v = (T::load(x[off + i]) - mean) * scale + T::load(bias[first_channel + ch]);
    if (silu) v = v / (1.f + expf(-v));
    y[off + i] = T::store(v);
    rem += GN_THREADS;
    while (rem >= hw) {
      rem -= hw;
      ++ch;
    }
  }
}

}  // namespace ts

#define TS_GROUP_NORM(SUFFIX, T)                                                              \
  TS_GLOBAL void TS_BOUNDS(256) tessera_group_norm_stats_##SUFFIX(                            \
      const T::Bits* x, float* part, int group_len, int chunk_len, int chunks) {              \
    ts::group_norm_stats<T>(x, part, group_len, chunk_len, chunks);                           \
  }                                                                                           \
  TS_GLOBAL void TS_BOUNDS(256) tessera_group_norm_apply_##SUFFIX(                            \
      const T::Bits* x, const T::Bits* w, const T::Bits* b, T::Bits* y, const float* part,    \
      int group_len, int chunk_len, int chunks, int groups, int hw, float eps, int silu) {    \
    ts::group_norm_apply<T>(x, w, b, y, part, group_len, chunk_len, chunks, groups, hw, eps,  \
                            silu);                                                            \
  }
