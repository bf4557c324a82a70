"""Torch reference implementations of every op the layer template uses, forward and hand-written backward.

This file is the contract between the engine and the kernels:
- the engine's CPU path (``HORIZON_KERNELS=torch``) runs these functions;
- each Triton launch function in ``kernels/<family>.py`` has exactly the same signature and semantics;
- the tests check every ``*_backward`` here against torch.autograd on the matching forward, and every Triton
  kernel against these functions.

Conventions shared by all ops
- Activations are token-major: ``T`` tokens (batch × sequence flattened) on the first axis.
- Activations keep their dtype (bf16 or fp32); internal arithmetic is fp32 (``upcast``), as the kernels do.
- Weight gradients are *accumulated in place* into caller-owned fp32 buffers (``d_weight += ...``): that is how
  the engine sums gradients over micro-batches without extra copies. Activation gradients are returned.
- No torch.autograd: these are plain tensor programs, safe under ``torch.no_grad()``.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------
# RMSNorm:  y = x * rstd * g,   rstd = 1 / sqrt(mean(x²) + eps)
# backward: with xhat = x * rstd and dxhat = dy * g,
#   dx = rstd * (dxhat - xhat * mean(dxhat * xhat)),   dg = Σ_tokens dy * xhat
# ----------------------------------------------------------------------------------------------------------
def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x[..., H], weight[H] -> (y[..., H] in x.dtype, rstd[...] fp32)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    # Round the normalized value to the activation dtype before the gain, as transformers does.
    y = (xf * rstd.unsqueeze(-1)).to(x.dtype) * weight.to(x.dtype)
    return y, rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     d_weight: torch.Tensor) -> torch.Tensor:
    """Returns dx (x.dtype); accumulates dg into d_weight (fp32[H])."""
    xhat = x.float() * rstd.unsqueeze(-1)
    dyf = dy.float()
    d_weight += (dyf * xhat).reshape(-1, x.shape[-1]).sum(0)
    dxhat = dyf * weight.float()
    dx = rstd.unsqueeze(-1) * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Weight-gradient GEMM:  acc += a @ b  with a fp32 accumulator and bf16 (or fp32) operands
# ----------------------------------------------------------------------------------------------------------
CPU_CHUNK_ELEMENTS = 1 << 22   # per fp32 operand chunk on CPU: 16 MB, never an activation-sized fp32 copy
MIXED_DTYPE_ADDMM = torch.__version__ >= (2, 10)   # CUDA addmm accepts an fp32 self with bf16/fp16 operands


def matmul_accumulate_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc[M, N] (fp32) += a[M, K] @ b[K, N], in place. Returns acc.

    - operands in acc's dtype: one addmm (BLAS with beta = 1);
    - bf16/fp16 operands off the CPU: cuBLAS reads them as they are and accumulates in fp32 straight into acc
      (``addmm(..., out_dtype=float32)``, CUDA, torch ≥ 2.10: earlier releases reject an fp32 ``self`` with
      bf16 operands);
    - otherwise (CPU: no mixed-dtype GEMM there; CUDA before torch 2.10) the reduction axis K is cut into chunks converted to fp32 one
      at a time, so no fp32 copy of a whole activation exists. The products of bf16 values are exact in fp32,
      so every path computes bf16 operands with fp32 accumulation."""
    if a.dtype == b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if acc.device.type != "cpu" and MIXED_DTYPE_ADDMM and a.dtype == b.dtype and a.dtype in (torch.bfloat16,
                                                                                            torch.float16):
        return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    step = max(1, CPU_CHUNK_ELEMENTS // max(a.shape[0], b.shape[1], 1))
    for k0 in range(0, a.shape[1], step):
        acc.addmm_(a[:, k0:k0 + step].to(acc.dtype), b[k0:k0 + step].to(acc.dtype))
    return acc


# ----------------------------------------------------------------------------------------------------------
# Linear:  y = x @ Wᵀ (+ b);  dx = dy @ W,  dW += dyᵀ @ x,  db += Σ dy
# ----------------------------------------------------------------------------------------------------------
def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[T, K], weight[N, K], bias[N] -> y[T, N]."""
    y = x @ weight.t()
    if bias is not None:
        y += bias
    return y


def linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, d_weight: torch.Tensor,
                    d_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Returns dx[T, K]; accumulates dW (fp32[N, K]) and db (fp32[N]) in place."""
    matmul_accumulate_(d_weight, dy.t(), x)
    if d_bias is not None:
        d_bias += dy.sum(0, dtype=torch.float32)
    return dy @ weight


# ----------------------------------------------------------------------------------------------------------
# LoRA adapter on a frozen projection (peft's Linear): y = x Wᵀ + s · (x Aᵀ) Bᵀ,  A[r, K], B[N, r], s = alpha / r
#   with xa = s · x Aᵀ [T, r] and e = s · dy B [T, r]:
#   dB += dyᵀ xa,   dA += eᵀ x,   dx = dy W + e A     (W's gradient is never formed)
# ----------------------------------------------------------------------------------------------------------
def lora_forward(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float):
    """x[T, K], lora_a[r, K], lora_b[N, r] -> (delta[T, N] = s·(x Aᵀ) Bᵀ, xa[T, r] = s·x Aᵀ, kept for the
    backward), both in x.dtype."""
    xa = (x @ lora_a.t()) * scale
    return xa @ lora_b.t(), xa


def lora_backward(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  scale: float, d_a: torch.Tensor, d_b: torch.Tensor) -> torch.Tensor:
    """dy[T, N] (any strides) -> the adapter's share of dx[T, K]; accumulates d_a (fp32[r, K]) and d_b
    (fp32[N, r]) in place, as the weight-gradient GEMMs do (fp32 accumulation of x.dtype operands). xa None:
    recomputed from x (the recompute skips the forward of the layer's last projection)."""
    if xa is None:
        xa = (x @ lora_a.t()) * scale
    matmul_accumulate_(d_b, dy.t(), xa)
    e = (dy @ lora_b) * scale                                            # [T, r]
    matmul_accumulate_(d_a, e.t(), x)
    return e @ lora_a


# ----------------------------------------------------------------------------------------------------------
# Fused RMSNorm + matmul:  y = rmsnorm(x; g) @ Wᵀ   (the normalized x is never stored)
# ----------------------------------------------------------------------------------------------------------
def rmsnorm_matmul_forward(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float):
    """x[T, H], norm_weight[H], weight[N, H] -> (y[T, N] in x.dtype, rstd[T] fp32)."""
    xn, rstd = rmsnorm_forward(x, norm_weight, eps)
    return xn @ weight.t(), rstd


def rmsnorm_matmul_backward(dy: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                            rstd: torch.Tensor, d_weight: torch.Tensor, d_norm_weight: torch.Tensor) -> torch.Tensor:
    """dy[T, N] -> dx[T, H]; accumulates dW (fp32[N, H]) and dg (fp32[H]) in place.

    The normalized input is recomputed from x and rstd rather than stored."""
    xn = ((x.float() * rstd.unsqueeze(-1)).to(x.dtype) * norm_weight.to(x.dtype))
    dxn = linear_backward(dy, xn, weight, d_weight)
    return rmsnorm_backward(dxn, x, norm_weight, rstd, d_norm_weight)


# ----------------------------------------------------------------------------------------------------------
# RoPE (rotate-half convention used by transformers for Llama, Mistral, Qwen2 and Qwen3):
#   y = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x2, x1)
# backward is the inverse rotation: dx = dy * cos - rotate_half(dy) * sin
# cos/sin are [T, D] with both halves equal (transformers' cat(freqs, freqs)), fp32.
# ----------------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_forward_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on x[T, nH, D]; cos, sin [T, D] fp32. Returns x."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    x.copy_(xf * c + _rotate_half(xf) * s)
    return x


def rope_backward_(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on dy[T, nH, D]: turns d(rotated) into d(unrotated). Returns dy."""
    return rope_forward_(dy, cos, -sin)


# ----------------------------------------------------------------------------------------------------------
# SwiGLU on the fused gate/up projection: gate_up[T, 2I] = [gate | up],  h = silu(gate) * up
#   d_gate = dh * up * σ(g) * (1 + g * (1 - σ(g))),   d_up = dh * silu(g)
# ----------------------------------------------------------------------------------------------------------
def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up[T, 2I] -> h[T, I] (same dtype)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


def swiglu_backward(dh: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """dh[T, I] -> d_gate_up[T, 2I] (gate_up.dtype)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    dhf = dh.float()
    d_gate = dhf * up * sig * (1 + gate * (1 - sig))
    d_up = dhf * gate * sig
    return torch.cat((d_gate, d_up), dim=-1).to(gate_up.dtype)


# ----------------------------------------------------------------------------------------------------------
# Causal grouped-query attention with document masking and an optional sliding window.
#   q[B, S, Hq, D], k/v[B, S, Hkv, D] (Hq a multiple of Hkv: query head h reads kv head h // (Hq // Hkv))
#   doc_ids[B, S] int32 or None: token i may attend to token j iff j <= i, doc_ids[i] == doc_ids[j] and,
#   with a window W, i - j < W (Mistral's sliding_window semantics).
#   o = softmax(scale · q kᵀ + mask) v;   lse[B, Hq, S] = logsumexp of the masked, scaled scores (fp32).
# backward (flash style, from lse): P = exp(scale·qkᵀ - lse); dV = Pᵀ dO; dP = dO Vᵀ;
#   Δ = rowsum(dO ∘ O);  dS = P ∘ (dP - Δ);  dQ = scale · dS K;  dK = scale · dSᵀ Q   (summed over the group)
# ----------------------------------------------------------------------------------------------------------
def attention_mask(seq_len: int, doc_ids: torch.Tensor | None, sliding_window: int | None,
                   device, batch: int) -> torch.Tensor:
    """bool[B, S, S]: True where query i may attend to key j."""
    i = torch.arange(seq_len, device=device)
    allowed = (i[None, :] <= i[:, None])
    if sliding_window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < sliding_window)
    allowed = allowed.expand(batch, seq_len, seq_len)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return allowed


def _scores(q, k, scale, mask):
    # [B, Hq, S, S] fp32 with disallowed entries at -inf
    group = q.shape[2] // k.shape[2]
    qf = q.float().permute(0, 2, 1, 3)
    kf = k.float().repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    s = (qf @ kf.transpose(-1, -2)) * scale
    return s.masked_fill(~mask[:, None], float("-inf"))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                      scale: float, sliding_window: int | None = None):
    """-> (o[B, S, Hq, D] in q.dtype, lse[B, Hq, S] fp32)."""
    B, S, Hq, _ = q.shape
    group = Hq // k.shape[2]
    mask = attention_mask(S, doc_ids, sliding_window, q.device, B)
    s = _scores(q, k, scale, mask)
    lse = torch.logsumexp(s, dim=-1)                                     # [B, Hq, S]
    p = torch.exp(s - lse[..., None])
    vf = v.float().repeat_interleave(group, dim=2).permute(0, 2, 1, 3)   # [B, Hq, S, D]
    o = (p @ vf).permute(0, 2, 1, 3)
    return o.to(q.dtype).contiguous(), lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, doc_ids: torch.Tensor | None, scale: float,
                       sliding_window: int | None = None):
    """-> (dq[B, S, Hq, D], dk[B, S, Hkv, D], dv[B, S, Hkv, D]) in the input dtype."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    mask = attention_mask(S, doc_ids, sliding_window, q.device, B)
    p = torch.exp(_scores(q, k, scale, mask) - lse[..., None])           # [B, Hq, S, S]
    dof = do.float().permute(0, 2, 1, 3)                                 # [B, Hq, S, D]
    vf = v.float().repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    delta = (dof * o.float().permute(0, 2, 1, 3)).sum(-1, keepdim=True)  # [B, Hq, S, 1]
    ds = p * (dof @ vf.transpose(-1, -2) - delta)
    qf = q.float().permute(0, 2, 1, 3)
    kf = k.float().repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale                             # [B, Hq, S, D]
    dv = p.transpose(-1, -2) @ dof
    # sum the query heads of each group back onto their kv head
    dk = dk.reshape(B, Hkv, group, S, D).sum(2)
    dv = dv.reshape(B, Hkv, group, S, D).sum(2)
    to = lambda t: t.permute(0, 2, 1, 3).to(q.dtype).contiguous()
    return to(dq), to(dk), to(dv)


# ----------------------------------------------------------------------------------------------------------
# Fused linear cross-entropy over token chunks: logits[T, V] = h @ Wᵀ never exist whole.
#   loss_sum = Σ_{t: target_t ≠ -100} (logsumexp(logits_t) - logits_t[target_t])
#   with g = grad_scale · (softmax(logits_t) - onehot(target_t)) on counted tokens, 0 elsewhere:
#   dh = g @ W,   dW += gᵀ @ h
# The engine passes grad_scale = 1 / (non-ignored tokens in the optimizer step), so gradients are those of the
# step's mean loss.
# ----------------------------------------------------------------------------------------------------------
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, d_weight: torch.Tensor | None,
                         grad_scale: float, chunk_size: int = 4096):
    """h[T, H], weight[V, H], targets[T] int64 (-100 = ignored), d_weight fp32[V, H] accumulated in place (None:
    a frozen lm_head, no dW GEMM).

    -> (loss_sum: fp32 scalar tensor, dh[T, H] in h.dtype)."""
    T = h.shape[0]
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h)
    for start in range(0, T, chunk_size):
        hc = h[start:start + chunk_size]
        tc = targets[start:start + chunk_size]
        logits = (hc @ weight.t()).float()                               # [chunk, V]
        valid = tc != IGNORE_INDEX
        safe_t = torch.where(valid, tc, 0)
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, safe_t[:, None]).squeeze(1)
        loss_sum += torch.where(valid, lse - picked, 0.0).sum()
        g = torch.softmax(logits, dim=-1)                                # [chunk, V], reuses the logits memory
        g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
        g *= (valid.float() * grad_scale)[:, None]
        dh[start:start + chunk_size] = (g @ weight.float()).to(h.dtype)
        if d_weight is not None:
            matmul_accumulate_(d_weight, g.t(), hc)
    return loss_sum, dh


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy over vocabulary chunks: the head streamed through a staging slot V_c rows at a time. The
# softmax spans every chunk, so there are two passes; with W_c = W[start:start + V_c], logits_c = h @ W_cᵀ:
#   pass 1, each chunk:  (row_max, row_sum) ← online-logsumexp merge of logits_c (Σ exp(logits − row_max) so far)
#                        target_logit ← logits_c[y − start] where the target falls in the chunk
#   between:             lse = row_max + log(row_sum);  loss_sum = Σ_{y ≠ -100} lse − target_logit
#   pass 2, each chunk:  g_c = grad_scale · (exp(logits_c − lse) − onehot(y − start)), 0 on ignored tokens;
#                        dh += g_c @ W_c  (fp32 accumulator [T, H]),   dW_c += g_cᵀ @ h
# grad_scale is one number (the mean loss: 1 / counted tokens) or an fp32 [T] tensor of per-token weights s_t (a
# sequence-level objective such as DPO: s_t = −∂L/∂(log p_t), so g_c is the gradient of L = Σ_t s_t·ce_t).
# Same rounding as linear_cross_entropy: logits rounded to h.dtype, softmax and gradients in fp32. Logits exist
# [token_chunk, V_c] at a time.
# ----------------------------------------------------------------------------------------------------------
def cross_entropy_chunk_stats_(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, start: int,
                               row_max: torch.Tensor, row_sum: torch.Tensor, target_logit: torch.Tensor,
                               token_chunk: int = 4096) -> None:
    """Pass 1 for one chunk. h[T, H], weight[V_c, H] (lm_head rows [start, start + V_c)), targets[T]; updates
    row_max[T] (start at -inf), row_sum[T] (start at 0) and target_logit[T] in place (all fp32)."""
    V_c = weight.shape[0]
    for s in range(0, h.shape[0], token_chunk):
        e = s + token_chunk
        logits = (h[s:e] @ weight.t()).float()                               # [n, V_c]
        m_new = torch.maximum(row_max[s:e], logits.max(-1).values)
        row_sum[s:e] = row_sum[s:e] * torch.exp(row_max[s:e] - m_new) + torch.exp(logits - m_new[:, None]).sum(-1)
        row_max[s:e] = m_new
        local = targets[s:e] - start
        inside = (local >= 0) & (local < V_c)
        picked = logits.gather(1, local.clamp(0, V_c - 1)[:, None]).squeeze(1)
        target_logit[s:e] = torch.where(inside, picked, target_logit[s:e])


def cross_entropy_chunk_loss(row_max: torch.Tensor, row_sum: torch.Tensor, target_logit: torch.Tensor,
                             targets: torch.Tensor):
    """After pass 1: -> (loss_sum fp32 scalar, lse[T] fp32)."""
    lse = row_max + torch.log(row_sum)
    return torch.where(targets != IGNORE_INDEX, lse - target_logit, 0.0).sum(), lse


def token_scales(grad_scale, s: int, e: int):
    """The scale of tokens [s, e): grad_scale itself when it is one number, else its slice."""
    return grad_scale[s:e] if isinstance(grad_scale, torch.Tensor) else grad_scale


def cross_entropy_chunk_grad(hc: torch.Tensor, weight: torch.Tensor, tc: torch.Tensor, start: int,
                             lse: torch.Tensor, grad_scale) -> torch.Tensor:
    """Pass 2's g_c (fp32 [n, V_c]) for the tokens hc[n, H] with targets tc[n] and their lse[n]; grad_scale a
    number or fp32 [n] per-token weights."""
    V_c = weight.shape[0]
    g = torch.exp((hc @ weight.t()).float() - lse[:, None])                  # [n, V_c] softmax of the chunk
    local = tc - start
    inside = (local >= 0) & (local < V_c)
    g.scatter_add_(1, local.clamp(0, V_c - 1)[:, None], -inside.float()[:, None])
    g *= ((tc != IGNORE_INDEX).float() * grad_scale)[:, None]
    return g


def cross_entropy_chunk_backward(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, start: int,
                                 lse: torch.Tensor, grad_scale, dh: torch.Tensor, d_weight: torch.Tensor | None,
                                 token_chunk: int = 4096) -> None:
    """Pass 2 for one chunk: dh (fp32[T, H]) += g_c @ W_c and d_weight (fp32[V_c, H]) += g_cᵀ @ h, in place;
    grad_scale a number or fp32 [T] per-token weights; d_weight None: a frozen lm_head."""
    for s in range(0, h.shape[0], token_chunk):
        e = s + token_chunk
        hc = h[s:e]
        g = cross_entropy_chunk_grad(hc, weight, targets[s:e], start, lse[s:e], token_scales(grad_scale, s, e))
        matmul_accumulate_(dh[s:e], g, weight)
        if d_weight is not None:
            matmul_accumulate_(d_weight, g.t(), hc)


# ----------------------------------------------------------------------------------------------------------
# Mixture of experts (dropless, as transformers): T tokens, E experts, each token routed to k of them.
# A token's k choices are its slots s = t·k + j (j < k). Routing returns weights[T, k] (fp32) and ids[T, k]
# (int32, by descending weight); moe_permute sorts the slots by expert (stable: ascending slot within an expert)
# into order[T·k] with offsets[E + 1], so expert e owns the sorted rows offsets[e] : offsets[e + 1] (possibly none).
#   gate_up (expert order)  r:  gate_up[r] = x[order[r] // k] @ W_gu[e]ᵀ (+ b_gu[e])      W_gu[E, N, H]
#   h = act(gate_up)            (swiglu_forward: [gate | up] halves; clamped_swiglu_forward: gpt-oss's)
#   o (slot order)          r:  o[order[r]] = h[r] @ W_d[e]ᵀ (+ b_d[e])                     W_d[E, H, I]
#   y[t] = Σ_j weights[t, j] · o[t·k + j]                                                  (moe_combine_forward)
# backward: d_o[s] = weights[t, j]·dy[t],  d_weights[t, j] = <dy[t], o[s]>,  then through each grouped GEMM as
# linear_backward per expert (dW, db accumulated in fp32 in place), dx[t] = Σ_j dx_slot[t·k + j] (fp32 sum).
# Weights may be any strided view [E, N, K] (gpt-oss stores [E, K, N]: pass .transpose(1, 2)).
# ----------------------------------------------------------------------------------------------------------
def _top_k(values: torch.Tensor, k: int):
    """(values, ids) of the k largest of each row, the lowest index first among equal values (as the kernels do;
    torch.topk leaves the order of ties unspecified)."""
    values, ids = torch.sort(values, dim=-1, descending=True, stable=True)
    return values[:, :k], ids[:, :k]


def moe_softmax_topk_forward(logits: torch.Tensor, top_k: int, renormalize: bool):
    """Mixtral, Qwen3-MoE (renormalize = norm_topk_prob), gpt-oss (softmax over the top-k logits = renormalized).
    logits[T, E] -> (weights[T, k] fp32, ids[T, k] int32): p = softmax(logits) in fp32, its k largest, divided
    by their sum when renormalize."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = _top_k(probs, top_k)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_softmax_topk_backward(d_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                              renormalize: bool) -> torch.Tensor:
    """d_weights[T, k] fp32 -> d_logits[T, E] (logits.dtype). With p = softmax(logits), p_j = p[ids[j]]:
    not renormalized: dl_e = p_e·(d_e − Σ_j d_j p_j), d_e = d_weights[j] where ids[j] = e (else 0);
    renormalized (w = softmax of the selected logits): dl_ids[j] = w_j·(d_j − Σ_m d_m w_m), 0 elsewhere."""
    probs = torch.softmax(logits.float(), dim=-1)
    idx = ids.long()
    picked = probs.gather(1, idx)
    if renormalize:
        w = picked / picked.sum(-1, keepdim=True)
        d_sel = w * (d_weights - (d_weights * w).sum(-1, keepdim=True))
        return torch.zeros_like(probs).scatter_(1, idx, d_sel).to(logits.dtype)
    d_logits = -probs * (d_weights * picked).sum(-1, keepdim=True)
    return d_logits.scatter_add_(1, idx, d_weights * picked).to(logits.dtype)


def moe_sigmoid_topk_forward(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
                             topk_group: int, renormalize: bool, scaling: float):
    """DeepSeek-V3, GLM-4.5 (transformers' DeepseekV3TopkRouter). logits[T, E], bias[E] (e_score_correction_bias)
    -> (weights[T, k] fp32, ids[T, k] int32). s = σ(logits) in fp32; experts are chosen on c = s + bias: the
    topk_group groups (of E / n_group experts) with the largest sum of their two best c, then the k largest c
    inside them; weights = s of the chosen (not c), / (Σ + 1e-20) when renormalize, × scaling."""
    T, E = logits.shape
    scores = torch.sigmoid(logits.float())
    choice = scores + bias.float()
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)       # [T, n_group]
    group_idx = _top_k(group_scores, topk_group)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = _top_k(choice, top_k)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids.to(torch.int32)


def moe_sigmoid_topk_backward(d_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                              renormalize: bool, scaling: float) -> torch.Tensor:
    """d_weights[T, k] fp32 -> d_logits[T, E] (logits.dtype); the choice (and its bias) is piecewise constant.
    With s_j = σ(logits[ids[j]]), D = Σ_j s_j + 1e-20: ds_j = c·(d_j / D − Σ_m d_m s_m / D²) (renormalized) or
    c·d_j, and dl_ids[j] = ds_j · s_j (1 − s_j), 0 elsewhere."""
    idx = ids.long()
    picked = torch.sigmoid(logits.float()).gather(1, idx)
    if renormalize:
        denom = picked.sum(-1, keepdim=True) + 1e-20
        d_picked = scaling * (d_weights / denom - (d_weights * picked).sum(-1, keepdim=True) / denom ** 2)
    else:
        d_picked = scaling * d_weights
    d_logits = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return d_logits.scatter_(1, idx, d_picked * picked * (1 - picked)).to(logits.dtype)


def moe_permute(ids: torch.Tensor, num_experts: int):
    """ids[T, k] -> (order[T·k] int32: the slots t·k + j sorted by expert, ascending slot within an expert;
    offsets[E + 1] int32: expert e owns the sorted rows offsets[e] : offsets[e + 1])."""
    if ids.is_meta:                  # shapes only, as aten's meta functions (the dry run, its footprints)
        return (torch.empty(ids.numel(), dtype=torch.int32, device="meta"),
                torch.empty(num_experts + 1, dtype=torch.int32, device="meta"))
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True)[1]
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = counts.cumsum(0)
    return order.to(torch.int32), offsets


def _expert_rows(offsets: torch.Tensor):
    """(e, start, end) of every expert with rows; sync: the row ranges are host values (reference only). On the
    meta device none: the ops then allocate their outputs and workspaces and compute nothing, as aten's meta
    functions do (the dry run and its footprints run them so)."""
    if offsets.is_meta:
        return []
    bounds = offsets.tolist()
    return [(e, a, b) for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]


def _expert_linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a @ weightᵀ (+ bias) accumulated in fp32, rounded once to a.dtype (as the grouped GEMM's epilogue)."""
    y = (a @ weight.t()).float() if a.dtype == torch.float32 else (a.float() @ weight.float().t())
    return (y if bias is None else y + bias.float()).to(a.dtype)


def moe_gate_up_forward(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int,
                        weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[T, H], weight[E, N, H], bias[E, N] -> gate_up[T·k, N] in expert order (x.dtype)."""
    rows = x[order.long() // top_k]                                           # [T·k, H] gathered
    out = torch.zeros((rows.shape[0], weight.shape[1]), dtype=x.dtype, device=x.device)
    for e, a, b in _expert_rows(offsets):
        out[a:b] = _expert_linear(rows[a:b], weight[e], None if bias is None else bias[e])
    return out


def moe_gate_up_backward(d_gate_up: torch.Tensor, x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                         top_k: int, weight: torch.Tensor, d_weight: torch.Tensor,
                         d_bias: torch.Tensor | None = None) -> torch.Tensor:
    """d_gate_up[T·k, N] (expert order) -> dx[T, H] (x.dtype: each slot's d_gate_up @ W_gu[e] rounded to x.dtype,
    a token's k slots summed in fp32);
    accumulates d_weight (fp32 [E, N, H]) and d_bias (fp32 [E, N]) in place (None: frozen, not computed)."""
    T, H = x.shape
    order = order.long()
    rows = x[order // top_k]
    dx_slots = torch.zeros((T * top_k, H), dtype=x.dtype, device=x.device)   # each slot rounded once
    for e, a, b in _expert_rows(offsets):
        if d_weight is not None:
            matmul_accumulate_(d_weight[e], d_gate_up[a:b].t(), rows[a:b])
        if d_bias is not None:
            d_bias[e] += d_gate_up[a:b].sum(0, dtype=torch.float32)
        dx_slots[order[a:b]] = (d_gate_up[a:b].float() @ weight[e].float()).to(x.dtype)
    return dx_slots.float().view(T, top_k, H).sum(1).to(x.dtype)


def moe_down_forward(h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """h[T·k, I] (expert order), weight[E, H, I], bias[E, H] -> o[T·k, H] in slot order (h.dtype)."""
    out = torch.zeros((h.shape[0], weight.shape[1]), dtype=h.dtype, device=h.device)
    order = order.long()
    for e, a, b in _expert_rows(offsets):
        out[order[a:b]] = _expert_linear(h[a:b], weight[e], None if bias is None else bias[e])
    return out


def moe_down_backward(d_o: torch.Tensor, h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                      weight: torch.Tensor, d_weight: torch.Tensor, d_bias: torch.Tensor | None = None) -> torch.Tensor:
    """d_o[T·k, H] (slot order) -> dh[T·k, I] (expert order, h.dtype); accumulates d_weight (fp32 [E, H, I]) and
    d_bias (fp32 [E, H]) in place (None: frozen, not computed)."""
    rows = d_o[order.long()]                                                  # [T·k, H] in expert order
    dh = torch.zeros_like(h)
    for e, a, b in _expert_rows(offsets):
        if d_weight is not None:
            matmul_accumulate_(d_weight[e], rows[a:b].t(), h[a:b])
        if d_bias is not None:
            d_bias[e] += rows[a:b].sum(0, dtype=torch.float32)
        dh[a:b] = (rows[a:b].float() @ weight[e].float()).to(h.dtype)
    return dh


def moe_combine_forward(o: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """o[T·k, H] (slot order), weights[T, k] fp32 -> y[T, H] = Σ_j weights[t, j]·o[t·k + j] (fp32 sum, o.dtype)."""
    T, k = weights.shape
    return (o.float().view(T, k, -1) * weights.float()[..., None]).sum(1).to(o.dtype)


def moe_combine_backward(dy: torch.Tensor, o: torch.Tensor, weights: torch.Tensor):
    """dy[T, H] -> (d_o[T·k, H] = weights[t, j]·dy[t] in o.dtype, d_weights[T, k] fp32 = <dy[t], o[t·k + j]>)."""
    T, k = weights.shape
    dyf = dy.float()[:, None, :]                                              # [T, 1, H]
    d_o = (dyf * weights.float()[..., None]).reshape(T * k, -1).to(o.dtype)
    d_weights = (dyf * o.float().view(T, k, -1)).sum(-1)
    return d_o, d_weights


# ----------------------------------------------------------------------------------------------------------
# gpt-oss's clamped SwiGLU on its interleaved gate/up (gate = gate_up[:, 0::2], up = gate_up[:, 1::2]):
#   g = min(gate, limit),  u = clamp(up, −limit, limit),  h = (u + 1) · g · σ(α g)
#   d_gate = dh · (u + 1) · σ(αg) · (1 + α g (1 − σ(αg))) where gate ≤ limit, else 0
#   d_up   = dh · g · σ(αg)                                 where −limit ≤ up ≤ limit, else 0  (torch's clamp)
# ----------------------------------------------------------------------------------------------------------
def clamped_swiglu_forward(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gate_up[M, 2I] interleaved -> h[M, I] (same dtype)."""
    gu = gate_up.float()
    g, u = gu[:, 0::2].clamp(max=limit), gu[:, 1::2].clamp(-limit, limit)
    return ((u + 1) * g * torch.sigmoid(alpha * g)).to(gate_up.dtype)


def clamped_swiglu_backward(dh: torch.Tensor, gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """dh[M, I] -> d_gate_up[M, 2I] interleaved (gate_up.dtype)."""
    gu = gate_up.float()
    gate, up = gu[:, 0::2], gu[:, 1::2]
    g, u = gate.clamp(max=limit), up.clamp(-limit, limit)
    sig = torch.sigmoid(alpha * g)
    dhf = dh.float()
    d_gate = torch.where(gate <= limit, dhf * (u + 1) * sig * (1 + alpha * g * (1 - sig)), 0.0)
    d_up = torch.where((up >= -limit) & (up <= limit), dhf * g * sig, 0.0)
    return torch.stack((d_gate, d_up), dim=-1).reshape(gate_up.shape).to(gate_up.dtype)
