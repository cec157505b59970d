"""Selective scan: the chunked PyTorch path against the float64 sequential oracle (and hand-computed
cases), forward, all gradients, dtypes, last state, stability, dispatch and argument checks."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import mamba_ssm
from mamba_ssm.ops import selective_scan_fn, selective_scan_ref_loop
from mamba_ssm.ops import selective_scan_interface as interface
from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# small chunk geometry so that short sequences still cross chunk and segment boundaries (S = 8 * 2)
SMALL = dict(chunk_len=8, chunks_per_segment=2)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def make_inputs(batch=2, dim=4, length=21, n=16, bc="variable", groups=1, with_D=True, with_z=True,
                with_bias=True, dtype=torch.float64, delta_scale=1.0, seed=0):
    """Random scan inputs; A in [-16, -1] as the S4D-real initialisation, B/C constant or (b, G, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u = rnd(batch, dim, length)
    delta = delta_scale * torch.rand(batch, dim, length, generator=g, dtype=torch.float64) - 0.3 * delta_scale
    A = -(1 + 15 * torch.rand(dim, n, generator=g, dtype=torch.float64))
    B = rnd(batch, groups, n, length) if bc in ("variable", "B_variable") else rnd(dim, n)
    C = rnd(batch, groups, n, length) if bc in ("variable", "C_variable") else rnd(dim, n)
    D = rnd(dim) if with_D else None
    z = rnd(batch, dim, length) if with_z else None
    delta_bias = 0.2 * rnd(dim) if with_bias else None
    tensors = [u, delta, A, B, C, D, z, delta_bias]
    return [None if t is None else t.to(dtype).requires_grad_(True) for t in tensors]


def oracle(inputs, softplus, return_last_state=False):
    """The sequential loop in float64 on float64 copies of the inputs (a separate autograd graph)."""
    copies = [None if t is None else t.detach().double().requires_grad_(True) for t in inputs]
    result = selective_scan_ref_loop(*copies, delta_softplus=softplus, return_last_state=return_last_state)
    return result, copies


def grads_of(out, inputs, g):
    present = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, present, g, allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


def compare_with_oracle(inputs, softplus, fwd_tol, grad_tol, **geometry):
    out = selective_scan_chunked(*inputs, delta_softplus=softplus, **geometry)
    ref, copies = oracle(inputs, softplus)
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    assert rel_err(out, ref) <= fwd_tol, f"forward rel err {rel_err(out, ref):.2e}"
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = grads_of(out, inputs, g.to(out.dtype))
    want = grads_of(ref, copies, g)
    for name, x, a, r in zip(INPUT_NAMES, inputs, got, want):
        if x is None:
            continue
        assert a is not None and a.dtype == x.dtype and a.shape == x.shape, name
        err = rel_err(a, r)
        assert err <= grad_tol, f"d{name}: rel err {err:.2e} > {grad_tol}"


# --- float64: the chunked algorithm is exact up to rounding --------------------------------------------

@pytest.mark.parametrize("length", [1, 7, 8 - 1, 8 + 1, 3 * 8 + 5, 2 * 16 + 3])
@pytest.mark.parametrize("bc", ["variable", "constant"])
def test_chunked_scan_matches_oracle_float64_across_chunk_and_segment_boundaries(length, bc):
    inputs = make_inputs(length=length, bc=bc)
    compare_with_oracle(inputs, softplus=True, fwd_tol=1e-12, grad_tol=1e-10, **SMALL)


@pytest.mark.parametrize("with_D, with_z, with_bias, softplus", [
    (False, False, False, False), (True, False, False, True), (False, True, True, False), (True, True, True, True)])
def test_chunked_scan_optional_terms_float64(with_D, with_z, with_bias, softplus):
    inputs = make_inputs(length=29, with_D=with_D, with_z=with_z, with_bias=with_bias)
    compare_with_oracle(inputs, softplus=softplus, fwd_tol=1e-12, grad_tol=1e-10, **SMALL)


@pytest.mark.parametrize("bc, groups", [("variable", 2), ("B_variable", 1), ("C_variable", 2)])
def test_chunked_scan_groups_and_mixed_constant_input_dependent_B_C(bc, groups):
    inputs = make_inputs(dim=6, length=19, bc=bc, groups=groups, n=3)
    compare_with_oracle(inputs, softplus=True, fwd_tol=1e-12, grad_tol=1e-10, **SMALL)


def test_chunked_scan_small_state_size_and_default_geometry():
    inputs = make_inputs(length=3 * 64 + 5, n=2, dim=3, batch=1)  # default chunk length 64
    compare_with_oracle(inputs, softplus=True, fwd_tol=1e-12, grad_tol=1e-10)


def test_chunked_scan_gradcheck_float64_tiny():
    inputs = make_inputs(batch=1, dim=2, length=5, n=2, bc="variable")
    inputs_C_const = make_inputs(batch=1, dim=2, length=5, n=2, bc="B_variable", seed=3)

    for ins in (inputs, inputs_C_const):
        def f(*tensors):
            return selective_scan_chunked(*tensors, delta_softplus=True, chunk_len=2, chunks_per_segment=2)
        assert torch.autograd.gradcheck(f, tuple(ins), eps=1e-6, atol=1e-7, rtol=1e-5)


# --- float32 and low precision ----------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 63, 65, 3 * 64 + 5])
def test_chunked_scan_float32_within_tolerance_of_float64_oracle(length):
    inputs = make_inputs(batch=1, dim=8, length=length, dtype=torch.float32)
    compare_with_oracle(inputs, softplus=True, fwd_tol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_scan_half_precision_inputs_computed_in_float32(dtype):
    inputs = make_inputs(batch=1, dim=8, length=70, dtype=torch.float32)
    # u, delta, B, C, z in half precision; A, D, delta_bias stay float32 as in the Mamba block
    low = [t.detach().to(dtype).requires_grad_(True) if i in (0, 1, 3, 4, 6) else t
           for i, t in enumerate(inputs)]
    compare_with_oracle(low, softplus=True, fwd_tol=1e-2, grad_tol=1e-2)


def test_scan_ignores_autocast_and_computes_in_float32():
    inputs = [t.detach() for t in make_inputs(batch=1, dim=4, length=40, dtype=torch.float32)]
    plain = selective_scan_fn(*inputs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = selective_scan_fn(*inputs, delta_softplus=True)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


# --- stability and last state -----------------------------------------------------------------------------

@pytest.mark.parametrize("delta_max", [1.0, 10.0])
def test_chunked_scan_stable_for_large_delta_times_A(delta_max):
    """A = -1..-16 and delta up to 1 (decays down to e^-16 per step) or 10 (e^-160: the exponent floor)."""
    g = torch.Generator().manual_seed(5)
    b, d, n, length = 1, 4, 16, 150
    u = torch.randn(b, d, length, generator=g)
    delta = delta_max * torch.rand(b, d, length, generator=g)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B = torch.randn(b, 1, n, length, generator=g)
    C = torch.randn(b, 1, n, length, generator=g)
    inputs = [t.requires_grad_(True) for t in (u, delta, A, B, C)] + [None, None, None]
    compare_with_oracle(inputs, softplus=False, fwd_tol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("length", [5, 16, 37])
def test_return_last_state_matches_oracle(length):
    inputs = [t.detach() for t in make_inputs(length=length)]
    out, last = selective_scan_chunked(*inputs, delta_softplus=True, return_last_state=True, **SMALL)
    (ref_out, ref_last), _ = oracle(inputs, softplus=True, return_last_state=True)
    assert last.shape == (2, 4, 16) and last.dtype == torch.float64
    torch.testing.assert_close(last, ref_last.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 5, 37])
def test_reverse_scan_is_the_oracle_on_flipped_tokens(length):
    """reverse=True equals scanning the token-flipped inputs with the float64 loop and flipping the output
    back; the last state is the state after token 0. Gradients flow to the unflipped inputs."""
    inputs = make_inputs(length=length)
    out, last = selective_scan_fn(*inputs, delta_softplus=True, return_last_state=True, reverse=True)
    copies = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    ref_out, ref_last = selective_scan_ref_loop(*[t if t is None or t.dim() < 3 else t.flip(-1) for t in copies],
                                                delta_softplus=True, return_last_state=True)
    ref_out = ref_out.flip(-1)
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, ref_last.detach(), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    present = [i for i, t in enumerate(inputs) if t is not None]
    got = torch.autograd.grad(out, [inputs[i] for i in present], g)
    want = torch.autograd.grad(ref_out, [copies[i] for i in present], g)
    for i, a, r in zip(present, got, want):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{INPUT_NAMES[i]}: {m}")


def test_return_last_state_is_float32_for_half_inputs_and_has_no_gradient():
    inputs = [t.detach() for t in make_inputs(length=9, dtype=torch.float32)]
    inputs[0] = inputs[0].half().requires_grad_(True)
    out, last = selective_scan_fn(*inputs, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.float16 and last.dtype == torch.float32
    assert not last.requires_grad


# --- Appendix A sanity cases (hand formulas) ----------------------------------------------------------------

def test_zero_B_gives_D_times_u_times_silu_z():
    b, d, n, length = 2, 3, 4, 13
    u, delta, z = torch.randn(b, d, length), torch.rand(b, d, length), torch.randn(b, d, length)
    A = -torch.rand(d, n) - 1
    B = torch.zeros(b, 1, n, length)
    C = torch.randn(b, 1, n, length)
    D = torch.randn(d)
    out = selective_scan_fn(u, delta, A, B, C, D, z, delta_softplus=True)
    expected = D[:, None] * u * z * torch.sigmoid(z)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_single_state_is_a_first_order_iir_filter():
    """N = 1, B = C = 1, A = -1, constant dt: h_t = e^-dt h_{t-1} + dt u_t, y_t = h_t + D u_t."""
    length, dt, d_skip = 40, 0.3, 0.5
    u = torch.randn(1, 1, length, dtype=torch.float64)
    out = selective_scan_fn(u, torch.full_like(u, dt), -torch.ones(1, 1, dtype=torch.float64),
                            torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                            D=torch.tensor([d_skip], dtype=torch.float64))
    h, expected = 0.0, []
    for value in u.flatten().tolist():
        h = math.exp(-dt) * h + dt * value
        expected.append(h + d_skip * value)
    torch.testing.assert_close(out.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_softplus_of_delta_plus_bias_is_applied_as_documented():
    """With N = 1 and A = 0: h_t = sum_s dt_s u_s, so out is the cumulative sum of softplus(delta+bias)*u."""
    u = torch.randn(1, 2, 10, dtype=torch.float64)
    delta = torch.randn(1, 2, 10, dtype=torch.float64) * 10  # includes values above the softplus threshold
    bias = torch.tensor([0.5, 25.0], dtype=torch.float64)
    one = torch.ones(2, 1, dtype=torch.float64)
    out = selective_scan_fn(u, delta, torch.zeros(2, 1, dtype=torch.float64), one, one, delta_bias=bias,
                            delta_softplus=True)
    x = delta + bias[:, None]
    dt = torch.where(x > 20, x, torch.log1p(torch.exp(x)))
    torch.testing.assert_close(out, torch.cumsum(dt * u, dim=-1), rtol=1e-12, atol=1e-12)


# --- memory bound -------------------------------------------------------------------------------------------

def test_backward_saves_inputs_and_per_segment_states_only():
    b, d, n, length = 1, 4, 8, 4096
    inputs = make_inputs(batch=b, dim=d, n=n, length=length, dtype=torch.float32)
    out = selective_scan_chunked(*inputs, delta_softplus=True, chunk_len=16, chunks_per_segment=4)
    saved = out.grad_fn.saved_tensors
    input_numel = sum(t.numel() for t in inputs if t is not None)
    n_segments = length // (16 * 4)
    assert sum(t.numel() for t in saved) <= input_numel + n_segments * b * d * n
    assert all(t.numel() < b * d * n * length for t in saved)  # never the (B, D, N, L) state history


# --- dispatch and arguments ---------------------------------------------------------------------------------

def test_cpu_uses_chunked_pytorch_path_and_logs_it_once(caplog, monkeypatch):
    monkeypatch.setattr(interface, "_LOGGED_PATHS", set())
    inputs = [t.detach() for t in make_inputs(length=6, dtype=torch.float32)]
    assert mamba_ssm.active_backend("cpu") == "pytorch-chunked"
    with caplog.at_level(logging.INFO, logger="mamba_ssm"):
        a = selective_scan_fn(*inputs, delta_softplus=True)
        selective_scan_fn(*inputs, delta_softplus=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "mamba_ssm"]
    assert len(lines) == 1 and "pytorch-chunked" in lines[0]
    torch.testing.assert_close(a, selective_scan_chunked(*inputs, delta_softplus=True), rtol=0, atol=0)


def test_scan_restores_torch_thread_count():
    before = torch.get_num_threads()
    selective_scan_fn(*[t.detach() for t in make_inputs(length=6, dtype=torch.float32)])
    assert torch.get_num_threads() == before


def test_empty_sequence_gives_empty_output():
    inputs = [t.detach() for t in make_inputs(length=0, dtype=torch.float32)]
    out, last = selective_scan_fn(*inputs, return_last_state=True)
    assert out.shape == (2, 4, 0) and torch.equal(last, torch.zeros(2, 4, 16))


@pytest.mark.parametrize("change, message", [
    (dict(delta=torch.zeros(2, 4, 5)), "delta must have u's shape"),
    (dict(A=torch.zeros(3, 16)), "A must be (dim=4, N)"),
    (dict(B=torch.zeros(2, 1, 16, 5)), "input-dependent B must be (batch, G, N, L)"),
    (dict(C=torch.zeros(4, 8)), "constant C must be (dim, N)"),
    (dict(B=torch.zeros(2, 3, 16, 6), C=torch.zeros(2, 3, 16, 6)), "divisible by G"),
    (dict(D=torch.zeros(5)), "D must be (4,)"),
    (dict(z=torch.zeros(2, 4, 7)), "z must have u's shape"),
    (dict(delta_bias=torch.zeros(4, 1)), "delta_bias must be (4,)"),
    (dict(B=torch.zeros(2, 16, 6)), "B must be (dim, N) or (batch, G, N, L)"),
])
def test_selective_scan_rejects_bad_arguments_naming_them(change, message):
    args = dict(zip(INPUT_NAMES, [t.detach() for t in make_inputs(length=6, dtype=torch.float32)]))
    args.update(change)
    with pytest.raises(ValueError) as err:
        selective_scan_fn(**args)
    assert message in str(err.value)


def test_selective_scan_rejects_integer_tensors():
    args = dict(zip(INPUT_NAMES, [t.detach() for t in make_inputs(length=6, dtype=torch.float32)]))
    args["u"] = torch.zeros(2, 4, 6, dtype=torch.int32)
    with pytest.raises(TypeError, match="u must be a floating-point tensor"):
        selective_scan_fn(**args)
