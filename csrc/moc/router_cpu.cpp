// CPU implementation of lol_C::moc_route, the op's schema, and its Meta (fake) kernel.
// Includes only torch/library.h and the ATen headers it needs (fast builds, DESIGN.md §6).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "router_binding.h"
#include "router_core.h"

namespace lol {
namespace moc {
namespace {

// Tiles that share one pass over the chunk rows (a row is scored for each while it is in L1).
constexpr int64_t kTileGroup = 8;

template <class E>
void route_cpu(const RouteInputs& in, int32_t* out) {
  const int64_t B = in.B, T = in.T, H = in.H, C = in.C;
  const int D = static_cast<int>(in.D);
  const int k = static_cast<int>(in.k);
  const float* q = in.q.const_data_ptr<float>();
  const auto* chunk = reinterpret_cast<const typename E::storage*>(in.chunk.const_data_ptr());
  const uint8_t* valid = valid_ptr(in);
  const int64_t* limit = limit_ptr(in);
  const int64_t groups = (T + kTileGroup - 1) / kTileGroup;
  const int64_t tasks = B * H * groups;
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / (H * groups);
    const int64_t h = (task / groups) % H;
    const int64_t t0 = (task % groups) * kTileGroup;
    const int64_t nt = std::min(kTileGroup, T - t0);
    TopK top[kTileGroup];
    int64_t end[kTileGroup];
    const float* qrow[kTileGroup];
    int64_t max_end = 0;
    for (int64_t i = 0; i < nt; ++i) {
      top[i] = TopK(k);
      end[i] = scan_end(C, limit ? limit[b * T + t0 + i] : C);
      qrow[i] = q + ((b * T + t0 + i) * H + h) * D;
      max_end = std::max(max_end, end[i]);
    }
    const uint8_t* vrow = valid ? valid + b * C : nullptr;
    for (int64_t c = 0; c < max_end; ++c) {
      if (vrow != nullptr && vrow[c] == 0) continue;
      const auto* row = chunk + ((b * C + c) * H + h) * D;
      for (int64_t i = 0; i < nt; ++i) {
        if (c >= end[i]) continue;
        const uint64_t key = rank_key(chunk_score<E>(qrow[i], row, D), c);
        if (key > top[i].threshold()) top[i].push(key);
      }
    }
    for (int64_t i = 0; i < nt; ++i)
      write_indices(top[i].heap, top[i].n, k, out + ((b * T + t0 + i) * H + h) * k);
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
