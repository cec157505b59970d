"""Small forward+backward of both CUDA kernels, meant to run under compute-sanitizer:

    compute-sanitizer --tool memcheck  python bench/sanitize_kernels.py
    compute-sanitizer --tool racecheck python bench/sanitize_kernels.py

Covers a partial last chunk, several chunk groups, N padding and several channel tiles (atomics), each in the
forward and the reverse (backwards-indexed) direction, with automatic and forced group sizes (groups of
several chunks walked serially by one block), on the lane kernels (96- and 128-thread blocks) and the
state-split ones, and the lane walks' cp.async ring (16-bit vector rows); every third run has no D and every
third another no delta_bias (the dA/dD/dbias reduction then skips those columns)."""
import torch

from causal_conv1d import causal_conv1d_fn
from mamba_ssm.ops import cuda_backend, selective_scan_fn


def main():
    torch.manual_seed(0)
    cases = [(1, 40, 150, 16, torch.float32), (2, 136, 77, 5, torch.bfloat16), (1, 16, 70, 64, torch.float16),
             (2, 40, 160, 16, torch.float32), (1, 72, 136, 32, torch.float16), (2, 96, 328, 16, torch.float32),
             # 16-bit vector rows (L % 8 == 0, d_state 16): the lane walks' cp.async ring
             (2, 40, 160, 16, torch.bfloat16), (1, 96, 328, 16, torch.float16)]
    cuda_backend.available()
    ext = cuda_backend._EXT
    runs = [(c, r, cpg) for c in cases for r in (False, True) for cpg in (0, 2)]
    for i, ((b, d, length, n, dtype), reverse, cpg) in enumerate(runs):
        ext.set_chunks_per_group(cpg)
        mk = lambda *s: torch.randn(*s, device="cuda").to(dtype).requires_grad_()  # noqa: E731
        u, delta, z = mk(b, d, length), mk(b, d, length), mk(b, d, length)
        Bm, Cm = mk(b, 1, n, length), mk(b, 1, n, length)
        A = (-torch.rand(d, n, device="cuda") * 4).requires_grad_()
        D = torch.randn(d, device="cuda", requires_grad=True) if i % 3 != 1 else None
        bias = torch.randn(d, device="cuda", requires_grad=True) if i % 3 != 2 else None
        out, last = selective_scan_fn(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True, return_last_state=True,
                                      reverse=reverse)
        out.float().sum().backward()
        w = torch.randn(d, 4, device="cuda", requires_grad=True)
        y = causal_conv1d_fn(u.detach().requires_grad_(), w, bias, "silu", reverse=reverse)
        y.float().sum().backward()
    ext.set_chunks_per_group(0)
    torch.cuda.synchronize()
    print("sanitize run finished")


if __name__ == "__main__":
    main()
