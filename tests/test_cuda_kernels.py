"""CUDA kernels (selective scan, causal conv1d) against float64 references, on the GPU.

Skipped without CUDA or without the compiled extensions. Every output and every gradient is compared with
the float64 PyTorch implementation on fresh random inputs, with all kernel outputs poisoned (NaN-filled)
before launch so an element the kernels forget to write fails the test. Relative error ‖x − ref‖ / ‖ref‖:
float32 ≤ 1e-5 forward and ≤ 1e-4 gradients, float16/bfloat16 ≤ 1e-2.

Set SEGMAMBA_KERNEL_REPORT=<file.json> to write the table of measured errors.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from causal_conv1d import causal_conv1d_fn, cuda_backend as conv_backend  # noqa: E402
from mamba_ssm.ops import cuda_backend as scan_backend  # noqa: E402
from mamba_ssm.ops import selective_scan_fn, selective_scan_ref_loop  # noqa: E402
from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked  # noqa: E402

if not (scan_backend.available() and conv_backend.available()):
    pytest.skip("CUDA extensions not built", allow_module_level=True)

DEV = torch.device("cuda")
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}
REPORT = []


@pytest.fixture(scope="module", autouse=True)
def _poison_and_report():
    scan_backend.available()
    scan_backend._EXT.set_poison(True)
    conv_backend._EXT.set_poison(True)
    yield
    scan_backend._EXT.set_poison(False)
    conv_backend._EXT.set_poison(False)
    path = os.environ.get("SEGMAMBA_KERNEL_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(REPORT, f, indent=1)


def rel(x, ref):
    x = x.double()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    if den == 0:
        return num
    return num / den


def scan_inputs(b, d, length, n, dtype, seed, z=True, dskip=True, bias=True, softplus=True):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale)

    u = r(b, d, length)
    delta = r(b, d, length, scale=0.5)
    if not softplus:  # without softplus the caller passes positive step sizes (negative ones make h explode)
        delta = F.softplus(delta - 3.0)
    # A like the model: -(1..N) per channel, perturbed; bias so softplus(bias) is log-uniform in [1e-3, 1e-1].
    A = -(torch.arange(1, n + 1).float()[None, :].repeat(d, 1) * (0.5 + torch.rand(d, n, generator=g)))
    Bm = r(b, 1, n, length)
    Cm = r(b, 1, n, length)
    D = r(d) if dskip else None
    zz = r(b, d, length) if z else None
    dt = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    db = (dt + torch.log(-torch.expm1(-dt))) if bias else None
    tensors = dict(u=u, delta=delta, A=A, B=Bm, C=Cm, D=D, z=zz, delta_bias=db)
    kern = {k: (v.to(DEV, dtype if k in ("u", "delta", "B", "C", "z") else torch.float32)
                if v is not None else None) for k, v in tensors.items()}
    return kern


def run_scan(inp, softplus, last_state, reference, reverse=False):
    """The kernels (reverse by indexing) or the float64 chunked scan (reverse by explicit flips here)."""
    leaves = {k: (v.detach().double().requires_grad_() if reference else v.detach().requires_grad_())
              for k, v in inp.items() if v is not None}
    args = [leaves.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    if reference:
        if reverse:
            args = [a.flip(-1) if a is not None and a.dim() >= 3 else a for a in args]
        res = selective_scan_chunked(*args, delta_softplus=softplus, return_last_state=last_state)
    else:
        res = selective_scan_fn(*args, delta_softplus=softplus, return_last_state=last_state, reverse=reverse)
    out, last = (res if last_state else (res, None))
    if reference and reverse:
        out = out.flip(-1)
    return out, last, leaves


SCAN_CASES = [
    # (batch, dim, L, N, z, D, bias, softplus)
    (2, 96, 1, 16, True, True, True, True),
    (2, 96, 7, 16, True, True, True, True),
    (2, 96, 2048, 16, True, True, True, True),
    (2, 96, 2049, 16, True, True, True, True),
    (2, 96, 2049, 16, False, False, False, False),
    (2, 96, 262144, 16, True, True, True, True),
    (2, 96, 2049, 64, True, True, True, True),
    (1, 200, 777, 16, True, True, True, True),   # several channel tiles: dB/dC accumulated with atomics
    (3, 40, 300, 32, True, False, True, True),
    (1, 8, 130, 5, True, True, False, True),      # N padded up to 16
    (1, 64, 2048, 64, True, True, True, True),    # vector row access with N = 64
    (3, 40, 304, 32, True, False, True, True),    # vector row access with N = 32
]
# L % 8 == 0 uses 16-byte vector loads/stores, other L the scalar path: both are covered above.


# The reverse direction (sequence walked last-to-first by indexing): scalar and vector row access, chunk
# remainders, several channel tiles (atomics), N = 32 / 64 and the model's stage-0 length.
REVERSE_CASES = [SCAN_CASES[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 11)]
CASE_ID = lambda c: "B{}D{}L{}N{}{}".format(*c[:4], "" if c[4] else "-noz")  # noqa: E731


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SCAN_CASES, ids=CASE_ID)
def test_selective_scan_kernel_matches_float64_reference(case, dtype):
    check_scan_case(case, dtype, reverse=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", REVERSE_CASES, ids=CASE_ID)
def test_selective_scan_kernel_reverse_matches_float64_reference_on_flipped_tokens(case, dtype):
    check_scan_case(case, dtype, reverse=True)


def check_scan_case(case, dtype, reverse):
    b, d, length, n, z, dskip, bias, softplus = case
    inp = scan_inputs(b, d, length, n, dtype, seed=length * 7 + n + reverse, z=z, dskip=dskip, bias=bias,
                      softplus=softplus)
    out, last, leaves = run_scan(inp, softplus, True, reference=False, reverse=reverse)
    ref_out, ref_last, ref_leaves = run_scan(inp, softplus, True, reference=True, reverse=reverse)
    dout = torch.randn(out.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
    out.backward(dout.to(out.dtype))
    ref_out.backward(dout.to(out.dtype).double())
    fwd_tol, grad_tol = TOL[dtype]
    errors = {"out": rel(out, ref_out), "last_state": rel(last, ref_last)}
    for k, leaf in leaves.items():
        errors["d" + k] = rel(leaf.grad, ref_leaves[k].grad)
    REPORT.append({"op": "selective_scan", "dtype": str(dtype).replace("torch.", ""), "B": b, "D": d, "L": length,
                   "N": n, "z": z, "D_skip": dskip, "bias": bias, "softplus": softplus, "reverse": reverse,
                   **errors})
    for k, e in errors.items():
        assert math.isfinite(e), f"{k}: non-finite error (unwritten output?)"
        assert e <= (fwd_tol if k in ("out", "last_state") else grad_tol), f"{k}: relative error {e:.3e}"


# Group walks: one block walks chunks_per_group chunks serially, carrying the state (forward) and the adjoint
# message (backward) from chunk to chunk; only group boundaries go through the carry kernels. Short sequences
# get one chunk per group automatically, so the group sizes are forced here, on both thread layouts
# (lane: one thread per channel, d_state <= 16; split: states spread over lanes), with a last group shorter
# than the others and with L not a multiple of the chunk.
GROUP_CASES = [
    # (batch, dim, L, N)
    (2, 96, 2049, 16),
    (1, 200, 777, 16),   # two channel tiles in the lane layout (128 + 72), partial warps
    (1, 40, 1000, 32),   # state-split kernels whatever the switch says
    (2, 64, 4096, 16),   # vector row access
]


@pytest.fixture
def scan_switches():
    ext = scan_backend._EXT
    yield ext
    ext.set_chunks_per_group(0)
    ext.set_lane_kernels(True)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lane", [True, False], ids=["lane", "split"])
@pytest.mark.parametrize("cpg", [1, 3, 7])
@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda c: "B{}D{}L{}N{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_selective_scan_group_walks_match_float64_reference(case, cpg, lane, reverse, dtype, scan_switches):
    scan_switches.set_chunks_per_group(cpg)
    scan_switches.set_lane_kernels(lane)
    b, d, length, n = case
    check_scan_case((b, d, length, n, True, True, True, True), dtype, reverse=reverse)


def test_selective_scan_small_case_matches_sequential_loop_oracle():
    inp = scan_inputs(2, 16, 200, 16, torch.float32, seed=3)
    out, last, _ = run_scan(inp, True, True, reference=False)
    args = [inp[k].double() if inp[k] is not None else None for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    ref, ref_last = selective_scan_ref_loop(*args, delta_softplus=True, return_last_state=True)
    assert rel(out, ref) <= 1e-5
    assert rel(last, ref_last) <= 1e-5


@pytest.mark.parametrize("length", [333, 336])
def test_selective_scan_kernel_reads_a_channel_slice_of_z_in_place(length):
    inp = scan_inputs(2, 32, length, 16, torch.float32, seed=5)
    big = torch.randn(2, 64, length, device=DEV)
    big[:, 32:] = inp["z"]
    inp_sliced = dict(inp, z=big[:, 32:])
    a, _, _ = run_scan(inp_sliced, True, False, reference=False)
    b_, _, _ = run_scan(inp, True, False, reference=False)
    assert torch.equal(a, b_)


CONV_CASES = [(2, 96, 1), (2, 96, 2047), (2, 96, 2049), (1, 7, 5000), (2, 96, 262144)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("shape", CONV_CASES, ids=lambda s: "B{}D{}L{}".format(*s))
@pytest.mark.parametrize("bias,act", [(True, "silu"), (False, None)])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_causal_conv1d_kernel_matches_float64_conv1d(shape, width, dtype, bias, act, reverse):
    b, d, length = shape
    if length >= 262144 and width != 4:
        pytest.skip("long sequence checked at the model's width only")
    if reverse and (width == 3 or not bias):
        pytest.skip("reverse direction checked at widths 2 and 4 with bias and SiLU")
    g = torch.Generator(device="cpu").manual_seed(length + width)
    big = torch.randn(b, 2 * d, length, generator=g).to(DEV, dtype)
    x = big[:, :d].detach().requires_grad_()  # a channel slice, as the Mamba block passes it
    w = torch.randn(d, width, generator=g).to(DEV).requires_grad_()
    bb = torch.randn(d, generator=g).to(DEV).requires_grad_() if bias else None
    out = causal_conv1d_fn(x, w, bb, act, reverse=reverse)
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    br = bb.detach().double().requires_grad_() if bias else None
    if reverse:  # out[t] = Σ_k w[k] x[t + W-1-k]: right padding, flipped kernel
        ref = F.conv1d(F.pad(xr, (0, width - 1)), wr.flip(-1).unsqueeze(1), br, groups=d)
    else:
        ref = F.conv1d(F.pad(xr, (width - 1, 0)), wr.unsqueeze(1), br, groups=d)
    if act == "silu":
        ref = F.silu(ref)
    dout = torch.randn(out.shape, device=DEV, dtype=torch.float32)
    out.backward(dout.to(dtype))
    ref.backward(dout.to(dtype).double())
    errors = {"out": rel(out, ref), "dx": rel(x.grad, xr.grad), "dweight": rel(w.grad, wr.grad)}
    if bias:
        errors["dbias"] = rel(bb.grad, br.grad)
    REPORT.append({"op": "causal_conv1d", "dtype": str(dtype).replace("torch.", ""), "B": b, "D": d, "L": length,
                   "W": width, "bias": bias, "act": act, "reverse": reverse, **errors})
    fwd_tol, grad_tol = TOL[dtype]
    for k, e in errors.items():
        assert math.isfinite(e), f"{k}: non-finite error"
        assert e <= (fwd_tol if k == "out" else grad_tol), f"{k}: relative error {e:.3e}"


def test_mamba_block_kernel_path_matches_pytorch_path():
    from mamba_ssm import Mamba
    torch.manual_seed(0)
    blk = Mamba(d_model=48).to(DEV)
    x = torch.randn(2, 8 * 12 * 10, 48, device=DEV, requires_grad=True)
    y = blk(x, grid=(8, 12, 10))
    y.backward(torch.ones_like(y))
    grads = {k: p.grad.clone() for k, p in blk.named_parameters()}
    gx = x.grad.clone()
    blk64 = Mamba(d_model=48).to(DEV).double()
    blk64.load_state_dict(blk.state_dict())
    blk64.zero_grad()
    x64 = x.detach().double().requires_grad_()
    y64 = blk64(x64, grid=(8, 12, 10))  # float64 -> chunked PyTorch path
    y64.backward(torch.ones_like(y64))
    assert rel(y, y64) <= 1e-5
    assert rel(gx, x64.grad) <= 1e-4
    for k, p in blk64.named_parameters():
        assert rel(grads[k], p.grad) <= 1e-4, k


def test_mamba_block_reverse_by_indexing_matches_flipped_copies(monkeypatch):
    """The block's reverse direction through the kernels' backwards indexing equals the flip-copy path
    (flip xz, forward-direction kernels, flip back) in float32: output and every gradient."""
    from mamba_ssm import Mamba
    from mamba_ssm.modules import mamba_simple
    torch.manual_seed(0)
    blk = Mamba(d_model=48).to(DEV)
    x = torch.randn(2, 8 * 12 * 16, 48, device=DEV)
    results = []
    for indexing in (True, False):
        monkeypatch.setattr(mamba_simple, "_kernels_index_backwards", lambda device, v=indexing: v)
        blk.zero_grad()
        xi = x.clone().requires_grad_()
        y = blk(xi, grid=(8, 12, 16))
        y.backward(torch.cos(y.detach()))
        results.append((y.detach(), xi.grad, {k: p.grad.clone() for k, p in blk.named_parameters()}))
    (y1, gx1, g1), (y2, gx2, g2) = results
    assert rel(y1, y2.double()) <= 1e-5
    assert rel(gx1, gx2.double()) <= 1e-5
    for k in g1:
        assert rel(g1[k], g2[k].double()) <= 1e-5, k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mamba_block_under_autocast_matches_float32_within_half_precision(dtype):
    from mamba_ssm import Mamba
    torch.manual_seed(0)
    blk = Mamba(d_model=48).to(DEV)
    x = torch.randn(2, 8 * 8 * 8, 48, device=DEV, requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = blk(x, grid=(8, 8, 8))
    y.float().sum().backward()
    g_amp = x.grad.clone()
    x.grad = None
    y32 = blk(x, grid=(8, 8, 8))
    y32.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(g_amp).all()
    assert rel(y.float(), y32.double()) <= 3e-2
    assert rel(g_amp, x.grad.double()) <= 3e-2


def _block_pass_cuda(blk, x, grid, fused, monkeypatch, dtype=None):
    """Output, input and parameter gradients, and the bytes still allocated after the forward pass (what
    autograd keeps), through the fused three-direction function or the composed per-direction path."""
    monkeypatch.setenv("SEGMAMBA_FUSED_MAMBA", "1" if fused else "0")
    blk.zero_grad()
    xi = x.clone().requires_grad_()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
        y = blk(xi, grid=grid)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    y.float().backward(torch.cos(y.detach().float()))
    return y.detach(), xi.grad, {k: p.grad.clone() for k, p in blk.named_parameters()}, kept


@pytest.mark.parametrize("grid", [(8, 12, 16), (16, 16, 16)], ids=str)
def test_mamba_block_fused_path_matches_composed_path_and_keeps_less(grid, monkeypatch):
    """The fused three-direction function (the default on CUDA) against the composition of per-direction
    autograd functions, float32: output, input gradient and every parameter gradient <= 1e-5; and it keeps at
    least the 7 (B, d_inner, L) float32 tensors less (u and delta per direction, the through-slice copy)."""
    from mamba_ssm import Mamba
    from mamba_ssm.modules import mamba_simple
    torch.manual_seed(0)
    blk = Mamba(d_model=48).to(DEV)
    length = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, length, 48, device=DEV)
    assert mamba_simple._fused_inner_ops(torch.empty(1, 2, 1, device=DEV), 16) is not None
    y1, gx1, g1, kept1 = _block_pass_cuda(blk, x, grid, False, monkeypatch)
    y2, gx2, g2, kept2 = _block_pass_cuda(blk, x, grid, True, monkeypatch)
    assert rel(y2, y1.double()) <= 1e-5
    assert rel(gx2, gx1.double()) <= 1e-5
    for k in g1:
        assert rel(g2[k], g1[k].double()) <= 1e-5, k
    assert kept1 - kept2 >= 7 * 2 * blk.d_inner * length * 4, (kept1, kept2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mamba_block_fused_path_under_autocast_matches_composed_path(dtype, monkeypatch):
    """Under autocast the fused function gives the composed path's output exactly (same kernels, same sums) and
    its gradients within half-precision rounding (it adds the two parts of du in one GEMM)."""
    from mamba_ssm import Mamba
    torch.manual_seed(0)
    blk = Mamba(d_model=48).to(DEV)
    x = torch.randn(2, 8 * 8 * 16, 48, device=DEV)
    y1, gx1, g1, _ = _block_pass_cuda(blk, x, (8, 8, 16), False, monkeypatch, dtype)
    y2, gx2, g2, _ = _block_pass_cuda(blk, x, (8, 8, 16), True, monkeypatch, dtype)
    assert y2.dtype == y1.dtype == dtype
    assert torch.equal(y2, y1)
    assert rel(gx2, gx1.double()) <= 1e-2
    for k in g1:
        assert g2[k].dtype == g1[k].dtype, k
        assert rel(g2[k], g1[k].double()) <= 1e-2, k
