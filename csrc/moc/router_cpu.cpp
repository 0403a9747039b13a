// CPU implementation of lol_C::moc_route, the op's schema, and its Meta (fake) kernel.
// Includes only torch/library.h and the ATen headers it needs (fast builds, DESIGN.md §6).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "router_binding.h"
#include "router_core.h"

namespace lol {
namespace moc {
namespace {

// Tiles that share one pass over the chunk rows (a row is scored for each while it is in L1).
constexpr int kTileGroup = 8;

// Eight fp32 lanes as one GCC vector: elementwise IEEE mul/add, never fused (-ffp-contract=off).
typedef float v8f __attribute__((vector_size(32)));
static_assert(kLanes == 8, "v8f holds the kLanes score lanes");

// Scores of one fp32 chunk row against kTileGroup query rows: for each tile exactly the
// operations of chunk_score (router_core.h) in the same order; the tiles are interleaved only to
// give the CPU independent chains. The AVX2 clone is picked at load time where supported.
__attribute__((target_clones("avx2", "default")))
void score_tiles(const float* row, const float* const* q, int D, float* out) {
  v8f acc[kTileGroup];
  for (int i = 0; i < kTileGroup; ++i) acc[i] = v8f{};
  int d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    v8f r;
    std::memcpy(&r, row + d, sizeof(r));
    for (int i = 0; i < kTileGroup; ++i) {
      v8f qv;
      std::memcpy(&qv, q[i] + d, sizeof(qv));
      acc[i] = acc[i] + qv * r;
    }
  }
  for (int i = 0; i < kTileGroup; ++i)
    for (int j = 0; d + j < D; ++j) acc[i][j] = acc[i][j] + q[i][d + j] * row[d + j];
  for (int i = 0; i < kTileGroup; ++i) {
    const v8f l = acc[i];
    out[i] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }
}

// Chunk rows converted to fp32 and scored against every tile of a task while they sit in L1.
constexpr int64_t kChunkBlock = 32;

// Tasks are (b, h, span of tiles). A task walks its chunk rows once, block by block, and scores
// each block against all its tiles, kTileGroup at a time, so chunk_mean is read from memory
// about once per (b, h) rather than once per tile.
template <class E>
void route_cpu(const RouteInputs& in, int32_t* out) {
  const int64_t B = in.B, T = in.T, H = in.H, C = in.C;
  const int D = static_cast<int>(in.D);
  const int k = static_cast<int>(in.k);
  const float* q = in.q.const_data_ptr<float>();
  const auto* chunk = reinterpret_cast<const typename E::storage*>(in.chunk.const_data_ptr());
  const uint8_t* valid = valid_ptr(in);
  const int64_t* limit = limit_ptr(in);
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // Tiles per task: all T unless that leaves fewer than ~4 tasks per thread.
  const int64_t groups = (T + kTileGroup - 1) / kTileGroup;
  const int64_t splits = std::min<int64_t>(groups, (4 * threads + B * H - 1) / (B * H));
  const int64_t span = (groups + splits - 1) / splits * kTileGroup;
  const int64_t spans = (T + span - 1) / span;
  const int64_t tasks = B * H * spans;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / (H * spans);
    const int64_t h = (task / spans) % H;
    const int64_t t_begin = (task % spans) * span;
    const int64_t nt = std::min(span, T - t_begin);
    std::vector<TopK> top(static_cast<size_t>(nt), TopK(k));
    std::vector<int64_t> end(static_cast<size_t>(nt));
    int64_t max_end = 0;
    for (int64_t i = 0; i < nt; ++i) {
      end[i] = scan_end(C, limit ? limit[b * T + t_begin + i] : C);
      max_end = std::max(max_end, end[i]);
    }
    const uint8_t* vrow = valid ? valid + b * C : nullptr;
    std::vector<float> buf(static_cast<size_t>(kChunkBlock * D));
    const float* rows[kChunkBlock];
    int64_t ids[kChunkBlock];
    float score[kTileGroup];
    for (int64_t c0 = 0; c0 < max_end; c0 += kChunkBlock) {
      int nr = 0;  // valid rows of this block
      for (int64_t c = c0; c < std::min(c0 + kChunkBlock, max_end); ++c) {
        if (vrow != nullptr && vrow[c] == 0) continue;
        const auto* row = chunk + ((b * C + c) * H + h) * D;
        if (std::is_same<E, F32>::value) {
          rows[nr] = reinterpret_cast<const float*>(row);
        } else {  // fp16/bf16: convert once for all tiles
          float* dst = buf.data() + int64_t(nr) * D;
          for (int d = 0; d < D; ++d) dst[d] = E::load(row, d);
          rows[nr] = dst;
        }
        ids[nr++] = c;
      }
      for (int64_t g = 0; g < nt; g += kTileGroup) {
        const int64_t ng = std::min<int64_t>(kTileGroup, nt - g);
        const float* qrow[kTileGroup];
        for (int64_t i = 0; i < kTileGroup; ++i)  // padding tiles repeat tile g, ignored
          qrow[i] = q + ((b * T + t_begin + g + (i < ng ? i : 0)) * H + h) * D;
        for (int r = 0; r < nr; ++r) {
          score_tiles(rows[r], qrow, D, score);
          for (int64_t i = 0; i < ng; ++i) {
            if (ids[r] >= end[g + i]) continue;
            const uint64_t key = rank_key(score[i], ids[r]);
            if (key > top[g + i].threshold()) top[g + i].push(key);
          }
        }
      }
    }
    for (int64_t i = 0; i < nt; ++i)
      write_indices(top[i].heap, top[i].n, k, out + ((b * T + t_begin + i) * H + h) * k);
  }
}

at::Tensor moc_route_cpu(const at::Tensor& q_mean, const at::Tensor& chunk_mean, int64_t k,
                         const std::optional<at::Tensor>& chunk_valid,
                         const std::optional<at::Tensor>& causal_limit) {
  TORCH_CHECK_VALUE(q_mean.device().is_cpu(), "moc_route (CPU): q_mean must be a CPU tensor");
  const RouteInputs in = prepare_route_inputs(q_mean, chunk_mean, k, chunk_valid, causal_limit);
  at::Tensor out = at::empty({in.B, in.T, in.H, in.k}, q_mean.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  int32_t* o = out.mutable_data_ptr<int32_t>();
  switch (in.chunk.scalar_type()) {
    case at::kHalf: route_cpu<F16>(in, o); break;
    case at::kBFloat16: route_cpu<BF16>(in, o); break;
    default: route_cpu<F32>(in, o); break;
  }
  return out;
}

// Shapes only: what torch.compile / FakeTensor tracing sees.
at::Tensor moc_route_meta(const at::Tensor& q_mean, const at::Tensor& chunk_mean, int64_t k,
                          const std::optional<at::Tensor>& chunk_valid,
                          const std::optional<at::Tensor>& causal_limit) {
  TORCH_CHECK_VALUE(q_mean.dim() == 4 && chunk_mean.dim() == 4,
                    "moc_route: q_mean [B, T, H, D] and chunk_mean [B, C, H, D] must be 4-D");
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxK, "moc_route: k must be in [1, ", kMaxK, "], got ", k);
  (void)chunk_valid;
  (void)causal_limit;
  return at::empty_symint({q_mean.sym_size(0), q_mean.sym_size(1), q_mean.sym_size(2), k},
                          q_mean.options().dtype(at::kInt));
}

}  // namespace
}  // namespace moc
}  // namespace lol

TORCH_LIBRARY(lol_C, m) {
  m.def(
      "moc_route(Tensor q_mean, Tensor chunk_mean, int k, Tensor? chunk_valid=None, "
      "Tensor? causal_limit=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lol_C, CPU, m) { m.impl("moc_route", &lol::moc::moc_route_cpu); }

TORCH_LIBRARY_IMPL(lol_C, Meta, m) { m.impl("moc_route", &lol::moc::moc_route_meta); }
