// CUDA binding of lol_C::moc_route (the schema is defined in router_cpu.cpp). Built only when
// torch has CUDA (setup.py); the kernel itself is in router_kernel.cuh. Only device-generic c10
// headers are used (no c10/cuda), so this file also compiles against a CPU-only torch's headers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "router_binding.h"
#include "router_kernel.cuh"

namespace lol {
namespace moc {
namespace {

// Dynamic shared memory holds one fp32 query row; keep it under the 48 KiB default.
constexpr int64_t kMaxCudaD = 8192;

at::Tensor moc_route_cuda(const at::Tensor& q_mean, const at::Tensor& chunk_mean, int64_t k,
                          const std::optional<at::Tensor>& chunk_valid,
                          const std::optional<at::Tensor>& causal_limit) {
  TORCH_CHECK_VALUE(q_mean.is_cuda(), "moc_route (CUDA): q_mean must be a CUDA tensor");
  const c10::DeviceGuard guard(q_mean.device());
  const RouteInputs in = prepare_route_inputs(q_mean, chunk_mean, k, chunk_valid, causal_limit);
  TORCH_CHECK_VALUE(in.D <= kMaxCudaD, "moc_route (CUDA): D must be at most ", kMaxCudaD,
                    ", got ", in.D);
  TORCH_CHECK_VALUE(in.B * in.T * in.H < (int64_t(1) << 31),
                    "moc_route (CUDA): B * T * H must be below 2^31");
  at::Tensor out = at::empty({in.B, in.T, in.H, in.k}, q_mean.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  // The current torch stream of this device, as a raw cudaStream_t.
  const auto stream = static_cast<cudaStream_t>(
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(q_mean.device())
          .native_handle());
  const float* q = in.q.const_data_ptr<float>();
  const void* chunk = in.chunk.const_data_ptr();
  int32_t* o = out.mutable_data_ptr<int32_t>();
  const int D = static_cast<int>(in.D);
  const int kk = static_cast<int>(in.k);
  cudaError_t err;
  switch (in.chunk.scalar_type()) {
    case at::kHalf:
      err = launch_moc_route<F16>(q, static_cast<const uint16_t*>(chunk), valid_ptr(in),
                                  limit_ptr(in), o, in.B, in.T, in.H, in.C, D, kk, stream);
      break;
    case at::kBFloat16:
      err = launch_moc_route<BF16>(q, static_cast<const uint16_t*>(chunk), valid_ptr(in),
                                   limit_ptr(in), o, in.B, in.T, in.H, in.C, D, kk, stream);
      break;
    default:
      err = launch_moc_route<F32>(q, static_cast<const float*>(chunk), valid_ptr(in),
                                  limit_ptr(in), o, in.B, in.T, in.H, in.C, D, kk, stream);
      break;
  }
  TORCH_CHECK(err == cudaSuccess, "moc_route (CUDA): kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace moc
}  // namespace lol

TORCH_LIBRARY_IMPL(lol_C, CUDA, m) { m.impl("moc_route", &lol::moc::moc_route_cuda); }
