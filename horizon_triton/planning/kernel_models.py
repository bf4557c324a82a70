"""Stand-ins for the Triton kernels in the dry run (dryrun.py), where every tensor is on PyTorch's meta device and no
kernel can run.

Each method of ``TritonModels`` has the signature of its op in kernels/reference.py, allocates the outputs and the
workspaces that op's launch function in kernels/<family>.py allocates (tests/test_dryrun.py compares the two on
every op), and reports the kernel's work to the dry run's counter: FLOPs by kind (GEMMs by operand dtype, attention
over exactly the (query, key) pairs its causal, sliding-window and document masks allow, elementwise) and the
device-memory bytes it must read and write. A kernel op added to ops.KERNEL_FAMILY needs a method here
(``unmodelled_kernels`` lists the missing ones; until then the dry run runs the torch reference on meta).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from horizon_triton.kernels import reference

from ..models.ops import KERNEL_FAMILY, TORCH_ONLY

HOPPER_SMS = 132                       # H100/H200 SXM: sets the rmsnorm backward's persistent grid (its workspace)


def causal_pairs(length: int, window: int | None) -> int:
    """(query, key) pairs a causal mask allows in a document of ``length`` tokens (with a sliding window: at most
    ``window`` most recent keys per query, Mistral's convention)."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class TritonModels:
    """One method per Triton op, with the signature of kernels/reference.py. Each allocates the outputs and the
    workspaces its launch function in kernels/<family>.py allocates, and counts the kernel's work:
    FLOPs by kind and the device-memory bytes it must read and write."""

    def __init__(self, counter, doc_lengths: tuple[int, ...] | None):
        self.counter = counter
        self.doc_lengths = doc_lengths       # packed documents of every row (None: one document a row)

    def _count(self, kind, flops, *tensors, extra_bytes: int = 0) -> None:
        self.counter.count(kind, flops, nbytes(*tensors) + extra_bytes)

    def _gemm(self, flops, dtype, *tensors, extra_bytes: int = 0) -> None:
        self._count(f"gemm_{str(dtype).removeprefix('torch.')}", flops, *tensors, extra_bytes=extra_bytes)

    # ---- rmsnorm.py ------------------------------------------------------------------------------------
    def rmsnorm_forward(self, x, weight, eps):
        H = x.shape[-1]
        x2 = x.reshape(-1, H)
        y = torch.empty((x2.shape[0], H), dtype=x.dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        self._count("elementwise", 4.0 * x.numel(), x2, weight, y, rstd)
        return y.view(x.shape), rstd.view(x.shape[:-1])

    def _rmsnorm_backward(self, dy, x, weight, rstd, d_weight, dx):
        # rmsnorm._backward: a persistent grid of min(row blocks, 4 · SMs) programs, one fp32 dg row each
        H = x.shape[-1]
        rows = x.numel() // H
        dg_partial = self.counter.workspace((min(rows, 4 * HOPPER_SMS), H), torch.float32, x.device)
        self._count("elementwise", 8.0 * x.numel(), dy, x, rstd, dx, dg_partial)
        d_weight += dg_partial.sum(0)
        return dx.view(x.shape)

    def rmsnorm_backward(self, dy, x, weight, rstd, d_weight):
        dx = torch.empty((x.numel() // x.shape[-1], x.shape[-1]), dtype=x.dtype, device=x.device)
        return self._rmsnorm_backward(dy, x, weight, rstd, d_weight, dx)

    # ---- rmsnorm_matmul.py -----------------------------------------------------------------------------
    def rmsnorm_matmul_forward(self, x, norm_weight, weight, eps):
        T, H = x.shape
        N = weight.shape[0]
        rstd = torch.empty(T, dtype=torch.float32, device=x.device)          # rmsnorm_rstd: one read of x
        self._count("elementwise", 2.0 * x.numel(), x, rstd)
        y = torch.empty((T, N), dtype=x.dtype, device=x.device)
        self._gemm(2.0 * T * N * H, x.dtype, x, weight, y)
        return y, rstd

    def rmsnorm_matmul_backward(self, dy, x, norm_weight, weight, rstd, d_weight, d_norm_weight):
        T, H = x.shape
        N = weight.shape[0]
        if dy.stride(1) != 1:
            dy = dy.contiguous()
        dxn = torch.empty((T, H), dtype=x.dtype, device=x.device)
        self._gemm(2.0 * T * N * H, x.dtype, dy, weight, dxn)                           # dxn = dy @ W
        self._gemm(2.0 * T * N * H, x.dtype, x, dy, d_weight, d_weight)                # dW += dyᵀ @ xn (RMW)
        return self._rmsnorm_backward(dxn, x, norm_weight, rstd, d_norm_weight, dxn)   # dx over dxn

    # ---- rope.py ---------------------------------------------------------------------------------------
    def rope_forward_(self, x, cos, sin):
        self._count("elementwise", 6.0 * x.numel(), x, x, cos, sin)
        return x

    rope_backward_ = rope_forward_

    # ---- swiglu.py -------------------------------------------------------------------------------------
    def swiglu_forward(self, gate_up):
        T, I = gate_up.shape[0], gate_up.shape[1] // 2
        h = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device)
        self._count("elementwise", 5.0 * T * I, gate_up, h)
        return h

    def swiglu_backward(self, dh, gate_up):
        if dh.stride(1) != 1:
            dh = dh.contiguous()
        T, I = dh.shape
        d_gate_up = torch.empty((T, 2 * I), dtype=gate_up.dtype, device=gate_up.device)
        self._count("elementwise", 10.0 * T * I, dh, gate_up, d_gate_up)
        return d_gate_up

    # ---- attention.py ----------------------------------------------------------------------------------
    def _pairs(self, S: int, doc_ids, sliding_window) -> int:
        """Allowed (query, key) pairs of one row."""
        if doc_ids is None:
            return causal_pairs(S, sliding_window)
        if self.doc_lengths is None or sum(self.doc_lengths) != S:
            raise ValueError(f"dry run: documents {self.doc_lengths} do not tile a row of {S} tokens")
        return sum(causal_pairs(n, sliding_window) for n in self.doc_lengths)

    def attention_forward(self, q, k, v, doc_ids, scale, sliding_window=None):
        B, S, Hq, D = q.shape
        o = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
        # QKᵀ and PV: 2·D FLOPs each per allowed pair and query head
        self._count("attention_fwd", 4.0 * D * Hq * B * self._pairs(S, doc_ids, sliding_window), q, k, v, o, lse)
        return o, lse

    def attention_backward(self, do, q, k, v, o, lse, doc_ids, scale, sliding_window=None):
        B, S, Hq, D = q.shape
        Hkv = k.shape[2]
        lse = lse.contiguous()
        delta = self.counter.workspace((B, Hq, S), torch.float32, q.device)
        self._count("elementwise", 2.0 * o.numel(), o, do, delta)                      # _attn_bwd_preprocess
        dq = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, S, Hkv, D), dtype=q.dtype, device=q.device)
        dv = torch.empty((B, S, Hkv, D), dtype=q.dtype, device=q.device)
        # QKᵀ again, dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q: 5 · 2·D per pair and query head
        self._count("attention_bwd", 10.0 * D * Hq * B * self._pairs(S, doc_ids, sliding_window),
                    q, k, v, do, lse, delta, dq, dk, dv)
        return dq, dk, dv

    # ---- cross_entropy.py ------------------------------------------------------------------------------
    def linear_cross_entropy(self, h, weight, targets, d_weight, grad_scale, chunk_size=4096):
        from horizon_triton.kernels import cross_entropy
        T, H = h.shape
        V = weight.shape[0]
        cfg = cross_entropy.default_config(h.dtype)
        targets = targets.contiguous()
        dh = torch.empty_like(h)
        loss_rows = torch.zeros(T, dtype=torch.float32, device=h.device)
        rows = min(chunk_size, T)
        buf = self.counter.workspace((rows, -(-V // 16) * 16), h.dtype, h.device)   # logits, then g in place
        for start in range(0, T, chunk_size):
            n = min(start + chunk_size, T) - start
            hc, logits = h[start:start + n], buf[:n, :V]
            stats = (self.counter.workspace((2, n, -(-V // cfg["logits"]["BLOCK_N"])), torch.float32, h.device)
                     if cfg["logits"]["impl"] == "triton" else None)
            self._gemm(2.0 * n * H * V, h.dtype, hc, weight, logits, stats)                 # logits = hc Wᵀ
            self._count("elementwise", 4.0 * n * V, logits, logits, stats)                  # loss, g in place
            self._gemm(2.0 * n * H * V, h.dtype, logits, weight, hc)                        # dh_c = g W
            if d_weight is not None:                                                        # None: frozen
                self._gemm(2.0 * n * H * V, h.dtype, logits, hc, d_weight, d_weight)        # dW += gᵀ hc
            del stats
        return loss_rows.sum(), dh

    def _chunk_logits(self, h, weight, token_chunk):
        """cross_entropy._chunk_setup's logits buffer, and (start, rows) of each token chunk."""
        T, V_c = h.shape[0], weight.shape[0]
        buf = self.counter.workspace((min(token_chunk, T), -(-V_c // 16) * 16), h.dtype, h.device)
        return buf, [(s, min(s + token_chunk, T) - s) for s in range(0, T, token_chunk)]

    def cross_entropy_chunk_stats_(self, h, weight, targets, start, row_max, row_sum, target_logit,
                                   token_chunk=4096):
        H, V_c = h.shape[1], weight.shape[0]
        buf, chunks = self._chunk_logits(h, weight, token_chunk)
        for s, n in chunks:
            logits = buf[:n, :V_c]
            self._gemm(2.0 * n * H * V_c, h.dtype, h[s:s + n], weight, logits)          # logits = h_c W_cᵀ
            # _chunk_stats_kernel: one read of the logits, the running statistics read and written
            self._count("elementwise", 3.0 * n * V_c, logits, row_max[s:s + n], row_sum[s:s + n],
                        extra_bytes=2 * nbytes(row_max[s:s + n], row_sum[s:s + n], target_logit[s:s + n]))

    def cross_entropy_chunk_backward(self, h, weight, targets, start, lse, grad_scale, dh, d_weight,
                                     token_chunk=4096):
        H, V_c = h.shape[1], weight.shape[0]
        buf, chunks = self._chunk_logits(h, weight, token_chunk)
        per_token = isinstance(grad_scale, torch.Tensor)        # DPO's weights; else cross_entropy._scale_rows'
        scales = grad_scale if per_token else torch.empty(1, dtype=torch.float32, device=h.device)
        for s, n in chunks:
            hc, logits = h[s:s + n], buf[:n, :V_c]
            self._gemm(2.0 * n * H * V_c, h.dtype, hc, weight, logits)                    # logits again
            self._count("elementwise", 3.0 * n * V_c, logits, logits, lse[s:s + n],        # g in place, bf16
                        scales[s:s + n] if per_token else None)
            # both weight-side GEMMs read bf16 g and accumulate in fp32 (read-modify-write of dh and dW_c)
            self._gemm(2.0 * n * H * V_c, h.dtype, logits, weight, dh[s:s + n], dh[s:s + n])   # dh += g W_c
            if d_weight is not None:                                                            # None: frozen
                self._gemm(2.0 * n * H * V_c, h.dtype, logits, hc, d_weight, d_weight)         # dW_c += gᵀ h_c

    # ---- moe_routing.py --------------------------------------------------------------------------------
    def _routing(self, logits, top_k, flops_per_logit, *more):
        T = logits.shape[0]
        weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
        ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
        self._count("elementwise", flops_per_logit * logits.numel(), logits, weights, ids, *more)
        return weights, ids

    def moe_softmax_topk_forward(self, logits, top_k, renormalize):
        return self._routing(logits, top_k, 4.0 + 2 * top_k)             # softmax, then k passes of argmax

    def moe_sigmoid_topk_forward(self, logits, bias, top_k, n_group, topk_group, renormalize, scaling):
        # σ, then per group two argmax passes, topk_group passes over the groups, k passes of argmax
        return self._routing(logits, top_k, 4.0 + 4 * n_group + 2 * topk_group + 2 * top_k, bias)

    def moe_softmax_topk_backward(self, d_weights, logits, ids, renormalize):
        d_logits = torch.empty_like(logits)
        self._count("elementwise", (6.0 + 3 * ids.shape[1]) * logits.numel(), d_weights, logits, ids, d_logits)
        return d_logits

    def moe_sigmoid_topk_backward(self, d_weights, logits, ids, renormalize, scaling):
        return self.moe_softmax_topk_backward(d_weights, logits, ids, renormalize)

    def moe_permute(self, ids, num_experts):
        from horizon_triton.kernels import moe_routing
        S, block = ids.numel(), moe_routing.PERMUTE_BLOCK
        counts = torch.empty((-(-S // block), num_experts), dtype=torch.int32, device=ids.device)
        self._count("elementwise", 1.0 * S, ids, counts)                               # histogram per block
        start, offsets = moe_routing.block_starts(counts, S)
        order = torch.empty(S, dtype=torch.int32, device=ids.device)
        self._count("elementwise", 2.0 * S * block, ids, start, order)                 # ranks within a block
        return order, offsets

    # ---- moe_experts.py --------------------------------------------------------------------------------
    # A grouped GEMM reads its M gathered rows (M·K), every expert's weight (E·N·K), writes M·N, and reads
    # the two index arrays; a dW GEMM reads D and A once each and updates every expert's fp32 dW in place.
    def _grouped_gemm(self, M, N, K, a, weight, c, *more):
        self._gemm(2.0 * M * N * K, a.dtype, weight, c, *more, extra_bytes=M * K * a.element_size() + 8 * M)

    def _grouped_dw(self, M, N, K, d, a, d_weight, d_bias):
        self._gemm(2.0 * M * N * K, d.dtype, d_weight, d_weight, d_bias, d_bias,
                   extra_bytes=M * (N + K) * d.element_size() + 8 * M)

    def moe_gate_up_forward(self, x, order, offsets, top_k, weight, bias=None):
        M, N, H = order.shape[0], weight.shape[1], x.shape[1]
        identity = torch.arange(M, dtype=torch.int32, device=x.device)
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        self._grouped_gemm(M, N, H, x, weight, out, bias, offsets)
        del identity
        return out

    def moe_gate_up_backward(self, d_gate_up, x, order, offsets, top_k, weight, d_weight, d_bias=None):
        (T, H), M, N = x.shape, order.shape[0], weight.shape[1]
        identity = torch.arange(M, dtype=torch.int32, device=x.device)
        if d_weight is not None:                                                       # None: frozen
            self._grouped_dw(M, N, H, d_gate_up, x, d_weight, d_bias)                  # dW_gu (and db_gu)
        dx_slots = torch.empty((M, H), dtype=x.dtype, device=x.device)
        self._grouped_gemm(M, H, N, d_gate_up, weight, dx_slots, offsets)              # dx per slot
        del identity
        return self.moe_combine_forward(dx_slots, torch.ones((T, top_k), dtype=torch.float32, device=x.device))

    def moe_down_forward(self, h, order, offsets, weight, bias=None):
        (M, I), N = h.shape, weight.shape[1]
        identity = torch.arange(M, dtype=torch.int32, device=h.device)
        out = torch.empty((M, N), dtype=h.dtype, device=h.device)
        self._grouped_gemm(M, N, I, h, weight, out, bias, offsets)
        del identity
        return out

    def moe_down_backward(self, d_o, h, order, offsets, weight, d_weight, d_bias=None):
        (M, I), N = h.shape, weight.shape[1]
        identity = torch.arange(M, dtype=torch.int32, device=h.device)
        if d_weight is not None:                                                       # None: frozen
            self._grouped_dw(M, N, I, d_o, h, d_weight, d_bias)                        # dW_d (and db_d)
        dh = torch.empty_like(h)
        self._grouped_gemm(M, I, N, d_o, weight, dh, offsets)
        del identity
        return dh

    def moe_combine_forward(self, o, weights):
        T, k = weights.shape
        y = torch.empty((T, o.shape[1]), dtype=o.dtype, device=o.device)
        self._count("elementwise", 2.0 * o.numel(), o, weights, y)
        return y

    def moe_combine_backward(self, dy, o, weights):
        d_o = torch.empty_like(o)
        d_weights = torch.empty(weights.shape, dtype=torch.float32, device=o.device)
        self._count("elementwise", 3.0 * o.numel(), dy, o, weights, d_o, d_weights)
        return d_o, d_weights

    # ---- clamped_swiglu.py -----------------------------------------------------------------------------
    def clamped_swiglu_forward(self, gate_up, alpha, limit):
        M, I = gate_up.shape[0], gate_up.shape[1] // 2
        h = torch.empty((M, I), dtype=gate_up.dtype, device=gate_up.device)
        self._count("elementwise", 8.0 * M * I, gate_up, h)
        return h

    def clamped_swiglu_backward(self, dh, gate_up, alpha, limit):
        if dh.stride(1) != 1:
            dh = dh.contiguous()
        M, I = dh.shape
        d_gate_up = torch.empty((M, 2 * I), dtype=gate_up.dtype, device=gate_up.device)
        self._count("elementwise", 14.0 * M * I, dh, gate_up, d_gate_up)
        return d_gate_up


def meta_ops(backend: str, counter, doc_lengths) -> object:
    """The ops namespace of a dry run: the torch references themselves (they run on meta tensors as they are)
    when modelling the torch backend; on the Triton backends, TritonModels for every kernel op it models."""
    ops = {name: getattr(reference, name) for name in (*KERNEL_FAMILY, *TORCH_ONLY)}
    if backend != "torch":
        models = TritonModels(counter, doc_lengths)
        ops.update({name: getattr(models, name) for name in KERNEL_FAMILY if hasattr(models, name)})
    return SimpleNamespace(**ops)


def unmodelled_kernels() -> list[str]:
    """Kernel ops a dry run of the Triton backend runs as torch references (their memory is the reference's)."""
    return sorted(name for name in KERNEL_FAMILY if not hasattr(TritonModels, name))
