"""The tri-orientated Mamba block against a separate straightforward implementation written here
(nn.Conv1d, explicit flip and chunk-stack, the sequential float64 scan oracle), parameter count and
names, initialisation, grids and errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mamba_ssm import Mamba, mamba_inner_fn_no_out_proj
from mamba_ssm.ops import selective_scan_ref_loop

REFERENCE_KEYS = {
    "in_proj.weight", "out_proj.weight",
    "conv1d.weight", "conv1d.bias", "conv1d_b.weight", "conv1d_b.bias", "conv1d_s.weight", "conv1d_s.bias",
    "x_proj.weight", "x_proj_b.weight", "x_proj_s.weight",
    "dt_proj.weight", "dt_proj.bias", "dt_proj_b.weight", "dt_proj_b.bias", "dt_proj_s.weight", "dt_proj_s.bias",
    "A_log", "A_b_log", "A_s_log", "D", "D_b", "D_s",
}


def one_direction(xz, conv, x_proj, dt_proj, A_log, D):
    """Straightforward single-direction pass: conv (nn.Conv1d, padded, truncated) + SiLU, x_proj,
    dt_proj without bias, then the sequential scan with the bias as delta_bias."""
    d_inner = xz.shape[1] // 2
    x, z = xz[:, :d_inner], xz[:, d_inner:]
    length = x.shape[-1]
    u = F.silu(conv(x)[..., :length])
    x_dbl = torch.einsum("bdl,kd->blk", u, x_proj.weight)
    rank, n = dt_proj.in_features, A_log.shape[1]
    dt, B, C = torch.split(x_dbl, [rank, n, n], dim=-1)
    delta = torch.einsum("blr,dr->bdl", dt, dt_proj.weight)
    return selective_scan_ref_loop(u, delta, -torch.exp(A_log), B.transpose(1, 2).unsqueeze(1),
                                   C.transpose(1, 2).unsqueeze(1), D, z, delta_bias=dt_proj.bias,
                                   delta_softplus=True)


def chunk_stack(x, n):
    return torch.stack(torch.chunk(x, n, dim=-1), dim=-1).flatten(-2)


def chunk_unstack(x, n):
    b, c, length = x.shape
    return x.reshape(b, c, length // n, n).transpose(-1, -2).reshape(b, c, length)


def reference_block(m: Mamba, h: torch.Tensor, depth: int) -> torch.Tensor:
    """Sum of three independent single-direction passes (forward, flipped, chunk-stacked), then out_proj."""
    xz = torch.einsum("blc,kc->bkl", h, m.in_proj.weight)
    out_f = one_direction(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    out_b = one_direction(xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b).flip(-1)
    out_s = chunk_unstack(one_direction(chunk_stack(xz, depth), m.conv1d_s, m.x_proj_s, m.dt_proj_s,
                                        m.A_s_log, m.D_s), depth)
    y = out_f + out_b + out_s
    return torch.einsum("bdl,cd->blc", y, m.out_proj.weight)


def perturbed_block(d_model=8, d_state=16, seed=0, dtype=torch.float64):
    """A block whose three directions differ (A, D and biases perturbed), so a mix-up would show."""
    torch.manual_seed(seed)
    m = Mamba(d_model, d_state=d_state).to(dtype)
    with torch.no_grad():
        for name in ("A_log", "A_b_log", "A_s_log", "D", "D_b", "D_s"):
            p = getattr(m, name)
            p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.fixture(params=["composed", "fused"])
def inner_path(request, monkeypatch):
    """Run the block through the per-direction autograd functions (the CPU default) or through the fused
    three-direction function of the CUDA path (mamba_ssm.ops.tri_orientated), here with its pure-PyTorch ops."""
    from mamba_ssm.modules import mamba_simple
    from mamba_ssm.ops.tri_orientated import REFERENCE_OPS
    ops = REFERENCE_OPS if request.param == "fused" else None
    monkeypatch.setattr(mamba_simple, "_fused_inner_ops", lambda xz, d_state: ops)
    return request.param


@pytest.mark.parametrize("grid", [(2, 3, 4), (3, 2, 2), (4, 1, 5), (2, 2, 2)])
def test_block_equals_sum_of_three_independent_single_direction_passes(grid, inner_path):
    m = perturbed_block()
    length = grid[0] * grid[1] * grid[2]
    h = torch.randn(2, length, 8, dtype=torch.float64, requires_grad=True)
    out = m(h, grid=grid)
    ref = reference_block(m, h, grid[0])
    assert out.shape == (2, length, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    params = [h] + list(m.parameters())
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for (name, _), a, r in zip([("input", None)] + list(m.named_parameters()), got, want):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-10, msg=f"gradient of {name}")


def test_block_float32_close_to_float64_reference(inner_path):
    m64 = perturbed_block(d_model=16, seed=1)
    m32 = copy.deepcopy(m64).float()
    h = torch.randn(1, 60, 16, dtype=torch.float64)
    ref = reference_block(m64, h, 3)
    out = m32(h.float(), grid=(3, 4, 5))
    assert out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_grid_only_depth_and_plane_size_matter_and_legacy_nslices_matches():
    m = perturbed_block()
    h = torch.randn(1, 24, 8, dtype=torch.float64)
    by_grid = m(h, grid=(2, 3, 4))
    torch.testing.assert_close(m(h, grid=(2, 12, 1)), by_grid, rtol=0, atol=0)
    legacy = Mamba(8, nslices=2).double()
    legacy.load_state_dict(m.state_dict())
    torch.testing.assert_close(legacy(h), by_grid, rtol=0, atol=0)
    # an explicit grid wins over nslices
    torch.testing.assert_close(legacy(h, grid=(4, 3, 2)), m(h, grid=(4, 3, 2)), rtol=0, atol=0)


def test_inner_function_matches_straightforward_direction():
    m = perturbed_block()
    xz = torch.randn(2, 32, 11, dtype=torch.float64)
    A = -torch.exp(m.A_log)
    out = mamba_inner_fn_no_out_proj(xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
                                     A, D=m.D, delta_bias=m.dt_proj.bias, delta_softplus=True)
    ref = one_direction(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d_model", [48, 96, 192, 384])
def test_parameter_count_is_6C2_plus_330C_plus_12Cr(d_model):
    rank = math.ceil(d_model / 16)
    m = Mamba(d_model)
    assert m.dt_rank == rank
    assert sum(p.numel() for p in m.parameters()) == 6 * d_model ** 2 + 330 * d_model + 12 * d_model * rank


def test_parameter_count_for_stage0_and_state_dict_layout():
    m = Mamba(48)
    assert sum(p.numel() for p in m.parameters()) == 31_392  # + LayerNorm 96 = MambaLayer(48) 31,488
    sd = m.state_dict()
    assert set(sd) == REFERENCE_KEYS
    assert sd["in_proj.weight"].shape == (192, 48) and sd["out_proj.weight"].shape == (48, 96)
    for s in ("", "_b", "_s"):
        assert sd[f"conv1d{s}.weight"].shape == (96, 1, 4) and sd[f"conv1d{s}.bias"].shape == (96,)
        assert sd[f"x_proj{s}.weight"].shape == (3 + 32, 96)
        assert sd[f"dt_proj{s}.weight"].shape == (96, 3) and sd[f"dt_proj{s}.bias"].shape == (96,)
        assert sd[f"D{s}"].shape == (96,)
    for name in ("A_log", "A_b_log", "A_s_log"):
        assert sd[name].shape == (96, 16) and sd[name].dtype == torch.float32


def test_reference_initialisation():
    m = Mamba(32, dt_min=0.001, dt_max=0.1)
    expected_A_log = torch.log(torch.arange(1, 17, dtype=torch.float32)).repeat(64, 1)
    for name in ("A_log", "A_b_log", "A_s_log"):
        torch.testing.assert_close(getattr(m, name).data, expected_A_log)
        assert getattr(m, name)._no_weight_decay
    for name in ("D", "D_b", "D_s"):
        assert torch.equal(getattr(m, name).data, torch.ones(64)) and getattr(m, name)._no_weight_decay
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound
    # published behaviour: the reverse and slice directions keep PyTorch's default Linear init
    for s in ("_b", "_s"):
        assert F.softplus(getattr(m, f"dt_proj{s}").bias.detach()).min() > 0.1
    m_all = Mamba(32, init_all_directions_dt=True)
    for s in ("", "_b", "_s"):
        dt = F.softplus(getattr(m_all, f"dt_proj{s}").bias.detach())
        assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)


def test_constructor_and_forward_errors_are_clear():
    with pytest.raises(ValueError, match="only bimamba_type='v3'"):
        Mamba(16, bimamba_type="v2")
    m = Mamba(16)
    h = torch.randn(1, 24, 16)
    with pytest.raises(ValueError, match="needs grid=\\(D, H, W\\)"):
        m(h)
    with pytest.raises(ValueError, match="grid \\(2, 3, 5\\) has 30 positions but the sequence has L = 24"):
        m(h, grid=(2, 3, 5))
    with pytest.raises(ValueError, match="not divisible by nslices = 5"):
        Mamba(16, nslices=5)(h)
    with pytest.raises(ValueError, match="d_model=16"):
        m(torch.randn(1, 24, 8), grid=(2, 3, 4))


def test_block_runs_under_cpu_autocast_bfloat16(inner_path):
    m = perturbed_block(d_model=16, seed=2, dtype=torch.float32)
    h = torch.randn(1, 24, 16)
    plain = m(h, grid=(2, 3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(h, grid=(2, 3, 4))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert ((low.float() - plain).norm() / plain.norm()).item() < 5e-2
    low.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def _block_pass(m, h, grid, fused, monkeypatch, autocast=None):
    """Output, input gradient, parameter gradients and the bytes autograd keeps (parameters not counted) of one
    forward/backward pass through the composed or the fused path."""
    from mamba_ssm.modules import mamba_simple
    from mamba_ssm.ops.tri_orientated import REFERENCE_OPS
    monkeypatch.setattr(mamba_simple, "_fused_inner_ops", lambda xz, d_state: REFERENCE_OPS if fused else None)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    kept = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            kept[key] = t.untyped_storage().nbytes()
        return t

    m.zero_grad()
    h = h.detach().clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if autocast is None:
            y = m(h, grid=grid)
        else:
            with torch.autocast("cpu", dtype=autocast):
                y = m(h, grid=grid)
    y.float().backward(torch.cos(y.detach().float()))
    return y.detach(), h.grad, {k: p.grad.clone() for k, p in m.named_parameters()}, sum(kept.values())


def test_fused_path_keeps_neither_u_nor_delta_nor_the_slice_copy(monkeypatch):
    """The fused function keeps xz and the three x_proj outputs, not each direction's conv output u and delta
    (B, d_inner, L) nor the through-slice copy of xz (B, 2 d_inner, L): at least 7 B*d_inner*L values fewer
    than the composed path, with the same numbers."""
    m = perturbed_block(d_model=8, seed=3)
    grid = (4, 3, 5)
    h = torch.randn(2, 60, 8, dtype=torch.float64)
    y1, gh1, g1, kept_composed = _block_pass(m, h, grid, False, monkeypatch)
    y2, gh2, g2, kept_fused = _block_pass(m, h, grid, True, monkeypatch)
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh2, gh1, rtol=1e-10, atol=1e-12)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-10, atol=1e-12, msg=k)
    d_inner, length, n, rank = m.d_inner, 60, m.d_state, m.dt_rank
    values = 2 * length * 8  # the block's input, kept by in_proj
    values += 2 * length * 2 * d_inner  # xz
    values += 3 * 2 * length * (rank + 2 * n)  # x_dbl per direction
    values += 2 * length * d_inner  # y, kept by out_proj
    values += 2 * 3 * d_inner * n  # exp(A_log) per direction, kept by the exp, and A = -exp(A_log)
    assert kept_fused == values * 8, (kept_fused, values * 8)
    assert kept_composed - kept_fused >= 7 * 2 * d_inner * length * 8


def test_fused_path_under_cpu_autocast_gives_the_composed_numbers_and_dtypes(monkeypatch):
    """Under autocast the fused function runs its projections in the autocast dtype as the composed path does:
    the same bfloat16 output, gradients in the parameters' dtypes and within bfloat16 rounding of the composed
    path's (which sums du in bfloat16 where the fused GEMM adds it in float32)."""
    m = perturbed_block(d_model=16, seed=4, dtype=torch.float32)
    h = torch.randn(2, 48, 16)
    y1, gh1, g1, _ = _block_pass(m, h, (3, 4, 4), False, monkeypatch, autocast=torch.bfloat16)
    y2, gh2, g2, _ = _block_pass(m, h, (3, 4, 4), True, monkeypatch, autocast=torch.bfloat16)
    assert y2.dtype == y1.dtype == torch.bfloat16
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    assert gh2.dtype == torch.float32
    assert ((gh2 - gh1).norm() / gh1.norm()).item() < 1e-2
    for k, p in m.named_parameters():
        assert g2[k].dtype == p.dtype, k
        assert ((g2[k] - g1[k]).norm() / g1[k].norm()).item() < 1e-2, k


def test_fused_function_rejects_bad_arguments():
    from mamba_ssm.ops.tri_orientated import REFERENCE_OPS, tri_orientated_inner
    m = perturbed_block()
    xz = torch.randn(1, 2 * m.d_inner, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match="21 parameters"):
        tri_orientated_inner(xz, (2, 3, 4), REFERENCE_OPS, [])
    with pytest.raises(ValueError, match="xz must be"):
        tri_orientated_inner(xz[:, :-1], (2, 3, 4), REFERENCE_OPS, [None] * 21)
    with pytest.raises(ValueError, match="grid"):
        tri_orientated_inner(xz, (2, 3, 5), REFERENCE_OPS, [None] * 21)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("token_major_input", [False, True])
def test_channels_first_linear_equals_per_token_linear(with_bias, token_major_input):
    """The channel-first projection used for in_proj, x_proj, dt_proj and out_proj equals F.linear applied
    to each token (float64), forward and gradients, for a contiguous and a transposed (token-major) input."""
    from mamba_ssm.ops.selective_scan_interface import channels_first_linear
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    base = torch.randn(3, 11, 5, generator=g, dtype=torch.float64) if token_major_input else \
        torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    base.requires_grad_(True)
    x = base.transpose(1, 2) if token_major_input else base  # (3, 5, 11) either way
    out = channels_first_linear(w, x, b)
    ref = F.linear(x.transpose(1, 2), w, b).transpose(1, 2)
    assert out.shape == (3, 7, 11) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    params = [base, w] + ([b] if with_bias else [])
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(ref, params, grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_channels_first_linear_makes_no_copy_of_its_input_or_output():
    """torch.matmul(weight, x) would copy x token-major and copy the result back (two full-size copies);
    the broadcast batched GEMM makes none (checked with the profiler's operator list, no grad, a weight that
    requires grad as a module's parameter does: that is when matmul folds the batch)."""
    from torch.profiler import profile
    from mamba_ssm.ops.selective_scan_interface import channels_first_linear
    w, x = torch.randn(16, 8, requires_grad=True), torch.randn(2, 8, 4096)
    with torch.no_grad(), profile() as prof:
        channels_first_linear(w, x)
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::copy_", "aten::clone", "aten::contiguous"}, sorted(ops)
    with torch.no_grad(), profile() as prof:  # the test can fail: matmul does copy
        torch.matmul(w, x)
    assert {e.key for e in prof.key_averages()} & {"aten::copy_", "aten::clone"}


def test_channels_first_linear_under_autocast_runs_in_the_autocast_dtype():
    """Under (CPU) autocast bfloat16 the projection computes in bfloat16 like F.linear does, and the float32
    weight and input get float32 gradients close to F.linear's."""
    from mamba_ssm.ops.selective_scan_interface import channels_first_linear
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 4, generator=g, requires_grad=True)
    x = torch.randn(2, 4, 50, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channels_first_linear(w, x)
        ref = F.linear(x.transpose(1, 2), w).transpose(1, 2)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    grad = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    got = torch.autograd.grad(out, (w, x), grad)
    want = torch.autograd.grad(ref, (w, x), grad)
    for a, e in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2)
