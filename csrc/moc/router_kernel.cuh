// CUDA kernel of the MoC chunk router. Needs only router_core.h and the CUDA compiler, so it can
// be compiled standalone (nvcc -arch=sm_90 -c) where torch's CUDA headers are missing.
//
// One block per (b, t, h), kWarps warps. Each warp scores 32 chunks at a time (a thread per
// chunk, contract-order dot product, 16-byte loads when rows are aligned) and keeps its best 32*R keys sorted across its lanes
// (R = 1 for k <= 32, else 2); a batch whose best key beats the warp's current k-th key is merged
// in with a bitonic network. Warp 0 then merges the other warps' lists and writes the indices.
#pragma once

#include <stdint.h>

#include "router_core.h"

namespace lol {
namespace moc {

// The tests' CPU emulation of this kernel (tests/support/cuda_emu/) supplies its own dynamic smem.
#ifndef LOL_DYNAMIC_SMEM
#define LOL_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Compare-exchange with lane ^ j: this lane keeps the larger key when keep_max.
__device__ __forceinline__ uint64_t warp_cmpx(uint64_t v, int j, bool keep_max) {
  const uint64_t o = __shfl_xor_sync(kFullMask, v, j);
  return keep_max ? (v > o ? v : o) : (v < o ? v : o);
}

// Bitonic sort of 32 keys, one per lane, into ascending lane order.
__device__ __forceinline__ uint64_t warp_sort_ascending(uint64_t v, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
    const bool ascending = (lane & size) == 0;
#pragma unroll
    for (int j = size >> 1; j > 0; j >>= 1) v = warp_cmpx(v, j, ((lane & j) == 0) != ascending);
  }
  return v;
}

// Insert 32 candidate keys (one per lane, any order) into a list of 32*R keys held as
// list[r] = position r*32 + lane, sorted descending. Keeps the best 32*R of the union:
// max(list desc, candidates asc) is bitonic and holds the top half; a bitonic merge sorts it.
template <int R>
__device__ __forceinline__ void warp_insert(uint64_t (&list)[R], uint64_t cand, int lane) {
  cand = warp_sort_ascending(cand, lane);
  list[R - 1] = list[R - 1] > cand ? list[R - 1] : cand;
  if (R == 2) {  // distance 32: positions lane and lane + 32 sit in the same thread
    const uint64_t hi = list[0] > list[R - 1] ? list[0] : list[R - 1];
    const uint64_t lo = list[0] > list[R - 1] ? list[R - 1] : list[0];
    list[0] = hi;
    list[R - 1] = lo;
  }
#pragma unroll
  for (int j = 16; j > 0; j >>= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) list[r] = warp_cmpx(list[r], j, (lane & j) == 0);
  }
}

// Key at list position k - 1 (the current k-th best), broadcast to the warp.
template <int R>
__device__ __forceinline__ uint64_t warp_kth(const uint64_t (&list)[R], int k) {
  const uint64_t v = (R == 2 && k > 32) ? list[R - 1] : list[0];
  return __shfl_sync(kFullMask, v, (k - 1) & 31);
}

template <class E, int R, bool kVec>
__global__ void __launch_bounds__(kThreads)
    moc_route_kernel(const float* __restrict__ q, const typename E::storage* __restrict__ chunk,
                     const uint8_t* __restrict__ valid, const int64_t* __restrict__ limit,
                     int32_t* __restrict__ out, int64_t T, int64_t H, int64_t C, int D, int k) {
  LOL_DYNAMIC_SMEM(float, s_q);                 // [D] query row of this (b, t, h)
  __shared__ uint64_t s_list[kWarps][32 * R];   // per-warp candidate lists for the final merge
  const int64_t i_bth = blockIdx.x;             // (b * T + t) * H + h
  const int64_t i_h = i_bth % H;
  const int64_t i_bt = i_bth / H;
  const int64_t i_b = i_bt / T;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  for (int d = threadIdx.x; d < D; d += kThreads) s_q[d] = q[i_bth * D + d];
  __syncthreads();

  const int64_t end = scan_end(C, limit != nullptr ? limit[i_bt] : C);
  const uint8_t* vrow = valid != nullptr ? valid + i_b * C : nullptr;
  const typename E::storage* p_chunk = chunk + (i_b * C * H + i_h) * D;  // row c: + c * H * D
  uint64_t list[R];
#pragma unroll
  for (int r = 0; r < R; ++r) list[r] = 0;

  // The loop bound is warp-uniform, so every lane reaches the shuffles.
  for (int64_t c0 = int64_t(warp) * 32; c0 < end; c0 += kThreads) {
    const int64_t c = c0 + lane;
    uint64_t key = 0;
    if (c < end && (vrow == nullptr || vrow[c] != 0))
      key = rank_key(kVec ? chunk_score_vec8<E>(s_q, p_chunk + c * H * D, D)
                          : chunk_score<E>(s_q, p_chunk + c * H * D, D), c);
    if (__any_sync(kFullMask, key > warp_kth<R>(list, k))) warp_insert<R>(list, key, lane);
  }

#pragma unroll
  for (int r = 0; r < R; ++r) s_list[warp][r * 32 + lane] = list[r];
  __syncthreads();
  if (warp != 0) return;
  for (int w = 1; w < kWarps; ++w) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint64_t cand = s_list[w][r * 32 + lane];
      if (__any_sync(kFullMask, cand > warp_kth<R>(list, k))) warp_insert<R>(list, cand, lane);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) s_list[0][r * 32 + lane] = list[r];
  __syncwarp();
  if (lane == 0) write_indices(s_list[0], k, k, out + i_bth * k);
}

#if defined(__CUDACC__)
// Launch on `stream` for B*T*H blocks; D floats of dynamic shared memory.
template <class E>
inline cudaError_t launch_moc_route(const float* q, const typename E::storage* chunk,
                                    const uint8_t* valid, const int64_t* limit, int32_t* out,
                                    int64_t B, int64_t T, int64_t H, int64_t C, int D, int k,
                                    cudaStream_t stream) {
  const int64_t blocks = B * T * H;
  if (blocks == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * size_t(D);
  // Vector loads when every row starts 16-byte aligned: D % 8 == 0 and an aligned base.
  const bool vec = D % kLanes == 0 && reinterpret_cast<uintptr_t>(chunk) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (k <= 32 && vec) {
    moc_route_kernel<E, 1, true><<<grid, kThreads, smem, stream>>>(q, chunk, valid, limit, out,
                                                                    T, H, C, D, k);
  } else if (k <= 32) {
    moc_route_kernel<E, 1, false><<<grid, kThreads, smem, stream>>>(q, chunk, valid, limit, out,
                                                                     T, H, C, D, k);
  } else if (vec) {
    moc_route_kernel<E, 2, true><<<grid, kThreads, smem, stream>>>(q, chunk, valid, limit, out,
                                                                    T, H, C, D, k);
  } else {
    moc_route_kernel<E, 2, false><<<grid, kThreads, smem, stream>>>(q, chunk, valid, limit, out,
                                                                     T, H, C, D, k);
  }
  return cudaGetLastError();
}
#endif  // __CUDACC__

}  // namespace moc
}  // namespace lol
