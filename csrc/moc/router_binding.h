// Argument checks and input preparation shared by the CPU and CUDA bindings of lol_C::moc_route.
// The public Python wrapper (lol_kernels/moc/moc_route_op.py) validates with friendlier messages;
// these checks keep a direct torch.ops.lol_C.moc_route call from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "router_core.h"

namespace lol {
namespace moc {

struct RouteInputs {
  at::Tensor q;      // [B, T, H, D] fp32, contiguous
  at::Tensor chunk;  // [B, C, H, D] fp32 / fp16 / bf16, contiguous
  at::Tensor valid;  // [B, C] bool, contiguous; undefined = every chunk valid
  at::Tensor limit;  // [B, T] int64, contiguous; undefined = no causal limit
  int64_t B, T, H, D, C, k;
};

inline RouteInputs prepare_route_inputs(const at::Tensor& q_mean, const at::Tensor& chunk_mean,
                                        int64_t k, const std::optional<at::Tensor>& chunk_valid,
                                        const std::optional<at::Tensor>& causal_limit) {
  TORCH_CHECK_VALUE(q_mean.dim() == 4, "moc_route: q_mean must be [B, T, H, D], got ",
                    q_mean.sizes());
  TORCH_CHECK_VALUE(chunk_mean.dim() == 4, "moc_route: chunk_mean must be [B, C, H, D], got ",
                    chunk_mean.sizes());
  RouteInputs in;
  in.B = q_mean.size(0);
  in.T = q_mean.size(1);
  in.H = q_mean.size(2);
  in.D = q_mean.size(3);
  in.C = chunk_mean.size(1);
  in.k = k;
  TORCH_CHECK_VALUE(chunk_mean.size(0) == in.B && chunk_mean.size(2) == in.H &&
                        chunk_mean.size(3) == in.D,
                    "moc_route: chunk_mean must be [B, C, H, D] with B, H, D of q_mean ",
                    q_mean.sizes(), ", got ", chunk_mean.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxK, "moc_route: k must be in [1, ", kMaxK, "], got ", k);
  TORCH_CHECK_VALUE(in.C < (int64_t(1) << 31), "moc_route: C must fit int32, got ", in.C);
  TORCH_CHECK_VALUE(in.D <= (int64_t(1) << 16), "moc_route: D must be at most 65536, got ", in.D);
  TORCH_CHECK_VALUE(chunk_mean.device() == q_mean.device(),
                    "moc_route: chunk_mean must be on q_mean's device");
  const auto st = chunk_mean.scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(st) && q_mean.is_floating_point(),
                   "moc_route: q_mean and chunk_mean must be floating tensors");
  // fp32 conversion is exact for fp16/bf16 and is the contract's float() for fp64.
  in.q = q_mean.to(at::kFloat).contiguous();
  const bool native = st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
  in.chunk = (native ? chunk_mean : chunk_mean.to(at::kFloat)).contiguous();
  if (chunk_valid.has_value() && chunk_valid->defined()) {
    const auto& v = *chunk_valid;
    TORCH_CHECK_TYPE(v.scalar_type() == at::kBool, "moc_route: chunk_valid must be bool");
    TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == in.B && v.size(1) == in.C,
                      "moc_route: chunk_valid must be [B, C], got ", v.sizes());
    TORCH_CHECK_VALUE(v.device() == q_mean.device(),
                      "moc_route: chunk_valid must be on q_mean's device");
    in.valid = v.contiguous();
  }
  if (causal_limit.has_value() && causal_limit->defined()) {
    const auto& l = *causal_limit;
    TORCH_CHECK_TYPE(at::isIntegralType(l.scalar_type(), /*includeBool=*/false),
                     "moc_route: causal_limit must be an integer tensor");
    TORCH_CHECK_VALUE(l.dim() == 2 && l.size(0) == in.B && l.size(1) == in.T,
                      "moc_route: causal_limit must be [B, T], got ", l.sizes());
    TORCH_CHECK_VALUE(l.device() == q_mean.device(),
                      "moc_route: causal_limit must be on q_mean's device");
    in.limit = l.to(at::kLong).contiguous();
  }
  return in;
}

inline const uint8_t* valid_ptr(const RouteInputs& in) {
  return in.valid.defined() ? reinterpret_cast<const uint8_t*>(in.valid.const_data_ptr()) : nullptr;
}

inline const int64_t* limit_ptr(const RouteInputs& in) {
  return in.limit.defined() ? in.limit.const_data_ptr<int64_t>() : nullptr;
}

}  // namespace moc
}  // namespace lol
