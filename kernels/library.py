"""The library-backed path: every op of kernels/reference.py through PyTorch's own fused kernels, no autograd.

``HORIZON_KERNELS=torch`` on CUDA runs these (ops.py): the always-correct baseline that the Triton kernels are
measured against in the same run, and what the start-up canary falls back to for a Triton op that fails.

- attention: FlashAttention-2 as PyTorch ships it, called directly (``aten._flash_attention_forward`` /
  ``_flash_attention_backward``), always in its variable-length form: the batch is flattened to T tokens and
  cut into segments at every row and document boundary (``cu_seqlens``), so packed documents never see each
  other. Causal, grouped-query heads natively, Mistral's window as ``window_size_left = W − 1``.
  For i − j < W and j ≤ i:  o = softmax(scale · q kᵀ) v per segment, lse in natural log, as the reference.
- GEMMs (linear, the fused rmsnorm + matmul, the cross-entropy's): cuBLAS in bf16 with fp32 accumulation; weight
  gradients straight into the fp32 accumulator (reference.matmul_accumulate_).
- cross-entropy: the reference's chunking with bf16 logits and a bf16 gradient g, as the Triton kernel rounds
  them, so the two backward GEMMs run on tensor cores; lse, the loss and the softmax in fp32. Likewise pass 2
  of the vocabulary-chunked head (pass 1, the statistics, is the reference's: one GEMM in h.dtype).
- rmsnorm, rope, swiglu: the references (elementwise; their speed is the memory bandwidth either way).
- MoE experts (moe_gate_up_* / moe_down_*): one ``torch._grouped_mm`` per GEMM for all experts, on the rows
  gathered into expert order (offsets from moe_permute as its ``offs``): forward and input gradients as
  [M, K] @ W[e]ᵀ / W[e], weight gradients as the 2-D × 2-D form dYᵀ @ X → [E, N, K] added into the fp32
  accumulator (its N axis in chunks, so the product never exceeds GROUPED_DW_CHUNK_ELEMENTS), bias gradients by
  index_add_ over each row's expert; no host sync. On CUDA in the operands' dtype (torch 2.11: bf16 on sm_90+;
  the weight-gradient product is then rounded to bf16 once before it is added, where the reference and the Triton
  kernel add fp32), on CPU in fp32 (the references' arithmetic). Where torch._grouped_mm refuses the device or
  dtype (probed once per device and dtype: fp32 on CUDA, a GPU before Hopper), a weight dimension is no multiple
  of 16 bytes (LoRA rank 4 in bf16), or on meta tensors: the reference's per-expert loop (one host sync a call).
  The routing, permutation, combine and the gates stay the references'.

Supported range of the flash path: CUDA, bf16/fp16, head_dim ≤ 256 and a multiple of 8; every document one
contiguous run of its row (packed documents, left or right padding: what Engine.prepare builds). Anything else
on CUDA — fp32 (exact mode), other head dims, a document cut in two by a masked token — takes the reference
attention (O(S²) memory: small shapes only).
Known gaps: cu_seqlens and the longest segment are computed once per doc_ids tensor on a host copy of it (one
host sync, cached for the layers that share it); cuBLAS may use reduced-precision split-K reductions for bf16 unless
``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` is False.

On CPU the same segment layout runs through aten's CPU flash attention (``_cpu_flash_forward`` /
``_cpu_flash_backward``, forward and backward, fp32 and bf16, grouped-query heads natively): one causal call for
all segments when they have one length (rows without documents), else one per segment, Mistral's window as an
additive mask inside a segment longer than it, and one-token segments (padding) in closed form. That is the
engine's CPU attention (ops.py): nothing S×S beyond a window's mask, and causal blocks skipped.
"""
from __future__ import annotations

import weakref

import numpy
import torch

from . import reference
from .reference import (IGNORE_INDEX, cross_entropy_chunk_grad, linear_backward, linear_forward,  # noqa: F401
                        matmul_accumulate_, rmsnorm_backward, rmsnorm_forward, rmsnorm_matmul_backward,
                        rmsnorm_matmul_forward, rope_backward_, rope_forward_, swiglu_backward, swiglu_forward,
                        token_scales)

FLASH_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------
# Segment layout: rows × documents -> cumulative sequence lengths over the flattened tokens
# ----------------------------------------------------------------------------------------------------------
_layouts: dict[int, tuple] = {}    # id(doc_ids) -> (weakref to it, (cu_seqlens, max_seqlen) or None)


def varlen_layout(doc_ids: torch.Tensor | None, B: int, S: int, device) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens int32 [n + 1], max_seqlen): the n segments of the flattened [B·S] tokens that attend only
    among themselves — one per row, cut again wherever doc_ids changes along the row. None when some document is
    not one contiguous run of its row (a masked token inside it, whose two sides still see each other): no
    segment layout expresses that, the reference attention does.

    Without doc_ids no sync is needed; with them one (the segment count and the longest segment are host
    values), paid once per doc_ids tensor: every layer's forward and backward reuses it."""
    if doc_ids is None:
        return torch.arange(0, B * S + 1, S, dtype=torch.int32, device=device), S
    cached = _layouts.get(id(doc_ids))
    if cached is not None and cached[0]() is doc_ids:
        return cached[1]
    if doc_ids.shape != (B, S):
        raise ValueError(f"attention: doc_ids shape {tuple(doc_ids.shape)} != (B, S) = {(B, S)}")
    # sync, the only one: the segment boundaries and the longest segment are launch arguments of the varlen
    # kernel, so they are worked out on a host copy (B·S ints, 128 KB at 32K tokens) rather than on the device
    # with a host read for each (the check, the boundary count, the longest segment)
    docs = doc_ids.cpu().numpy()
    starts = numpy.ones((B, S), dtype=bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]                      # a row's first token starts a segment too
    ordered = numpy.sort(docs, axis=1)
    documents = (ordered[:, 1:] != ordered[:, :-1]).sum(1) + 1
    if (starts.sum(1) != documents).any():                          # more runs than documents: one is cut
        layout = None
    else:
        cu_host = numpy.append(numpy.flatnonzero(starts), B * S).astype(numpy.int32)
        layout = torch.from_numpy(cu_host).to(device), int(numpy.diff(cu_host).max())
    if len(_layouts) > 64:                                           # only the live micro-batches matter
        _layouts.clear()
    _layouts[id(doc_ids)] = (weakref.ref(doc_ids), layout)
    return layout


def window_left(S: int, sliding_window: int | None) -> int | None:
    """Keys a query may look back beyond itself: W − 1 for Mistral's i − j < W; None = unbounded."""
    return None if sliding_window is None or sliding_window >= S else sliding_window - 1


def _flash_calls(q: torch.Tensor):
    """(forward, backward) varlen calls for q's device and dtype, or None where only the reference applies.
    On CPU aten's CPU flash attention, through calls that take the same arguments."""
    if not q.is_cuda:
        return (_cpu_flash_forward, _cpu_flash_backward) if q.device.type == "cpu" else None
    D = q.shape[-1]
    return (_cuda_flash_forward, _cuda_flash_backward) if q.dtype in FLASH_DTYPES and D <= 256 and D % 8 == 0 \
        else None


def _lse_to_reference(lse_ht: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """[Hq, T] (the varlen kernels' layout) -> [B, Hq, S] (the reference's)."""
    return lse_ht.view(-1, B, S).permute(1, 0, 2).contiguous()


def _lse_to_varlen(lse: torch.Tensor) -> torch.Tensor:
    """[B, Hq, S] -> [Hq, T]."""
    return lse.permute(1, 0, 2).reshape(lse.shape[1], -1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                      scale: float, sliding_window: int | None = None):
    """-> (o[B, S, Hq, D] in q.dtype, lse[B, Hq, S] fp32). Same contract as reference.attention_forward."""
    B, S, Hq, D = q.shape
    calls = _flash_calls(q)
    layout = None if calls is None else varlen_layout(doc_ids, B, S, q.device)
    if layout is None:
        return reference.attention_forward(q, k, v, doc_ids, scale, sliding_window)
    cu, max_seqlen = layout
    T = B * S
    o, lse = calls[0](q.reshape(T, Hq, D), k.reshape(T, -1, D), v.reshape(T, -1, D), cu, max_seqlen,
                                 scale, window_left(S, sliding_window))
    return o.view(B, S, Hq, D), _lse_to_reference(lse, B, S)


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, doc_ids: torch.Tensor | None, scale: float,
                       sliding_window: int | None = None):
    """-> (dq, dk, dv) in the input dtype. Same contract as reference.attention_backward."""
    B, S, Hq, D = q.shape
    calls = _flash_calls(q)
    layout = None if calls is None else varlen_layout(doc_ids, B, S, q.device)
    if layout is None:
        return reference.attention_backward(do, q, k, v, o, lse, doc_ids, scale, sliding_window)
    cu, max_seqlen = layout
    T, Hkv = B * S, k.shape[2]
    dq, dk, dv = calls[1](do.reshape(T, Hq, D), q.reshape(T, Hq, D), k.reshape(T, Hkv, D),
                                      v.reshape(T, Hkv, D), o.reshape(T, Hq, D), _lse_to_varlen(lse), cu,
                                      max_seqlen, scale, window_left(S, sliding_window))
    return dq.view(B, S, Hq, D), dk.view(B, S, Hkv, D), dv.view(B, S, Hkv, D)


def _cuda_flash_forward(q, k, v, cu, max_seqlen: int, scale: float, left: int | None):
    """q[T, Hq, D], k/v[T, Hkv, D] -> (o[T, Hq, D], lse[Hq, T]) through FlashAttention-2's varlen kernel."""
    o, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, True, False, scale=scale,
        window_size_left=left, window_size_right=None if left is None else 0)
    return o, lse


def _cuda_flash_backward(do, q, k, v, o, lse, cu, max_seqlen: int, scale: float, left: int | None):
    """-> (dq[T, Hq, D], dk[T, Hkv, D], dv[T, Hkv, D]); the kernel sums each kv head's query group itself.
    No dropout, so the random-state arguments are placeholders the kernel does not read."""
    philox_seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
    philox_offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    return torch.ops.aten._flash_attention_backward(
        do, q, k, v, o, lse, cu, cu, max_seqlen, max_seqlen, 0.0, True, philox_seed, philox_offset, scale=scale,
        window_size_left=left, window_size_right=None if left is None else 0)


_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_grad = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _cpu_segments(cu: torch.Tensor) -> tuple[list[tuple[int, int]], int | None]:
    """The segments [a, b) of cu, and their common length when they all have one (rows without documents)."""
    bounds = cu.tolist()
    segments = list(zip(bounds, bounds[1:]))
    lengths = {b - a for a, b in segments}
    return segments, lengths.pop() if len(lengths) == 1 else None


def _window_mask(n: int, left: int | None, dtype) -> torch.Tensor | None:
    """Additive [n, n] mask of a segment of n tokens for the window (the call is causal too: it skips the blocks
    above the diagonal); None when the window does not cut the segment."""
    if left is None or n <= left + 1:
        return None
    i = torch.arange(n)
    return torch.zeros(n, n, dtype=dtype).masked_fill_(i[:, None] - i[None, :] > left, float("-inf"))


def _heads_first(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[T, H, D] -> [rows, H, T / rows, D] (a view: the kernel takes these strides)."""
    return t.view(rows, -1, *t.shape[1:]).transpose(1, 2)


def _tokens_first(t: torch.Tensor) -> torch.Tensor:
    """[rows, H, n, D] from the kernel, laid out [rows, n, H, D] -> [rows · n, H, D]."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


def _cpu_flash_forward(q, k, v, cu, max_seqlen: int, scale: float, left: int | None):
    """The CUDA call on CPU: q[T, Hq, D], k/v[T, Hkv, D] -> (o[T, Hq, D], lse[Hq, T]) through aten's CPU flash
    attention, causal within each segment of cu."""
    T, Hq, D = q.shape
    segments, n = _cpu_segments(cu)
    if n is not None and n > 1:                  # one batched call, the segments as its rows
        rows = T // n
        o, lse = _cpu_flash(*(_heads_first(t, rows) for t in (q, k, v)), 0.0, True,
                            attn_mask=_window_mask(n, left, q.dtype), scale=scale)
        return _tokens_first(o), lse.transpose(0, 1).reshape(Hq, T)
    o, lse = torch.empty_like(q), torch.empty(Hq, T, dtype=torch.float32)
    singles = []
    for a, b in segments:
        if b - a == 1:
            singles.append(a)
            continue
        o_s, lse_s = _cpu_flash(*(_heads_first(t[a:b], 1) for t in (q, k, v)), 0.0, True,
                                attn_mask=_window_mask(b - a, left, q.dtype), scale=scale)
        o[a:b], lse[:, a:b] = _tokens_first(o_s), lse_s[0]
    if singles:                                  # a token alone sees itself: p = 1, o = v, lse = its score
        i = torch.tensor(singles)
        k_i, v_i = (t[i].repeat_interleave(Hq // k.shape[1], dim=1) for t in (k, v))
        o[i] = v_i
        lse[:, i] = (q[i].float() * k_i.float()).sum(-1).mul_(scale).t()
    return o, lse


def _cpu_flash_backward(do, q, k, v, o, lse, cu, max_seqlen: int, scale: float, left: int | None):
    """-> (dq[T, Hq, D], dk[T, Hkv, D], dv[T, Hkv, D]); the kernel sums each kv head's query group itself."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    segments, n = _cpu_segments(cu)
    if n is not None and n > 1:
        rows = T // n
        grads = _cpu_flash_grad(*(_heads_first(t, rows) for t in (do, q, k, v, o)),
                                lse.view(Hq, rows, n).transpose(0, 1), 0.0, True,
                                attn_mask=_window_mask(n, left, q.dtype), scale=scale)
        return tuple(_tokens_first(g) for g in grads)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    singles = []
    for a, b in segments:
        if b - a == 1:
            singles.append(a)
            continue
        grads = _cpu_flash_grad(*(_heads_first(t[a:b], 1) for t in (do, q, k, v, o)), lse[None, :, a:b], 0.0,
                                True, attn_mask=_window_mask(b - a, left, q.dtype), scale=scale)
        dq[a:b], dk[a:b], dv[a:b] = (_tokens_first(g) for g in grads)
    if singles:                                  # p = 1: dv = Σ_group dO, and dS = p (dO·v − dO·o) = 0
        i = torch.tensor(singles)
        dq[i], dk[i] = 0.0, 0.0
        dv[i] = do[i].float().view(-1, Hkv, Hq // Hkv, D).sum(2).to(dv.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Fused linear cross-entropy with bf16 logits and gradient (as the Triton kernel), fp32 statistics
# ----------------------------------------------------------------------------------------------------------
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, d_weight: torch.Tensor,
                         grad_scale: float, chunk_size: int = 4096):
    """Same contract as reference.linear_cross_entropy; g = grad_scale · (softmax − onehot) rounded to h.dtype."""
    T = h.shape[0]
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h)
    for start in range(0, T, chunk_size):
        hc = h[start:start + chunk_size]                                 # [n, H]
        tc = targets[start:start + chunk_size]
        valid = tc != IGNORE_INDEX
        safe_t = torch.where(valid, tc, 0)
        logits = (hc @ weight.t()).float()                               # [n, V]: cuBLAS in h.dtype, then fp32
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, safe_t[:, None]).squeeze(1)
        loss_sum += torch.where(valid, lse - picked, 0.0).sum()
        g = logits.sub_(lse[:, None]).exp_()                             # softmax in place of the logits
        g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
        g *= (valid.float() * grad_scale)[:, None]
        g = g.to(h.dtype)                                                # [n, V] in h.dtype
        dh[start:start + chunk_size] = g @ weight
        if d_weight is not None:                                         # None: a frozen lm_head
            matmul_accumulate_(d_weight, g.t(), hc)
    return loss_sum, dh


def cross_entropy_chunk_backward(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, start: int,
                                 lse: torch.Tensor, grad_scale, dh: torch.Tensor, d_weight: torch.Tensor,
                                 token_chunk: int = 4096) -> None:
    """Same contract as reference.cross_entropy_chunk_backward; g_c rounded to h.dtype (as the Triton kernel),
    so that dh += g_c @ W_c and dW_c += g_cᵀ @ h are bf16 GEMMs accumulating in fp32, not fp32 ones."""
    for s in range(0, h.shape[0], token_chunk):
        e = s + token_chunk
        hc = h[s:e]
        g = cross_entropy_chunk_grad(hc, weight, targets[s:e], start, lse[s:e],
                                     token_scales(grad_scale, s, e)).to(h.dtype)
        matmul_accumulate_(dh[s:e], g, weight)
        if d_weight is not None:                                         # None: a frozen lm_head
            matmul_accumulate_(d_weight, g.t(), hc)


# ----------------------------------------------------------------------------------------------------------
# MoE experts: grouped GEMMs through torch._grouped_mm, one call per GEMM for all experts, no host sync
#   gate_up:  y[r] = x[order[r] // k] @ W[e]ᵀ (+ b[e])        for the rows r of expert e (expert order)
#   down:     o[order[r]] = h[r] @ W[e]ᵀ (+ b[e])             (scattered to slot order)
#   backward: dX rows = dY rows @ W[e];  dW[e] += dY[rows of e]ᵀ @ X[rows of e];  db[e] += Σ dY[rows of e]
# ----------------------------------------------------------------------------------------------------------
GROUPED_DW_CHUNK_ELEMENTS = 1 << 24   # the bound on one weight-gradient product [E, n, K] before it is added
_grouped_mm_runs: dict = {}           # (device, dtype) -> whether torch._grouped_mm computes there


def _grouped_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the grouped GEMMs compute in: fp32 on CPU (the references' arithmetic: products of bf16 values
    are exact in fp32, and CPUs without bf16 units are not faster in bf16), the operands' own on CUDA."""
    return torch.float32 if t.device.type == "cpu" else t.dtype


def _grouped_mm_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm takes this device and dtype (on CUDA in torch 2.11: sm_90+ and bf16 only);
    probed once on a tiny problem and remembered."""
    key = (str(device), dtype)
    if key not in _grouped_mm_runs:
        try:
            torch._grouped_mm(torch.zeros(16, 16, dtype=dtype, device=device),
                              torch.zeros(2, 16, 16, dtype=dtype, device=device),
                              offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
            _grouped_mm_runs[key] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _grouped_mm_runs[key] = False
    return _grouped_mm_runs[key]


def _grouped_plan(a: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype of this call's grouped GEMMs, or None where the reference runs it instead (meta tensors, a
    device or dtype torch._grouped_mm refuses, or a weight dimension not a multiple of 16 bytes, which its
    operand layout requires: e.g. a LoRA rank 4 in bf16)."""
    if a.is_meta:
        return None
    dtype = _grouped_dtype(a)
    align = 16 // torch.empty((), dtype=dtype).element_size()
    if weight.shape[1] % align or weight.shape[2] % align or not _grouped_mm_runs_on(a.device, dtype):
        return None
    return dtype


def _grouped_operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, laid out as torch._grouped_mm takes it: a 16-byte aligned start, one of the last two axes of
    unit stride and the other's stride a multiple of 16 bytes (else a contiguous copy: a LoRA B view, a slot view
    at an odd offset)."""
    t = t.to(dtype)
    align = 16 // t.element_size()
    s = t.stride()
    aligned = t.data_ptr() % 16 == 0 and ((s[-1] == 1 and s[-2] % align == 0 and s[-2] >= t.shape[-1]) or
                                          (s[-2] == 1 and s[-1] % align == 0 and s[-1] >= t.shape[-2]))
    return t if aligned else t.contiguous()


def _row_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of every row in expert order (int64 [rows]), on the device: no sync."""
    return torch.searchsorted(offsets[1:], torch.arange(rows, dtype=offsets.dtype, device=offsets.device),
                              right=True)


def _grouped_linear(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """a[M, K] (expert order) @ weight[e]ᵀ (+ bias[e]) -> [M, N] in a.dtype: fp32 accumulation, the bias added in
    fp32 (after one rounding to dtype where that is not fp32: bf16 on CUDA)."""
    y = torch._grouped_mm(_grouped_operand(a, dtype), _grouped_operand(weight.transpose(1, 2), dtype),
                          offs=offsets[1:])
    if bias is not None:
        y = y.float() + bias.float()[_row_experts(offsets, a.shape[0])]
    return y.to(a.dtype)


def _grouped_input_grad(dy: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """dy[M, N] (expert order) @ weight[e] -> [M, K] in out_dtype, each row rounded once."""
    return torch._grouped_mm(_grouped_operand(dy, dtype), _grouped_operand(weight, dtype),
                             offs=offsets[1:]).to(out_dtype)


def _grouped_weight_grad_(d_weight: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor,
                          dtype: torch.dtype) -> None:
    """d_weight[e] (fp32 [E, N, K]) += dy[rows of e]ᵀ @ a[rows of e], rows in expert order. The N axis is cut so
    that no product [E, n, K] exceeds GROUPED_DW_CHUNK_ELEMENTS (it is as big as the weight otherwise). In bf16
    (CUDA) each product is rounded to bf16 once before it is added."""
    E, N, K = d_weight.shape
    align = 16 // torch.empty((), dtype=dtype).element_size()
    step = max(align, GROUPED_DW_CHUNK_ELEMENTS // max(E * K, 1) // align * align)
    a = _grouped_operand(a, dtype)
    for n0 in range(0, N, step):
        dy_t = _grouped_operand(dy[:, n0:n0 + step].to(dtype).t(), dtype)            # [n, M]
        d_weight[:, n0:n0 + step] += torch._grouped_mm(dy_t, a, offs=offsets[1:])


def _expert_sums_(d_bias: torch.Tensor | None, dy: torch.Tensor, offsets: torch.Tensor) -> None:
    """d_bias[e] (fp32 [E, N]) += Σ dy[rows of e] (rows in expert order) in fp32; None: frozen."""
    if d_bias is not None:
        d_bias.index_add_(0, _row_experts(offsets, dy.shape[0]), dy.float())


def moe_gate_up_forward(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int,
                        weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as reference.moe_gate_up_forward: x[T, H], weight[E, N, H] -> gate_up[T·k, N], expert order."""
    dtype = _grouped_plan(x, weight)
    if dtype is None:
        return reference.moe_gate_up_forward(x, order, offsets, top_k, weight, bias)
    return _grouped_linear(x[order.long() // top_k], weight, offsets, bias, dtype)


def moe_gate_up_backward(d_gate_up: torch.Tensor, x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                         top_k: int, weight: torch.Tensor, d_weight: torch.Tensor,
                         d_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as reference.moe_gate_up_backward: -> dx[T, H] (each slot rounded to x.dtype, a token's k
    slots summed in fp32); d_weight, d_bias fp32 accumulated in place (None: frozen)."""
    dtype = _grouped_plan(x, weight)
    if dtype is None:
        return reference.moe_gate_up_backward(d_gate_up, x, order, offsets, top_k, weight, d_weight, d_bias)
    T, H = x.shape
    order = order.long()
    if d_weight is not None:
        _grouped_weight_grad_(d_weight, d_gate_up, x[order // top_k], offsets, dtype)
    _expert_sums_(d_bias, d_gate_up, offsets)
    dx_slots = torch.empty((T * top_k, H), dtype=x.dtype, device=x.device)
    dx_slots[order] = _grouped_input_grad(d_gate_up, weight, offsets, dtype, x.dtype)
    return dx_slots.float().view(T, top_k, H).sum(1).to(x.dtype)


def moe_down_forward(h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as reference.moe_down_forward: h[T·k, I] (expert order) -> o[T·k, H] in slot order."""
    dtype = _grouped_plan(h, weight)
    if dtype is None:
        return reference.moe_down_forward(h, order, offsets, weight, bias)
    out = torch.empty((h.shape[0], weight.shape[1]), dtype=h.dtype, device=h.device)
    out[order.long()] = _grouped_linear(h, weight, offsets, bias, dtype)
    return out


def moe_down_backward(d_o: torch.Tensor, h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                      weight: torch.Tensor, d_weight: torch.Tensor, d_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as reference.moe_down_backward: d_o[T·k, H] (slot order) -> dh[T·k, I] (expert order);
    d_weight, d_bias fp32 accumulated in place (None: frozen)."""
    dtype = _grouped_plan(h, weight)
    if dtype is None:
        return reference.moe_down_backward(d_o, h, order, offsets, weight, d_weight, d_bias)
    rows = d_o[order.long()]                                                  # [T·k, H] in expert order
    if d_weight is not None:
        _grouped_weight_grad_(d_weight, rows, h, offsets, dtype)
    _expert_sums_(d_bias, rows, offsets)
    return _grouped_input_grad(rows, weight, offsets, dtype, h.dtype)
