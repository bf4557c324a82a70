"""Weight-gradient GEMMs (reference.matmul_accumulate_ and its callers): bf16 operands, fp32 accumulation into the
fp32 accumulator, and never an fp32 copy of a whole activation.

A dispatch-mode spy records every aten call with its operand dtypes and every tensor it creates, so the CPU test
sees what the GEMM was fed; the CUDA branch is checked on the meta device (no data, same dispatch)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from horizon_triton.planning.dryrun import meta_addmm_dtype_out
from horizon_triton.kernels import reference
from horizon_triton.kernels.reference import linear_backward, matmul_accumulate_, rmsnorm_matmul_backward


class Spy(TorchDispatchMode):
    """Records (op name, input dtypes, output (dtype, numel)) of every aten call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.addmm.dtype_out and kwargs["out"].device.type == "meta":
            out = meta_addmm_dtype_out(*args, **kwargs)      # as the dry run does (torch 2.11's meta kernel raises)
        else:
            out = func(*args, **(kwargs or {}))
        tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append((str(func), [t.dtype for t in tensors],
                           [(o.dtype, o.numel()) for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def largest_fp32_created(self, exclude: set[str] = frozenset()) -> int:
        return max((n for name, _, outs in self.calls if name not in exclude
                    for dtype, n in outs if dtype == torch.float32), default=0)


def _bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


def _exact(dy, x):
    return dy.double().t() @ x.double()


def test_cpu_linear_backward_makes_no_fp32_activation_copy(monkeypatch):
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 64 * 48)   # chunks far below the activation size
    T, K, N = 300, 48, 64
    x, dy, w = _bf16(T, K), _bf16(T, N), _bf16(N, K)
    d_weight, d_bias = torch.ones(N, K), torch.ones(N)
    with Spy() as spy:
        dx = linear_backward(dy, x, w, d_weight, d_bias)
    assert dx.dtype == torch.bfloat16
    # the accumulator's in-place updates return d_weight itself; everything else fp32 is a chunk
    assert spy.largest_fp32_created(exclude={"aten.addmm_.default"}) < T * K
    assert all(call[2][0][1] == N * K for call in spy.calls if call[0] == "aten.addmm_.default")
    torch.testing.assert_close(d_weight.double() - 1, _exact(dy, x), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(d_bias.double() - 1, dy.double().sum(0), rtol=1e-6, atol=1e-5)


def test_rmsnorm_matmul_reference_backward_makes_no_fp32_activation_copy(monkeypatch):
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 64 * 48)
    T, H, N = 300, 48, 64
    x, dy, w, g = _bf16(T, H), _bf16(T, N), _bf16(N, H), _bf16(H)
    _, rstd = reference.rmsnorm_matmul_forward(x, g, w, 1e-6)
    d_weight, d_g = torch.zeros(N, H), torch.zeros(H)
    with Spy() as spy:
        rmsnorm_matmul_backward(dy, x, g, w, rstd, d_weight, d_g)
    gemm_inputs = [dtypes for name, dtypes, _ in spy.calls if name == "aten.addmm_.default"]
    assert gemm_inputs and all(dtypes == [torch.float32] * 3 for dtypes in gemm_inputs)   # fp32 chunks only
    xn = (x.float() * rstd[:, None]).to(x.dtype) * g
    torch.testing.assert_close(d_weight.double(), _exact(dy, xn), rtol=1e-6, atol=1e-5)


def test_cuda_branch_feeds_bf16_operands_to_an_fp32_output_gemm():
    """Off the CPU the GEMM reads the bf16 activations as they are: one addmm with out_dtype=float32 writing
    into the accumulator (the meta device takes the same dispatch as CUDA, without data)."""
    T, K, N = 4096, 256, 512
    x = torch.empty(T, K, dtype=torch.bfloat16, device="meta")
    dy = torch.empty(T, N, dtype=torch.bfloat16, device="meta")
    d_weight = torch.empty(N, K, dtype=torch.float32, device="meta")
    with Spy() as spy:
        out = matmul_accumulate_(d_weight, dy.t(), x)
    assert out is d_weight
    gemms = [c for c in spy.calls if "mm" in c[0]]
    assert [c[0] for c in gemms] == ["aten.addmm.dtype_out"]
    assert gemms[0][1] == [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32]   # self, a, b, out
    assert spy.largest_fp32_created(exclude={"aten.addmm.dtype_out"}) == 0


def test_same_dtype_is_one_addmm_and_mixed_operands_are_chunked(monkeypatch):
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 100)
    acc = torch.zeros(5, 7)
    a, b = torch.randn(5, 90), torch.randn(90, 7)
    with Spy() as spy:
        matmul_accumulate_(acc, a, b)
    assert [c[0] for c in spy.calls] == ["aten.addmm_.default"]
    torch.testing.assert_close(acc, a @ b)
    acc.zero_()
    matmul_accumulate_(acc, a, b.to(torch.bfloat16))     # fp32 · bf16, as the cross-entropy reference's gᵀ h
    torch.testing.assert_close(acc, a @ b.to(torch.bfloat16).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_fp64_within_fp32_accumulation():
    T, K, N = 8192, 512, 384
    x, dy = _bf16(T, K).cuda(), _bf16(T, N).cuda()
    d_weight = torch.ones(N, K, device="cuda")
    matmul_accumulate_(d_weight, dy.t(), x)
    torch.testing.assert_close(d_weight.double().cpu() - 1, _exact(dy.cpu(), x.cpu()), rtol=1e-4, atol=1e-3)


def test_cuda_before_torch_2_10_takes_the_chunked_path(monkeypatch):
    """torch 2.9's CUDA addmm rejects an fp32 self with bf16 operands: there the GEMM falls back to fp32 chunks."""
    monkeypatch.setattr(reference, "MIXED_DTYPE_ADDMM", False)
    x = torch.empty(4096, 256, dtype=torch.bfloat16, device="meta")
    dy = torch.empty(4096, 512, dtype=torch.bfloat16, device="meta")
    d_weight = torch.empty(512, 256, dtype=torch.float32, device="meta")
    with Spy() as spy:
        matmul_accumulate_(d_weight, dy.t(), x)
    gemms = [c for c in spy.calls if "mm" in c[0]]
    assert gemms and all(name == "aten.addmm_.default" and dtypes == [torch.float32] * 3
                         for name, dtypes, _ in gemms)
