// PyTorch binding of the selective-scan kernels: argument checks, workspace allocation, stream selection.
// The kernels themselves (selective_scan_{fwd,bwd}.cu) know nothing about torch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <limits>
#include <string>
#include <vector>

#include "selective_scan.h"

namespace {

using selective_scan::DType;
using selective_scan::Params;

// Test aid: when set, every output buffer is filled with NaN before the kernels run, so an element the
// kernels fail to write shows up as NaN instead of passing with stale memory.
bool g_poison = false;
// Benchmark aid: issue the next chunk's loads before walking the current one (default on).
bool g_prefetch = false;  // measured 3-6% faster off on an H200; both variants pass the GPU tests
// Benchmark / test aids: the lane-layout walks for d_state <= 16 (default on) and a fixed group size
// (chunks walked serially by one block; 0 = chosen from the GPU's size).
bool g_lane = true;
int g_chunks_per_group = 0;
int g_lane_threads = 0;
int g_bwd_main_variant = 1;

at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (g_poison) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "selective_scan: inputs must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

void check_cuda_contig(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "selective_scan: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "selective_scan: ", name, " is on ", t.device(), " but u is on ",
              ref.device());
  TORCH_CHECK(t.is_contiguous(), "selective_scan: ", name, " must be contiguous (call .contiguous())");
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& u) {
  check_cuda_contig(t, name, u);
  TORCH_CHECK(t.scalar_type() == u.scalar_type(), "selective_scan: ", name, " has dtype ", t.scalar_type(),
              " but u has ", u.scalar_type());
  TORCH_CHECK(t.sizes() == u.sizes(), "selective_scan: ", name, " has shape ", t.sizes(), " but u has ", u.sizes());
}

void check_fp32_vec(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& u, int64_t dim) {
  if (!t.has_value()) return;
  check_cuda_contig(*t, name, u);
  TORCH_CHECK(t->scalar_type() == at::kFloat, "selective_scan: ", name, " must be float32");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == dim, "selective_scan: ", name, " must have shape (", dim, ")");
}

void check_err(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "selective_scan ", what, " kernel failed: ", cudaGetErrorString(err));
}

Params make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                   const c10::optional<at::Tensor>& delta_bias, bool delta_softplus, bool reverse) {
  TORCH_CHECK(u.dim() == 3, "selective_scan: u must be (batch, dim, seqlen), got ", u.sizes());
  check_cuda_contig(u, "u", u);
  to_dtype(u);
  check_same(delta, "delta", u);
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  check_cuda_contig(A, "A", u);
  TORCH_CHECK(A.scalar_type() == at::kFloat, "selective_scan: A must be float32 (complex A is not supported)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "selective_scan: A must be (dim, dstate), got ", A.sizes());
  const int64_t dstate = A.size(1);
  TORCH_CHECK(selective_scan::padded_dstate((int)dstate) > 0, "selective_scan: d_state must be 1..64, got ",
              dstate);
  for (auto* pr : {&B, &C}) {
    const at::Tensor& t = *pr;
    const char* name = (pr == &B) ? "B" : "C";
    check_cuda_contig(t, name, u);
    TORCH_CHECK(t.scalar_type() == u.scalar_type(), "selective_scan: ", name, " must have u's dtype");
    TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(1) == 1 && t.size(2) == dstate && t.size(3) == seqlen,
                "selective_scan: ", name, " must be (batch, 1, dstate, seqlen) = (", batch, ", 1, ", dstate, ", ",
                seqlen, "), got ", t.sizes());
  }
  if (z.has_value()) {
    const at::Tensor& zt = *z;
    TORCH_CHECK(zt.is_cuda() && zt.device() == u.device(), "selective_scan: z must be on u's device");
    TORCH_CHECK(zt.scalar_type() == u.scalar_type(), "selective_scan: z must have u's dtype");
    TORCH_CHECK(zt.sizes() == u.sizes(), "selective_scan: z has shape ", zt.sizes(), " but u has ", u.sizes());
    TORCH_CHECK(zt.stride(2) == 1 && zt.stride(1) == seqlen && zt.stride(0) >= dim * seqlen,
                "selective_scan: z must have contiguous (dim, seqlen) rows (a channel slice is fine)");
  }
  check_fp32_vec(D, "D", u, dim);
  check_fp32_vec(delta_bias, "delta_bias", u, dim);
  TORCH_CHECK(seqlen >= 1 && batch >= 1 && dim >= 1, "selective_scan: empty input ", u.sizes());

  Params p;
  p.batch = (int)batch;
  p.dim = (int)dim;
  p.seqlen = (int)seqlen;
  p.dstate = (int)dstate;
  p.nchunks = (int)((seqlen + selective_scan::kChunk - 1) / selective_scan::kChunk);
  p.dtype = to_dtype(u);
  p.delta_softplus = delta_softplus;
  p.reverse = reverse;
  p.prefetch = g_prefetch;
  p.lane_kernels = g_lane;
  p.lane_threads = g_lane_threads;
  p.bwd_main_variant = g_bwd_main_variant;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.z = z.has_value() ? z->data_ptr() : nullptr;
  p.z_batch_stride = z.has_value() ? z->stride(0) : dim * seqlen;
  p.Bm = B.data_ptr();
  p.Cm = C.data_ptr();
  p.A = A.data_ptr<float>();
  p.D = D.has_value() ? D->data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;

  // Vector (16-byte) row access needs every row start aligned: seqlen a multiple of 8 and aligned pointers.
  auto aligned16 = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) % 16) == 0; };
  p.vec_io = seqlen % 8 == 0 && aligned16(p.u) && aligned16(p.delta) && aligned16(p.Bm) && aligned16(p.Cm) &&
             (p.z == nullptr || (aligned16(p.z) && p.z_batch_stride % 8 == 0));
  // Chunks per group (walked serially by one block): enough independent walks to fill the GPU several times
  // over (for d_state <= 16 warps of 32 channels, as the lane kernels walk; else blocks of the state-split
  // kernels), grid.y within limits. d_state <= 16 aims at 64 warp walks per SM: at B=2, D=96, L=262144 on an
  // H200 that is 2 chunks per group (the earlier 24 gave 7: 1172 lane blocks, 2.2 waves of the output walk's 528
  // resident blocks); forward+backward 3.45 -> 3.36 ms (float32), 3.11 -> 3.01 ms (float16), sums of the scan
  // kernels' times (bench/profile_scan.py --kernels; 3 chunks measured the same, 4 and 5 in between, 8 slower).
  // The backward must use the forward's grouping (group_dsum is per group): the rule depends only on the shapes
  // and the device, not on set_lane_kernels, so that switch may change between a forward and its backward;
  // set_chunks_per_group may not.
  const int tiles = selective_scan::channel_tiles(p.dim, p.dstate);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool n16 = selective_scan::padded_dstate(p.dstate) == 16;
  const long long walks = n16 ? (long long)p.batch * ((p.dim + 31) / 32) * p.nchunks
                              : (long long)p.batch * tiles * p.nchunks;
  long long per_group = g_chunks_per_group > 0 ? g_chunks_per_group : walks / ((long long)sms * (n16 ? 64 : 12));
  if (per_group < 1) per_group = 1;
  if (per_group > 16 && g_chunks_per_group <= 0) per_group = 16;
  while ((p.nchunks + per_group - 1) / per_group > 65535) ++per_group;
  p.chunks_per_group = (int)per_group;
  p.ngroups = (int)((p.nchunks + per_group - 1) / per_group);
  p.nseg = (p.ngroups + selective_scan::kSegChunks - 1) / selective_scan::kSegChunks;
  return p;
}

// Returns [out, last_state (or empty), chunk_carry, group_dsum]; the last two are saved for backward.
// reverse: scan the sequence last-to-first (outputs stay in memory order; last_state is the state after
// memory position 0).
std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                            bool delta_softplus, bool return_last_state, bool reverse) {
  const c10::cuda::CUDAGuard guard(u.device());
  Params p = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse);
  auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = alloc(u.sizes(), u.options());
  at::Tensor group_local = alloc({p.batch, p.ngroups, p.dstate, p.dim}, f32);
  at::Tensor group_carry = alloc({p.batch, p.ngroups, p.dstate, p.dim}, f32);
  at::Tensor chunk_carry = alloc({p.batch, p.nchunks, p.dstate, p.dim}, f32);
  at::Tensor group_dsum = alloc({p.batch, p.ngroups, p.dim}, f32);
  at::Tensor seg_agg = alloc({p.batch, p.nseg, p.dstate + 1, p.dim}, f32);
  at::Tensor last_state = return_last_state ? alloc({p.batch, p.dim, p.dstate}, f32) : at::Tensor();
  p.out = out.data_ptr();
  p.group_local = group_local.data_ptr<float>();
  p.group_carry = group_carry.data_ptr<float>();
  p.chunk_carry = chunk_carry.data_ptr<float>();
  p.group_dsum = group_dsum.data_ptr<float>();
  p.seg_agg = seg_agg.data_ptr<float>();
  p.last_state = return_last_state ? last_state.data_ptr<float>() : nullptr;
  check_err(selective_scan::forward(p, at::cuda::getCurrentCUDAStream()), "forward");
  return {out, last_state, chunk_carry, group_dsum};
}

// Returns [du, ddelta, dA, dB, dC, dD (or empty), dz (or empty), ddelta_bias (or empty)].
// dB and dC are float32 (the caller casts them to B's / C's dtype).
std::vector<at::Tensor> bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                            bool delta_softplus, const at::Tensor& dout, const at::Tensor& chunk_carry,
                            const at::Tensor& group_dsum, bool reverse) {
  const c10::cuda::CUDAGuard guard(u.device());
  Params p = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse);
  check_same(dout, "dout", u);
  TORCH_CHECK(chunk_carry.is_cuda() && chunk_carry.is_contiguous() && chunk_carry.scalar_type() == at::kFloat &&
                  chunk_carry.numel() == (int64_t)p.batch * p.nchunks * p.dstate * p.dim,
              "selective_scan: chunk_carry does not match the inputs (was it produced by fwd on them?)");
  TORCH_CHECK(group_dsum.is_cuda() && group_dsum.is_contiguous() && group_dsum.scalar_type() == at::kFloat &&
                  group_dsum.numel() == (int64_t)p.batch * p.ngroups * p.dim,
              "selective_scan: group_dsum does not match the inputs (was the group size changed between fwd and bwd?)");
  auto f32 = u.options().dtype(at::kFloat);
  const bool atomic_bc = selective_scan::channel_tiles(p.dim, p.dstate) > 1;
  at::Tensor du = alloc(u.sizes(), u.options());
  at::Tensor ddelta = alloc(u.sizes(), u.options());
  at::Tensor dz = z.has_value() ? alloc(u.sizes(), u.options()) : at::Tensor();
  at::Tensor dB = alloc(B.sizes(), f32);  // (zeroed by the first walk when atomic_bc)
  at::Tensor dC = alloc(C.sizes(), f32);
  at::Tensor rev_local = alloc({p.batch, p.ngroups, p.dstate, p.dim}, f32);
  at::Tensor rev_carry = alloc({p.batch, p.ngroups, p.dstate, p.dim}, f32);
  at::Tensor seg_agg = alloc({p.batch, p.nseg, p.dstate + 1, p.dim}, f32);
  at::Tensor dA_part = alloc({p.batch, p.ngroups, p.dstate, p.dim}, f32);
  at::Tensor dD_part = alloc({p.batch, p.ngroups, p.dim}, f32);
  at::Tensor dbias_part = alloc({p.batch, p.ngroups, p.dim}, f32);
  at::Tensor dA = alloc(A.sizes(), f32);
  at::Tensor dD = D.has_value() ? alloc({p.dim}, f32) : at::Tensor();
  at::Tensor dbias = delta_bias.has_value() ? alloc({p.dim}, f32) : at::Tensor();
  p.dout = dout.data_ptr();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = z.has_value() ? dz.data_ptr() : nullptr;
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.zero_bc = atomic_bc;
  p.group_local = rev_local.data_ptr<float>();
  p.group_carry = rev_carry.data_ptr<float>();
  p.chunk_carry = const_cast<float*>(chunk_carry.data_ptr<float>());
  p.group_dsum = const_cast<float*>(group_dsum.data_ptr<float>());
  p.seg_agg = seg_agg.data_ptr<float>();
  p.dA_part = dA_part.data_ptr<float>();
  p.dD_part = dD_part.data_ptr<float>();
  p.dbias_part = dbias_part.data_ptr<float>();
  p.dA = dA.data_ptr<float>();
  p.dD = D.has_value() ? dD.data_ptr<float>() : nullptr;
  p.dbias = delta_bias.has_value() ? dbias.data_ptr<float>() : nullptr;
  check_err(selective_scan::backward(p, at::cuda::getCurrentCUDAStream()), "backward");
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SegMamba selective-scan CUDA kernels (chunk-parallel forward and backward)";
  m.def("fwd", &fwd, "selective scan forward", py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("delta_softplus"),
        py::arg("return_last_state"), py::arg("reverse") = false);
  m.def("bwd", &bwd, "selective scan backward", py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("delta_softplus"),
        py::arg("dout"), py::arg("chunk_carry"), py::arg("group_dsum"), py::arg("reverse") = false);
  m.attr("CHUNK") = selective_scan::kChunk;
  m.def("set_poison", [](bool on) { g_poison = on; }, "fill outputs with NaN before each launch (testing)");
  m.def("set_prefetch", [](bool on) { g_prefetch = on; }, "load the next chunk while walking the current one");
  m.def("set_lane_kernels", [](bool on) { g_lane = on; },
        "d_state <= 16: one thread per channel with all 16 states (default on); off = state-split kernels");
  m.def("set_bwd_main_variant", [](int v) { g_bwd_main_variant = v; },
        "backward main kernel: 0 the previous one, 1 the reworked one (default)");
  m.def("set_lane_threads", [](int n) { g_lane_threads = n; },
        "block size of the lane kernels: 96, 128 or 0 (automatic: 96 when dim splits into warps by 3, not 4)");
  m.def("set_chunks_per_group", [](int n) { g_chunks_per_group = n; },
        "chunks walked serially by one block (0 = automatic); forward and backward must use the same value");
}
