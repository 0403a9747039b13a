// CPU emulation of the CUDA router kernel (csrc/moc/router_kernel.cuh) for tests on machines
// without a GPU: the kernel source is compiled by g++ unchanged, every CUDA thread of a block
// is a std::thread, and warp shuffles / votes / barriers are emulated with std::barrier.
// Lanes exchange through a per-warp slot array between two warp barriers, which is exactly
// the all-lanes-converged semantics the kernel relies on (__shfl*_sync with a full mask).
//
// Input (stdin, little endian): int64 B, T, H, C, D, k, dtype (0 fp32, 1 fp16, 2 bf16),
// has_valid, has_limit; then q fp32 [B, T, H, D]; chunk [B, C, H, D] (4 or 2 bytes each);
// valid uint8 [B, C] if has_valid; limit int64 [B, T] if has_limit.
// Output (stdout): int32 [B, T, H, k].
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};

namespace emu {
thread_local dim3 thread_idx;
thread_local dim3 block_idx;

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32];
};
std::vector<std::unique_ptr<Warp>> warps;  // the warps of the running block
std::unique_ptr<std::barrier<>> block_bar;
std::vector<float> dynamic_smem;

inline Warp& warp() { return *warps[thread_idx.x / 32]; }

template <class T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 64 bits");
  Warp& w = warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[thread_idx.x & 31] = bits;
  w.bar.arrive_and_wait();
  const uint64_t got = w.slot[src_lane & 31];
  w.bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static  // one instance per kernel instantiation, shared by the block's threads
#define LOL_DYNAMIC_SMEM(T, name) T* name = emu::dynamic_smem.data()

template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return emu::exchange(v, int(threadIdx.x & 31) ^ mask);
}
template <class T>
T __shfl_sync(unsigned, T v, int src) {
  return emu::exchange(v, src);
}
inline bool __any_sync(unsigned, bool pred) {
  emu::Warp& w = emu::warp();
  w.slot[threadIdx.x & 31] = pred ? 1u : 0u;
  w.bar.arrive_and_wait();
  bool any = false;
  for (int l = 0; l < 32; ++l) any = any || w.slot[l] != 0;
  w.bar.arrive_and_wait();
  return any;
}
inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp() { emu::warp().bar.arrive_and_wait(); }

#include "moc/router_kernel.cuh"

using namespace lol::moc;

template <class E, int R, bool kVec>
void run(const std::vector<float>& q, const std::vector<unsigned char>& chunk,
         const uint8_t* valid, const int64_t* limit, int32_t* out, int64_t B, int64_t T,
         int64_t H, int64_t C, int D, int k) {
  const auto* c = reinterpret_cast<const typename E::storage*>(chunk.data());
  for (int64_t blk = 0; blk < B * T * H; ++blk) {
    emu::dynamic_smem.assign(size_t(D), 0.0f);
    emu::warps.clear();
    for (int w = 0; w < kWarps; ++w) emu::warps.push_back(std::make_unique<emu::Warp>());
    emu::block_bar = std::make_unique<std::barrier<>>(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        emu::thread_idx.x = unsigned(t);
        emu::block_idx.x = unsigned(blk);
        moc_route_kernel<E, R, kVec>(q.data(), c, valid, limit, out, T, H, C, D, k);
      });
    }
    for (auto& th : threads) th.join();
  }
}

template <class E, class... A>
void dispatch(int64_t k, bool vec, A&&... a) {
  if (k <= 32 && vec) run<E, 1, true>(a...);
  else if (k <= 32) run<E, 1, false>(a...);
  else if (vec) run<E, 2, true>(a...);
  else run<E, 2, false>(a...);
}

template <class T>
static void read(T* dst, size_t n) {
  if (n && std::fread(dst, sizeof(T), n, stdin) != n) {
    std::fprintf(stderr, "short input\n");
    std::exit(2);
  }
}

int main() {
  int64_t hdr[9];
  read(hdr, 9);
  const int64_t B = hdr[0], T = hdr[1], H = hdr[2], C = hdr[3], D = hdr[4], k = hdr[5];
  const int64_t dtype = hdr[6];
  std::vector<float> q(size_t(B * T * H * D));
  read(q.data(), q.size());
  const size_t elem = dtype == 0 ? 4 : 2;
  std::vector<unsigned char> chunk(size_t(B * C * H * D) * elem);
  read(chunk.data(), chunk.size());
  std::vector<uint8_t> valid(hdr[7] ? size_t(B * C) : 0);
  read(valid.data(), valid.size());
  std::vector<int64_t> limit(hdr[8] ? size_t(B * T) : 0);
  read(limit.data(), limit.size());
  std::vector<int32_t> out(size_t(B * T * H * k), INT32_MIN);  // poisoned
  const uint8_t* v = hdr[7] ? valid.data() : nullptr;
  const int64_t* l = hdr[8] ? limit.data() : nullptr;
  const int Di = int(D), ki = int(k);
  // The launcher's choice (router_kernel.cuh): vector loads when D % 8 == 0 (rows aligned).
  const bool vec = D % kLanes == 0;
  if (dtype == 0) dispatch<F32>(k, vec, q, chunk, v, l, out.data(), B, T, H, C, Di, ki);
  else if (dtype == 1) dispatch<F16>(k, vec, q, chunk, v, l, out.data(), B, T, H, C, Di, ki);
  else dispatch<BF16>(k, vec, q, chunk, v, l, out.data(), B, T, H, C, Di, ki);
  std::fwrite(out.data(), sizeof(int32_t), out.size(), stdout);
  return 0;
}
