"""The Python seams around the compiled extensions, on the CPU: the autograd wrappers of the scan and the conv
(mamba_ssm.ops.cuda_backend, causal_conv1d.cuda_backend) and the fused three-direction function's CUDA ops
(mamba_ssm.ops.tri_orientated.cuda_ops), run against stand-in extensions with the compiled modules' call
signatures. The stand-ins compute with the pure-PyTorch implementations and check what the kernels require
(contiguous rows, one dtype for the per-token inputs, float32 A/D/bias/conv weights), so argument order, dtype
handling and None handling of the seams are checked without a GPU; the kernels themselves are tested on the GPU
(tests/test_cuda_kernels.py)."""
import pytest
import torch

from causal_conv1d import causal_conv1d_ref, cuda_backend as conv_backend
from mamba_ssm.ops import cuda_backend as scan_backend
from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked


def _rows_ok(t):
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def _grads(fn, inputs, dout):
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    it = iter(torch.autograd.grad(out, present, dout))
    return [None if t is None else next(it) for t in leaves]


class StandInScanExt:
    """fwd/bwd with the signatures of mamba_ssm._selective_scan_cuda."""
    calls = 0

    @staticmethod
    def _check(u, delta, A, B, C, D, z, bias):
        for t in (u, delta, B, C):
            assert t.is_contiguous() and t.dtype == u.dtype
        assert z is None or (_rows_ok(z) and z.dtype == u.dtype)
        for t in (A, D, bias):
            assert t is None or (t.dtype == torch.float32 and t.is_contiguous())
        assert B.dim() == 4 and B.shape[1] == 1

    def fwd(self, u, delta, A, B, C, D, z, bias, softplus, return_last_state, reverse):
        self._check(u, delta, A, B, C, D, z, bias)
        StandInScanExt.calls += 1
        out, last = selective_scan_chunked(u, delta, A, B, C, D, z, bias, softplus, True, reverse=reverse)
        return out, (last.float() if return_last_state else None), torch.zeros(1), torch.zeros(2)

    def bwd(self, u, delta, A, B, C, D, z, bias, softplus, dout, carry, dsum, reverse):
        self._check(u, delta, A, B, C, D, z, bias)
        assert dout.is_contiguous() and dout.dtype == u.dtype
        assert carry.shape == (1,) and dsum.shape == (2,)  # what fwd returned comes back
        g = _grads(lambda *a: selective_scan_chunked(*a, delta_softplus=softplus, reverse=reverse),
                   (u, delta, A, B, C, D, z, bias), dout)
        g[3], g[4] = g[3].float(), g[4].float()  # dB, dC come back in float32, as from the kernel
        return g


class StandInConvExt:
    """fwd/bwd with the signatures of causal_conv1d._causal_conv1d_cuda."""

    @staticmethod
    def _check(x, w, b):
        assert _rows_ok(x)
        assert w.dim() == 2 and w.dtype == torch.float32 and w.is_contiguous()
        assert b is None or (b.dtype == torch.float32 and b.is_contiguous())

    def fwd(self, x, w, b, silu, reverse):
        self._check(x, w, b)
        return causal_conv1d_ref(x, w, b, "silu" if silu else None, reverse=reverse)

    def bwd(self, x, w, b, dout, silu, reverse):
        self._check(x, w, b)
        return _grads(lambda *a: causal_conv1d_ref(*a, "silu" if silu else None, reverse=reverse), (x, w, b), dout)


@pytest.fixture
def stand_in_extensions(monkeypatch):
    monkeypatch.setattr(scan_backend, "_EXT", StandInScanExt())
    monkeypatch.setattr(conv_backend, "_EXT", StandInConvExt())


def _scan_case(u_dtype=torch.float32, with_optional=True, length=40):
    g = torch.Generator().manual_seed(0)
    b, d, n = 2, 6, 5
    u = torch.randn(b, d, length, generator=g).to(u_dtype)
    delta = 0.5 * torch.randn(b, d, length, generator=g)
    A = -torch.rand(d, n, generator=g) - 0.1
    big = torch.randn(b, 2 * n + 3, length, generator=g)
    B, C = big[:, :n].unsqueeze(1), big[:, n:2 * n].unsqueeze(1)  # non-contiguous views, as the block passes them
    zz = torch.randn(b, 2 * d, length, generator=g)
    z = zz[:, d:] if with_optional else None  # a channel slice
    D = torch.randn(d, generator=g) if with_optional else None
    bias = 0.1 * torch.randn(d, generator=g) if with_optional else None
    return u, delta, A, B, C, D, z, bias


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_optional", [True, False])
@pytest.mark.parametrize("u_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scan_autograd_wrapper_equals_the_pytorch_scan(stand_in_extensions, reverse, with_optional, u_dtype):
    """SelectiveScanCudaFn through the stand-in extension: the output, last state and every gradient (in each
    input's dtype) equal the chunked PyTorch scan's, so the wrapper passes arguments in the kernels' order and
    converts dtypes and shapes back correctly (bf16 u with float32 delta/B/C: promoted to float32 for the
    kernels, gradients returned in the inputs' dtypes)."""
    args = _scan_case(u_dtype, with_optional)
    dout = torch.randn(args[0].shape)
    got_out, got_last = scan_backend.SelectiveScanCudaFn.apply(*args, True, True, reverse)
    got = _grads(lambda *a: scan_backend.SelectiveScanCudaFn.apply(*a, True, False, reverse), args, dout)
    want_out, want_last = selective_scan_chunked(*args, True, True, reverse=reverse)
    want = _grads(lambda *a: selective_scan_chunked(*a, True, reverse=reverse), args, dout)
    assert got_out.dtype == u_dtype
    torch.testing.assert_close(got_out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_last, want_last.float(), rtol=1e-6, atol=1e-6)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name, a, w, x in zip(names, got, want, args):
        if x is None:
            assert a is None, name
            continue
        assert a.dtype == x.dtype and a.shape == x.shape, name
        torch.testing.assert_close(a.float(), w.float(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("reverse", [False, True])
def test_conv_autograd_wrapper_equals_the_pytorch_conv(stand_in_extensions, reverse):
    g = torch.Generator().manual_seed(1)
    xx = torch.randn(2, 8, 33, generator=g)
    x = xx[:, 4:]  # a channel slice, read in place
    w = torch.randn(4, 1, 3, generator=g)
    b = torch.randn(4, generator=g)
    dout = torch.randn(2, 4, 33, generator=g)
    got = _grads(lambda *a: conv_backend.causal_conv1d_cuda_fn(*a, "silu", reverse=reverse), (x, w, b), dout)
    want = _grads(lambda x_, w_, b_: causal_conv1d_ref(x_, w_.reshape(4, 3), b_, "silu", reverse=reverse),
                  (x, w, b), dout)  # the block's (d, 1, W) weight, its gradient in that shape
    for a, r in zip(got, want):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_fused_function_through_its_cuda_ops_equals_the_reference_ops(stand_in_extensions):
    """tri_orientated_inner with cuda_ops() (the calls the CUDA path makes, here into the stand-ins) equals it
    with REFERENCE_OPS: output and every gradient."""
    from mamba_ssm import Mamba
    from mamba_ssm.ops.tri_orientated import REFERENCE_OPS, cuda_ops, tri_orientated_inner
    torch.manual_seed(0)
    m = Mamba(d_model=8, d_state=5)
    xz = torch.randn(2, 2 * m.d_inner, 24)
    params = []
    for suffix in ("", "_b", "_s"):
        p = m.direction_params(suffix)
        params += [p.conv1d.weight, p.conv1d.bias, p.x_proj.weight, p.dt_proj.weight, *m._scan_params(p)]
    dy = torch.randn(2, m.d_inner, 24)
    calls = StandInScanExt.calls
    results = []
    for ops in (cuda_ops(), REFERENCE_OPS):
        leaves = [xz.detach().requires_grad_()] + [t.detach().requires_grad_() for t in params]
        y = tri_orientated_inner(leaves[0], (2, 3, 4), ops, leaves[1:])
        results.append([y.detach()] + list(torch.autograd.grad(y, leaves, dy)))
    assert StandInScanExt.calls == calls + 3  # the CUDA ops did go through the extension, once per direction
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
