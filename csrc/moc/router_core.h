// Torch-free core of the MoC chunk router, shared by the CPU build and the CUDA kernel.
//
// Contract (DESIGN.md §4, lk.moc_route): for each (b, t, h) pick the eligible chunks c
// (chunk_valid[b, c] and c < causal_limit[b, t]) with the k largest fp32 scores
// q_mean[b, t, h] . chunk_mean[b, c, h]; ties go to the lower chunk index; output ascending
// chunk indices, -1 padded.
//
// Score order (bit-exact in the torch reference, this CPU code and the CUDA kernel): inputs are
// converted exactly to fp32; lane j (j = 0..7) sums the products of d = j, j + 8, j + 16, ...
// (d < D) in increasing d, starting from 0.0f, each product and sum rounded to fp32 (no FMA);
// then score = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). NaN scores rank as -inf and
// -0.0 ties with +0.0.
#pragma once

#include <stdint.h>
#include <string.h>

// LOL_HD marks the shared functions; plain g++ (no CUDA) sees ordinary inline functions.
#if defined(__CUDACC__)
#define LOL_HD __host__ __device__ __forceinline__
#else
#define LOL_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define LOL_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define LOL_UNROLL  // nvcc's host pass: the host compiler unrolls the constant trip count itself
#else
#define LOL_UNROLL _Pragma("GCC unroll 8")
#endif

namespace lol {
namespace moc {

constexpr int kLanes = 8;   // partial sums of the score (part of the bit-exact contract)
constexpr int kMaxK = 64;   // largest k: the CUDA kernel keeps 64 candidates per warp

LOL_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

LOL_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Exact IEEE binary16 -> binary32 (subnormals, inf and NaN included).
LOL_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in fp32
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

LOL_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// Storage types of chunk_mean: raw bits, so this header needs no torch or CUDA half types.
// load8 reads p[0..8) with p 16-byte aligned: one or two vector loads on the GPU.
struct F32 {
  using storage = float;
  static LOL_HD float load(const float* p, int64_t i) { return p[i]; }
  static LOL_HD void load8(const float* p, float (&v)[8]) {
#if defined(__CUDA_ARCH__)
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#else
    for (int j = 0; j < 8; ++j) v[j] = p[j];
#endif
  }
};

template <float (*Convert)(uint16_t)>
LOL_HD void load8_u16(const uint16_t* p, float (&v)[8]) {
#if defined(__CUDA_ARCH__)
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
LOL_UNROLL
  for (int j = 0; j < 4; ++j) {  // little endian: element 2j is the low half of word j
    v[2 * j] = Convert(uint16_t(w[j] & 0xffffu));
    v[2 * j + 1] = Convert(uint16_t(w[j] >> 16));
  }
#else
  for (int j = 0; j < 8; ++j) v[j] = Convert(p[j]);
#endif
}

struct F16 {
  using storage = uint16_t;
  static LOL_HD float load(const uint16_t* p, int64_t i) { return half_to_float(p[i]); }
  static LOL_HD void load8(const uint16_t* p, float (&v)[8]) { load8_u16<half_to_float>(p, v); }
};
struct BF16 {
  using storage = uint16_t;
  static LOL_HD float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
  static LOL_HD void load8(const uint16_t* p, float (&v)[8]) { load8_u16<bf16_to_float>(p, v); }
};

// Rounded multiply and add that the compiler may not fuse into an FMA (nvcc fuses by default).
LOL_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // host builds use -ffp-contract=off (setup.py)
#endif
}

LOL_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The fixed combination of the eight lane sums.
LOL_HD float lane_tree(const float (&lane)[kLanes]) {
  return add_rn(add_rn(add_rn(lane[0], lane[1]), add_rn(lane[2], lane[3])),
                add_rn(add_rn(lane[4], lane[5]), add_rn(lane[6], lane[7])));
}

// Score of one chunk row (D values of chunk_mean) against a fp32 query row, in contract order.
template <class E>
LOL_HD float chunk_score(const float* q, const typename E::storage* c, int D) {
  float lane[kLanes];
LOL_UNROLL
  for (int j = 0; j < kLanes; ++j) lane[j] = 0.0f;
  int d = 0;
  for (; d + kLanes <= D; d += kLanes) {
LOL_UNROLL
    for (int j = 0; j < kLanes; ++j) lane[j] = add_rn(lane[j], mul_rn(q[d + j], E::load(c, d + j)));
  }
LOL_UNROLL
  for (int j = 0; j < kLanes; ++j) {  // tail; constant indices keep lane[] in registers
    if (d + j < D) lane[j] = add_rn(lane[j], mul_rn(q[d + j], E::load(c, d + j)));
  }
  return lane_tree(lane);
}

// chunk_score for D % 8 == 0 and a 16-byte aligned row: the same operations in the same order,
// with the eight values of each step read by E::load8.
template <class E>
LOL_HD float chunk_score_vec8(const float* q, const typename E::storage* c, int D) {
  float lane[kLanes];
LOL_UNROLL
  for (int j = 0; j < kLanes; ++j) lane[j] = 0.0f;
  for (int d = 0; d < D; d += kLanes) {
    float v[kLanes];
    E::load8(c + d, v);
LOL_UNROLL
    for (int j = 0; j < kLanes; ++j) lane[j] = add_rn(lane[j], mul_rn(q[d + j], v[j]));
  }
  return lane_tree(lane);
}

// Total order of candidates as one integer: higher score first, then lower chunk index.
// Key 0 means "no candidate" and is below every real key (even a NaN/-inf score).
LOL_HD uint64_t rank_key(float score, int64_t c) {
  uint32_t u = float_bits(score);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;  // NaN ranks as -inf
  if ((u & 0x7fffffffu) == 0u) u = 0u;                   // -0.0 ties with +0.0
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);        // monotone float -> uint map
  return (uint64_t(u) << 32) | uint64_t(0xffffffffu - uint32_t(c));
}

LOL_HD int32_t key_index(uint64_t key) { return int32_t(0xffffffffu - uint32_t(key)); }

// Chunk c is eligible for a tile when c < causal_limit and chunk_valid (nullptr = all valid).
LOL_HD bool eligible(const uint8_t* valid_row, int64_t limit, int64_t c) {
  return c < limit && (valid_row == nullptr || valid_row[c] != 0);
}

// The chunks a tile may scan: [0, min(C, causal_limit)).
LOL_HD int64_t scan_end(int64_t C, int64_t limit) { return limit < C ? (limit < 0 ? 0 : limit) : C; }

// Bounded min-heap of the best k keys seen so far (k <= kMaxK).
struct TopK {
  uint64_t heap[kMaxK];
  int k;
  int n;

  LOL_HD TopK() : k(0), n(0) {}
  LOL_HD explicit TopK(int k_) : k(k_), n(0) {}

  LOL_HD uint64_t threshold() const { return n < k ? 0u : heap[0]; }

  LOL_HD void push(uint64_t key) {
    if (n < k) {  // sift up
      int i = n++;
      while (i > 0) {
        const int p = (i - 1) >> 1;
        if (heap[p] <= key) break;
        heap[i] = heap[p];
        i = p;
      }
      heap[i] = key;
    } else if (key > heap[0]) {  // replace the worst, sift down
      int i = 0;
      for (;;) {
        int m = 2 * i + 1;
        if (m >= n) break;
        if (m + 1 < n && heap[m + 1] < heap[m]) ++m;
        if (heap[m] >= key) break;
        heap[i] = heap[m];
        i = m;
      }
      heap[i] = key;
    }
  }
};

// Write the chunk indices of the nonzero keys in ascending chunk order, then -1 up to k.
LOL_HD void write_indices(const uint64_t* keys, int n, int k, int32_t* out) {
  int m = 0;
  for (int i = 0; i < n; ++i) {
    if (keys[i] == 0u) continue;
    const int32_t c = key_index(keys[i]);
    int j = m++;
    while (j > 0 && out[j - 1] > c) {  // insertion sort: k <= 64
      out[j] = out[j - 1];
      --j;
    }
    out[j] = c;
  }
  for (int i = m; i < k; ++i) out[i] = -1;
}

}  // namespace moc
}  // namespace lol
