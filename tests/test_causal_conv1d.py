"""causal_conv1d: the PyTorch path against torch.nn.functional.conv1d with left padding (independent
reference), forward and backward, plus argument checking and path reporting."""
import pytest
import torch
import torch.nn.functional as F

from causal_conv1d import backend_name, causal_conv1d_fn, causal_conv1d_ref


def conv1d_left_padded(x, weight, bias, activation):
    """Independent reference: grouped conv with W-1 zeros on both sides, truncated to the first L outputs."""
    width = weight.shape[1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
def test_causal_conv1d_matches_left_padded_conv1d_forward_and_backward(width, with_bias, activation):
    x = torch.randn(2, 5, 19, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, width, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    out = causal_conv1d_fn(x, w, b, activation)
    ref = conv1d_left_padded(x, w, b, activation)
    assert out.shape == (2, 5, 19)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    inputs = [x, w] + ([b] if with_bias else [])
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def conv1d_right_padded(x, weight, bias, activation):
    """Independent reference of the anti-causal (reverse) conv: out[t] = Σ_k w[k] x[t + W-1-k], a grouped
    cross-correlation of the right-padded x with the flipped kernel."""
    width = weight.shape[1]
    out = F.conv1d(F.pad(x, (0, width - 1)), weight.flip(-1).unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("length", [1, 3, 19])
def test_causal_conv1d_reverse_matches_right_padded_conv1d_forward_and_backward(width, length):
    x = torch.randn(2, 5, length, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, width, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out = causal_conv1d_fn(x, w, b, "silu", reverse=True)
    ref = conv1d_right_padded(x, w, b, "silu")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, [x, w, b], g), torch.autograd.grad(ref, [x, w, b], g)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_causal_conv1d_reverse_hand_computed():
    # x = [1, 2, 3], w = [10, 100, 1000]: the reverse conv's token t sees x[t] (weight w2), x[t+1] (w1), x[t+2] (w0)
    x = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    w = torch.tensor([[10.0, 100.0, 1000.0]], dtype=torch.float64)
    out = causal_conv1d_fn(x, w, None, None, reverse=True)
    assert out.flatten().tolist() == [1000 * 1 + 100 * 2 + 10 * 3, 1000 * 2 + 100 * 3, 1000 * 3]


@pytest.mark.parametrize("length", [1, 2, 3])
def test_causal_conv1d_sequences_shorter_than_the_kernel(length):
    x = torch.randn(1, 3, length, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(causal_conv1d_fn(x, w, b, "silu"), conv1d_left_padded(x, w, b, "silu"))


def test_causal_conv1d_is_causal_hand_computed():
    # x = [1, 2, 3], w = [w0, w1, w2] = [10, 100, 1000] (w2 multiplies the current token), bias 0.5
    x = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    w = torch.tensor([[10.0, 100.0, 1000.0]], dtype=torch.float64)
    out = causal_conv1d_fn(x, w, torch.tensor([0.5], dtype=torch.float64))
    expected = [1000 * 1 + 0.5, 1000 * 2 + 100 * 1 + 0.5, 1000 * 3 + 100 * 2 + 10 * 1 + 0.5]
    assert out.flatten().tolist() == expected


def test_causal_conv1d_accepts_a_channel_slice_and_low_precision():
    xz = torch.randn(2, 8, 11)
    x = xz[:, :4]  # non-contiguous channel slice, as the Mamba block passes it
    w = torch.randn(4, 4)
    b = torch.randn(4)
    torch.testing.assert_close(causal_conv1d_fn(x, w, b, "silu"), conv1d_left_padded(x, w, b, "silu"),
                               rtol=1e-5, atol=1e-5)
    out16 = causal_conv1d_fn(x.bfloat16(), w, b, "silu")
    assert out16.dtype == torch.bfloat16
    ref = conv1d_left_padded(x.bfloat16().double(), w.double(), b.double(), "silu")
    assert ((out16.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_causal_conv1d_ref_is_what_cpu_tensors_use():
    x, w = torch.randn(1, 3, 9), torch.randn(3, 3)
    assert backend_name("cpu") == "pytorch"
    assert torch.equal(causal_conv1d_fn(x, w, None, "silu"), causal_conv1d_ref(x, w, None, "silu"))


@pytest.mark.parametrize("x_shape, w_shape, b_shape, activation, message", [
    ((2, 4, 8), (4, 5), None, None, "width must be 2, 3 or 4"),
    ((2, 4, 8), (4, 1), None, None, "width must be 2, 3 or 4"),
    ((2, 4, 8), (3, 4), None, None, "weight has 3 channels but x has 4"),
    ((4, 8), (4, 4), None, None, "x must be a 3-D tensor"),
    ((2, 4, 8), (4, 1, 4), None, None, "weight must be a 2-D tensor"),
    ((2, 4, 8), (4, 4), (5,), None, "bias must have shape (4,)"),
    ((2, 4, 8), (4, 4), None, "relu", "activation must be None, 'silu' or 'swish'"),
])
def test_causal_conv1d_rejects_bad_arguments_with_clear_messages(x_shape, w_shape, b_shape, activation, message):
    x, w = torch.randn(*x_shape), torch.randn(*w_shape)
    b = torch.randn(*b_shape) if b_shape else None
    with pytest.raises(ValueError) as err:
        causal_conv1d_fn(x, w, b, activation)
    assert message in str(err.value)


def test_causal_conv1d_rejects_integer_input():
    with pytest.raises(TypeError, match="floating point"):
        causal_conv1d_fn(torch.ones(1, 2, 5, dtype=torch.int64), torch.ones(2, 3))
