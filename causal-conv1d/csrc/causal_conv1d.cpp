// PyTorch binding of the causal conv1d kernels: checks, allocation, stream. Kernels are in the .cu file.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <limits>
#include <vector>

#include "causal_conv1d.h"

namespace {

using causal_conv1d::DType;
using causal_conv1d::Params;

// Test aid: when set, outputs are filled with NaN before the kernels run (unwritten elements show up).
bool g_poison = false;

at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (g_poison) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

Params make_params(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   bool silu, bool reverse) {
  TORCH_CHECK(x.is_cuda(), "causal_conv1d: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 3, "causal_conv1d: x must be (batch, dim, seqlen), got ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2) && x.stride(0) >= x.size(1) * x.size(2),
              "causal_conv1d: x must have contiguous (dim, seqlen) rows (a channel slice is fine)");
  TORCH_CHECK(weight.is_cuda() && weight.device() == x.device(), "causal_conv1d: weight must be on x's device");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "causal_conv1d: the binding takes a contiguous float32 weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1), "causal_conv1d: weight must be (dim, width), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) >= 2 && weight.size(1) <= 4, "causal_conv1d: width must be 2, 3 or 4, got ",
              weight.size(1));
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->dim() == 1 && bias->size(0) == x.size(1),
                "causal_conv1d: bias must be a contiguous float32 (dim,) tensor on x's device");
  }
  Params p;
  switch (x.scalar_type()) {
    case at::kFloat: p.dtype = DType::kFloat32; break;
    case at::kHalf: p.dtype = DType::kFloat16; break;
    case at::kBFloat16: p.dtype = DType::kBFloat16; break;
    default: TORCH_CHECK(false, "causal_conv1d: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  p.batch = (int)x.size(0);
  p.dim = (int)x.size(1);
  p.seqlen = (int)x.size(2);
  p.width = (int)weight.size(1);
  p.ntiles = (p.seqlen + causal_conv1d::kTile - 1) / causal_conv1d::kTile;
  TORCH_CHECK(p.seqlen >= 1, "causal_conv1d: empty sequence");
  TORCH_CHECK(p.dim <= 65535 && p.batch <= 65535, "causal_conv1d: dim and batch must be <= 65535");
  p.silu = silu;
  p.reverse = reverse;
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.weight = weight.data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  return p;
}

at::Tensor fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool silu,
               bool reverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = make_params(x, weight, bias, silu, reverse);
  at::Tensor out = alloc(x.sizes(), x.options());
  p.out = out.data_ptr();
  const cudaError_t err = causal_conv1d::forward(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "causal_conv1d forward kernel failed: ", cudaGetErrorString(err));
  return out;
}

// Returns [dx, dweight (fp32, (dim, width)), dbias (fp32, (dim,)) or empty].
std::vector<at::Tensor> bwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& dout, bool silu, bool reverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = make_params(x, weight, bias, silu, reverse);
  TORCH_CHECK(dout.is_cuda() && dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type() &&
                  dout.is_contiguous(),
              "causal_conv1d: dout must be a contiguous tensor like x");
  at::Tensor dx = alloc(x.sizes(), x.options());
  at::Tensor part = alloc({p.batch, p.ntiles, p.dim, p.width + 1}, x.options().dtype(at::kFloat));
  p.dout = dout.data_ptr();
  p.dx = dx.data_ptr();
  p.dw_part = part.data_ptr<float>();
  const cudaError_t err = causal_conv1d::backward(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "causal_conv1d backward kernel failed: ", cudaGetErrorString(err));
  at::Tensor sums = part.sum(at::IntArrayRef({0, 1}));
  at::Tensor dweight = sums.narrow(1, 0, p.width).contiguous();
  at::Tensor dbias = bias.has_value() ? sums.select(1, p.width).contiguous() : at::Tensor();
  return {dx, dweight, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SegMamba causal depthwise conv1d CUDA kernels";
  m.def("fwd", &fwd, "causal conv1d forward", py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("silu"),
        py::arg("reverse") = false);
  m.def("bwd", &bwd, "causal conv1d backward", py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("dout"),
        py::arg("silu"), py::arg("reverse") = false);
  m.def("set_poison", [](bool on) { g_poison = on; }, "fill outputs with NaN before each launch (testing)");
}
