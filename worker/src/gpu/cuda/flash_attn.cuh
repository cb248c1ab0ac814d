// Fused attention, softmax(q·kᵀ·scale)·v, in the manner of FlashAttention-2 (Dao, 2023): each
// block owns 64 queries of one (batch, head); its four warps own 16 each and stream the keys
// and values through shared memory 64 at a time, keeping the running row maximum, the running
// row sum and the output in registers (online softmax), so no score matrix ever reaches memory.
// Both products use the tensor cores' 16x8x16 mma with f32 accumulators; the probabilities of
// q·kᵀ go into the second product straight from the first one's accumulator registers.
//
// Layout: q, k, v and o are [batch, tokens, heads, d] with arbitrary batch, token and head
// strides (elements) and unit stride along d, the layout of a (batch, tokens, heads·d)
// projection: no transposes before or after. d ≤ D, the head size padded to the kernel's
// D (16, 32, 64 or 128); the padding is zero in shared memory and never stored.
#pragma once
#include "common.cuh"

namespace ts {

constexpr int FA_BM = 64;       // queries per block
constexpr int FA_BN = 64;       // keys per step
constexpr int FA_THREADS = 128; // four warps

// Rows [row0, row0 + 64) of one (batch, head) into shared memory, row-major with `stride`
// elements per row; rows past `rows` and columns past `d` are zero. `vec`: 16-byte loads are
// aligned (d, every stride and the base are multiples of 8 elements).
template <int D>
TS_DEVICE void fa_load_tile(uint16_t* sm, int stride, const uint16_t* base, long long row_stride,
                            int row0, int rows, int d, int vec, int tid) {
  constexpr int CHUNKS = D / 8;  // 8 elements (16 bytes) per chunk
#pragma unroll
  for (int i = 0; i < FA_BM * CHUNKS / FA_THREADS; ++i) {
    const int idx = tid + i * FA_THREADS;
    const int r = idx / CHUNKS;
    const int col = (idx % CHUNKS) * 8;
    uint16_t* dst = sm + r * stride + col;
    const int row = row0 + r;
    if (row >= rows || col >= d) {
      zero16(dst);
      continue;
    }
    const uint16_t* src = base + (long long)row * row_stride + col;
    if (vec && col + 8 <= d) {
      copy16(dst, src);
    } else {
      for (int j = 0; j < 8; ++j) dst[j] = col + j < d ? src[j] : (uint16_t)0;
    }
  }
}

template <class T, int D>
TS_DEVICE void flash_attn(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* o,
                          long long q_sb, long long q_sn, long long q_sh, long long k_sb,
                          long long k_sn, long long k_sh, long long v_sb, long long v_sn,
                          long long v_sh, long long o_sb, long long o_sn, long long o_sh,
                          int nq, int nk, int d, float scale_log2, int vec) {
  constexpr int STRIDE = D + 8;  // padded rows: ldmatrix's eight row reads hit distinct banks
  TS_SHARED TS_ALIGN16 uint16_t s_k[FA_BN * STRIDE];  // first holds the block's queries
  TS_SHARED TS_ALIGN16 uint16_t s_v[FA_BN * STRIDE];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment row group and column pair
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * FA_BM;
  const uint16_t* qb = q + b * q_sb + h * q_sh;
  const uint16_t* kb = k + b * k_sb + h * k_sh;
  const uint16_t* vb = v + b * v_sb + h * v_sh;

  // The warp's 16 queries as mma A fragments, kept in registers for the whole loop.
  fa_load_tile<D>(s_k, STRIDE, qb, q_sn, m0, nq, d, vec, tid);
  sync_threads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qf[kk], s_k + (warp * 16 + lane % 16) * STRIDE + kk * 16 + (lane / 16) * 8);

  float acc[D / 8][4];  // output rows g and g+8, columns 8j + 2t, +1
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float row_max[2] = {TS_NEG_INF, TS_NEG_INF};  // in log2 units (scores · scale · log2 e)
  float row_sum[2] = {0.f, 0.f};  // this thread's share; the quad's shares add up at the end

  for (int n0 = 0; n0 < nk; n0 += FA_BN) {
    sync_threads();  // the previous keys (or the queries) are no longer read
    fa_load_tile<D>(s_k, STRIDE, kb, k_sn, n0, nk, d, vec, tid);
    fa_load_tile<D>(s_v, STRIDE, vb, v_sn, n0, nk, d, vec, tid);
    sync_threads();

    // s = q·kᵀ for 16 queries × 64 keys: eight 16x8 accumulator tiles.
    float s[FA_BN / 8][4];
#pragma unroll
    for (int j = 0; j < FA_BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < FA_BN / 16; ++np) {
        uint32_t kf[4];  // B fragments of key tiles 2np (kf0, kf1) and 2np+1 (kf2, kf3)
        const int key = np * 16 + lane % 8 + (lane / 16) * 8;
        const int col = kk * 16 + ((lane / 8) % 2) * 8;
        ldmatrix_x4(kf, s_k + key * STRIDE + col);
        mma16816<T>(s[2 * np], qf[kk], kf[0], kf[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // Online softmax: scale, mask the keys past nk, new row maxima, rescale what came before.
    float new_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int j = 0; j < FA_BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + j * 8 + 2 * t + (e & 1);
        s[j][e] = key < nk ? s[j][e] * scale_log2 : TS_NEG_INF;
        new_max[e / 2] = fmaxf(new_max[e / 2], s[j][e]);
      }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      new_max[r] = fmaxf(new_max[r], shfl_xor(new_max[r], 1));
      new_max[r] = fmaxf(new_max[r], shfl_xor(new_max[r], 2));
      // The first step has at least one real key (n0 = 0 < nk), so new_max is finite.
      corr[r] = exp2f(row_max[r] - new_max[r]);
      row_max[r] = new_max[r];
      row_sum[r] *= corr[r];
    }
#pragma unroll
    for (int j = 0; j < FA_BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - row_max[e / 2]);
        row_sum[e / 2] += s[j][e];
      }
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      acc[j][0] *= corr[0];
      acc[j][1] *= corr[0];
      acc[j][2] *= corr[1];
      acc[j][3] *= corr[1];
    }

    // acc += p·v: the accumulator tiles 2kk and 2kk+1 of p are the A fragment of keys
    // 16kk..16kk+15.
#pragma unroll
    for (int kk = 0; kk < FA_BN / 16; ++kk) {
      const uint32_t pa[4] = {
          pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
          pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
          pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vf[4];  // B fragments of output columns 16dp.. (vf0, vf1) and 16dp+8.. (vf2, vf3)
        const int key = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8;
        const int col = dp * 16 + (lane / 16) * 8;
        ldmatrix_x4_trans(vf, s_v + key * STRIDE + col);
        mma16816<T>(acc[2 * dp], pa, vf[0], vf[1]);
        mma16816<T>(acc[2 * dp + 1], pa, vf[2], vf[3]);
      }
    }
  }

  // Normalise by the row sums (summed over the quad) and store rows g and g+8.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += shfl_xor(l, 1);
    l += shfl_xor(l, 2);
    inv[r] = 1.f / l;
  }
  uint16_t* ob = o + b * o_sb + h * o_sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    if (row >= nq) continue;
    uint16_t* orow = ob + (long long)row * o_sn;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int col = j * 8 + 2 * t;
      if (col < d) orow[col] = T::store(acc[j][2 * r] * inv[r]);
      if (col + 1 < d) orow[col + 1] = T::store(acc[j][2 * r + 1] * inv[r]);
    }
  }
}

}  // namespace ts

#define TS_FLASH_ATTN(NAME, T, D)                                                              \
  TS_GLOBAL void TS_BOUNDS(128) NAME(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* o,     \
                      long long q_sb, long long q_sn, long long q_sh, long long k_sb,           \
                      long long k_sn, long long k_sh, long long v_sb, long long v_sn,           \
                      long long v_sh, long long o_sb, long long o_sn, long long o_sh, int nq,   \
                      int nk, int d, float scale_log2, int vec) {                               \
    ts::flash_attn<T, D>(q, k, v, o, q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh,      \
                         o_sb, o_sn, o_sh, nq, nk, d, scale_log2, vec);                         \
  }
