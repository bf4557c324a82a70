"""Mixture-of-experts routing in Triton: router logits -> top-k experts and weights per token, their backward,
and the permutation of the token slots by expert.

Softmax top-k (Mixtral, Qwen3-MoE, gpt-oss), one program per ROWS tokens, the E logits of a row in registers:
    p = softmax(l) (fp32);  k times: the largest remaining p (lowest index on ties), its id and value;
    w_j = p_j, or p_j / Σ_m p_m when renormalized (gpt-oss's softmax over its top-k logits is this)
  backward, d_j = ∂L/∂w_j, d_e = d_j at e = ids_j (else 0):
    plain:         dl_e = p_e · (d_e − Σ_j d_j p_j)
    renormalized:  dl_e = w_e · (d_e − Σ_j d_j w_j) at the chosen e, 0 elsewhere
Sigmoid grouped top-k (DeepSeek-V3, GLM-4.5; transformers' DeepseekV3TopkRouter):
    s = σ(l),  c = s + bias;  group score = sum of the two largest c of each of the n_group groups;
    the topk_group best groups stay, the others' c become −inf;  k times the largest c (id);
    w_j = scaling · s_j (/ (Σ_m s_m + 1e-20) when renormalized)
  backward (the choice is piecewise constant, the bias gets no gradient), D = Σ_m s_m + 1e-20:
    ds_j = scaling · (d_j / D − Σ_m d_m s_m / D²)  (renormalized) or scaling · d_j
    dl_ids_j = ds_j · s_j (1 − s_j)
Permutation (a stable counting sort, no padding): slots s = t·k + j, blocks of BLOCK_S slots;
    1. per block b, histogram count[b, e];   2. (torch, [E·blocks] ints) start[e, b] = Σ_{e' < e} total_e'
    + Σ_{b' < b} count[b', e];   3. order[start[ids_s, b] + (earlier slots of the block with the same expert)] = s
  -> order[T·k] int32 (slots by expert, ascending slot within an expert) and offsets[E + 1] int32.

Supported range: logits[T, E] in fp32, bf16 or fp16 with a contiguous last axis, any T ≥ 1; E ≤ 1024 (a row's
logits live in registers); 1 ≤ k ≤ E; grouped routing with E divisible by n_group, ≥ 2 experts a group,
n_group ≤ 64 and k ≤ topk_group · E / n_group. T·k < 2³¹ slots. moe_permute takes ids in [0, E) (what the
routing returns) without checking them (a check would cost a host sync); an id outside is dropped, never
written out of bounds, and leaves its slot of ``order`` unset.
Known gaps: ties between equal scores go to the lowest expert index (torch.topk's order on ties is unspecified);
the aux (load-balancing) loss is not here: it is a mean over all tokens of torch ops on the logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sweep, tuning
from .reference import moe_permute as moe_permute_ref  # noqa: F401  (tests and benchmarks use them)
from .reference import moe_sigmoid_topk_backward as moe_sigmoid_topk_backward_ref  # noqa: F401
from .reference import moe_sigmoid_topk_forward as moe_sigmoid_topk_forward_ref  # noqa: F401
from .reference import moe_softmax_topk_backward as moe_softmax_topk_backward_ref  # noqa: F401
from .reference import moe_softmax_topk_forward as moe_softmax_topk_forward_ref  # noqa: F401

MAX_EXPERTS = 1024
MAX_GROUPS = 64


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _argmax_rows(v, cols, BLOCK_E: tl.constexpr):
    """(max, its lowest column) of each row of v[ROWS, BLOCK_E]."""
    best = tl.max(v, axis=1)
    idx = tl.min(tl.where(v == best[:, None], cols[None, :], BLOCK_E), axis=1)
    return best, idx


@triton.jit
def _softmax_topk_fwd_kernel(
    # pointers
    logits_ptr, weights_ptr, ids_ptr,
    # shapes
    T, E,
    # strides
    stride_l_t,
    # meta
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    l = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l_t + cols[None, :],
                mask=row_ok[:, None] & (cols < E)[None, :], other=float("-inf")).to(tl.float32)
    l = tl.where(row_ok[:, None], l, 0.0)                      # padding rows: a finite row, never stored
    p = tl.exp(l - tl.max(l, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]                         # [ROWS, BLOCK_E]; padding columns 0
    p = tl.where((cols < E)[None, :], p, -1.0)                 # below every probability: never chosen
    w = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best, idx = _argmax_rows(p, cols, BLOCK_E)
        w = tl.where(kcols[None, :] == j, best[:, None], w)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        p = tl.where(cols[None, :] == idx[:, None], -2.0, p)
    if RENORMALIZE:
        w = w / tl.sum(w, axis=1)[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    mask = row_ok[:, None] & (kcols < TOP_K)[None, :]
    tl.store(weights_ptr + out, w, mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


@triton.jit
def _softmax_topk_bwd_kernel(
    # pointers
    d_weights_ptr, logits_ptr, ids_ptr, d_logits_ptr,
    # shapes
    T, E,
    # strides
    stride_l_t, stride_dl_t,
    # meta
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = (cols < E)[None, :]
    rows64 = rows.to(tl.int64)
    l = tl.load(logits_ptr + rows64[:, None] * stride_l_t + cols[None, :], mask=row_ok[:, None] & col_ok,
                other=float("-inf")).to(tl.float32)
    l = tl.where(row_ok[:, None], l, 0.0)
    p = tl.exp(l - tl.max(l, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]                                         # [ROWS, BLOCK_E]
    d_dense = tl.zeros((ROWS, BLOCK_E), dtype=tl.float32)                     # d_j at e = ids_j
    chosen = tl.zeros((ROWS, BLOCK_E), dtype=tl.int1)
    picked_sum = tl.zeros((ROWS,), dtype=tl.float32)                          # Σ_j p_j
    dp_sum = tl.zeros((ROWS,), dtype=tl.float32)                              # Σ_j d_j p_j
    for j in tl.static_range(TOP_K):
        idx = tl.load(ids_ptr + rows64 * TOP_K + j, mask=row_ok, other=0)
        d = tl.load(d_weights_ptr + rows64 * TOP_K + j, mask=row_ok, other=0.0)
        hit = cols[None, :] == idx[:, None]
        p_j = tl.sum(tl.where(hit, p, 0.0), axis=1)
        d_dense = tl.where(hit, d[:, None], d_dense)
        chosen = chosen | hit
        picked_sum += p_j
        dp_sum += d * p_j
    if RENORMALIZE:
        w = p / picked_sum[:, None]                                            # w_e at the chosen e
        dl = tl.where(chosen, w * (d_dense - (dp_sum / picked_sum)[:, None]), 0.0)
    else:
        dl = p * (d_dense - dp_sum[:, None])
    tl.store(d_logits_ptr + rows64[:, None] * stride_dl_t + cols[None, :], dl.to(d_logits_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok)


@triton.jit
def _sigmoid_topk_fwd_kernel(
    # pointers
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    # shapes
    T, E,
    # strides
    stride_l_t,
    # meta
    scaling, TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORMALIZE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    gcols = tl.arange(0, BLOCK_G)
    row_ok = rows < T
    col_ok = cols < E
    l = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l_t + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    s = tl.sigmoid(l)                                                          # [ROWS, BLOCK_E]
    c = s + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    c = tl.where(col_ok[None, :], c, float("-inf"))
    group = cols // (E // N_GROUP)                                             # a column's group
    # each group's score: the sum of its two largest c
    g_score = tl.full((ROWS, BLOCK_G), float("-inf"), dtype=tl.float32)
    for g in tl.static_range(N_GROUP):
        cg = tl.where((group == g)[None, :], c, float("-inf"))
        top1, idx1 = _argmax_rows(cg, cols, BLOCK_E)
        top2 = tl.max(tl.where(cols[None, :] == idx1[:, None], float("-inf"), cg), axis=1)
        g_score = tl.where(gcols[None, :] == g, (top1 + top2)[:, None], g_score)
    # the TOPK_GROUP best groups keep their experts
    keep_group = tl.zeros((ROWS, BLOCK_G), dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        _, gi = _argmax_rows(g_score, gcols, BLOCK_G)
        hit = gcols[None, :] == gi[:, None]
        keep_group = keep_group | hit
        g_score = tl.where(hit, float("-inf"), g_score)
    keep = tl.zeros((ROWS, BLOCK_E), dtype=tl.int1)
    for g in tl.static_range(N_GROUP):
        kept = tl.sum(tl.where((gcols == g)[None, :] & keep_group, 1, 0), axis=1) > 0
        keep = keep | ((group == g)[None, :] & kept[:, None])
    c = tl.where(keep, c, float("-inf"))
    w = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        _, idx = _argmax_rows(c, cols, BLOCK_E)
        hit = cols[None, :] == idx[:, None]
        w = tl.where(kcols[None, :] == j, tl.sum(tl.where(hit, s, 0.0), axis=1)[:, None], w)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        c = tl.where(hit, float("-inf"), c)         # the kept groups hold ≥ k experts: a finite c remains
    if RENORMALIZE:
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    w = w * scaling
    out = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    mask = row_ok[:, None] & (kcols < TOP_K)[None, :]
    tl.store(weights_ptr + out, w, mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


@triton.jit
def _sigmoid_topk_bwd_kernel(
    # pointers
    d_weights_ptr, logits_ptr, ids_ptr, d_logits_ptr,
    # shapes
    T, E,
    # strides
    stride_l_t, stride_dl_t,
    # meta
    scaling, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    mask = row_ok[:, None] & (cols < E)[None, :]
    s = tl.sigmoid(tl.load(logits_ptr + rows64[:, None] * stride_l_t + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32))
    picked_sum = tl.zeros((ROWS,), dtype=tl.float32)                          # Σ_j s_j
    ds_sum = tl.zeros((ROWS,), dtype=tl.float32)                              # Σ_j d_j s_j
    d_dense = tl.zeros((ROWS, BLOCK_E), dtype=tl.float32)
    chosen = tl.zeros((ROWS, BLOCK_E), dtype=tl.int1)
    for j in tl.static_range(TOP_K):
        idx = tl.load(ids_ptr + rows64 * TOP_K + j, mask=row_ok, other=0)
        d = tl.load(d_weights_ptr + rows64 * TOP_K + j, mask=row_ok, other=0.0)
        hit = cols[None, :] == idx[:, None]
        s_j = tl.sum(tl.where(hit, s, 0.0), axis=1)
        d_dense = tl.where(hit, d[:, None], d_dense)
        chosen = chosen | hit
        picked_sum += s_j
        ds_sum += d * s_j
    if RENORMALIZE:
        denom = picked_sum + 1e-20
        ds = scaling * (d_dense / denom[:, None] - (ds_sum / (denom * denom))[:, None])
    else:
        ds = scaling * d_dense
    dl = tl.where(chosen, ds * s * (1.0 - s), 0.0)
    tl.store(d_logits_ptr + rows64[:, None] * stride_dl_t + cols[None, :], dl.to(d_logits_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _expert_histogram_kernel(
    # pointers
    ids_ptr, counts_ptr,
    # shapes
    S, E,
    # meta
    BLOCK_S: tl.constexpr, BINS: tl.constexpr,
):
    """counts[b, e] = slots of block b routed to expert e."""
    b = tl.program_id(0)
    slots = b * BLOCK_S + tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + slots, mask=slots < S, other=E)
    ids = tl.where((ids >= 0) & (ids < E), ids, E)                             # padding (and bad ids): bin E
    hist = tl.histogram(ids, BINS)
    bins = tl.arange(0, BINS)
    tl.store(counts_ptr + b.to(tl.int64) * E + bins, hist, mask=bins < E)


@triton.jit
def _expert_scatter_kernel(
    # pointers
    ids_ptr, start_ptr, order_ptr,
    # shapes
    S, n_blocks, n_experts,
    # meta
    BLOCK_S: tl.constexpr,
):
    """order[start[e, b] + rank] = s for each slot s of block b (expert e, rank = earlier slots of the block with
    the same expert)."""
    b = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_S)
    slots = b * BLOCK_S + lanes
    ids = tl.load(ids_ptr + slots, mask=slots < S, other=-1)
    ok = (slots < S) & (ids >= 0) & (ids < n_experts)                          # a bad id is never written
    same_before = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])   # [BLOCK_S, BLOCK_S]
    rank = tl.sum(same_before.to(tl.int32), axis=1)
    start = tl.load(start_ptr + ids.to(tl.int64) * n_blocks + b, mask=ok, other=0)
    tl.store(order_ptr + start + rank, slots, mask=ok)


# ----------------------------------------------------------------------------------------------------------
# Launch functions
# ----------------------------------------------------------------------------------------------------------
def _rows_config(kernel: str, E: int) -> dict:
    """Rows per program: a program holds ROWS × next_pow2(E) fp32 values several times over."""
    block_e = triton.next_power_of_2(E)
    default = {"ROWS": 4 if tuning.interpreting() else max(1, min(16, 2048 // block_e)), "num_warps": 4}
    return tuning.best_config(kernel, f"E{E}", default)


def _check_logits(logits: torch.Tensor, top_k: int, name: str) -> tuple[int, int]:
    if logits.dim() != 2 or logits.numel() == 0:
        raise ValueError(f"{name}: logits must be a non-empty [T, E], got {tuple(logits.shape)} "
                         "(flatten batch × sequence into T first)")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: logits dtype {logits.dtype} unsupported (float32, bfloat16 or float16)")
    if logits.stride(1) != 1:
        raise ValueError(f"{name}: logits' last axis must be contiguous (call .contiguous())")
    T, E = logits.shape
    if E > MAX_EXPERTS:
        raise ValueError(f"{name}: {E} experts > {MAX_EXPERTS} (a row of logits must fit in registers)")
    if not 1 <= top_k <= E:
        raise ValueError(f"{name}: top_k={top_k} must be in [1, E={E}]")
    return T, E


def _check_backward(d_weights, logits, ids, name):
    T, k = ids.shape
    if logits.dim() != 2 or logits.shape[0] != T or d_weights.shape != (T, k):
        raise ValueError(f"{name}: d_weights {tuple(d_weights.shape)}, ids {tuple(ids.shape)} and logits "
                         f"{tuple(logits.shape)} must be [T, k], [T, k], [T, E]")
    if ids.dtype != torch.int32 or d_weights.dtype != torch.float32:
        raise TypeError(f"{name}: ids must be int32 and d_weights fp32 (what the forward returned), got "
                        f"{ids.dtype} and {d_weights.dtype}")
    _check_logits(logits, k, name)
    return T, logits.shape[1], k


def moe_softmax_topk_forward(logits: torch.Tensor, top_k: int, renormalize: bool):
    """logits[T, E] -> (weights[T, k] fp32, ids[T, k] int32), ids by descending weight."""
    T, E = _check_logits(logits, top_k, "moe_softmax_topk_forward")
    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    cfg = _rows_config("moe_softmax_topk_fwd", E)
    _softmax_topk_fwd_kernel[(triton.cdiv(T, cfg["ROWS"]),)](
        logits, weights, ids, T, E, logits.stride(0),
        TOP_K=top_k, RENORMALIZE=bool(renormalize), ROWS=cfg["ROWS"], BLOCK_E=triton.next_power_of_2(E),
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=cfg["num_warps"])
    return weights, ids


def moe_softmax_topk_backward(d_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                              renormalize: bool) -> torch.Tensor:
    """d_weights[T, k] fp32 -> d_logits[T, E] (logits.dtype)."""
    T, E, k = _check_backward(d_weights, logits, ids, "moe_softmax_topk_backward")
    d_logits = torch.empty_like(logits)
    cfg = _rows_config("moe_softmax_topk_bwd", E)
    _softmax_topk_bwd_kernel[(triton.cdiv(T, cfg["ROWS"]),)](
        d_weights.contiguous(), logits, ids.contiguous(), d_logits, T, E, logits.stride(0), d_logits.stride(0),
        TOP_K=k, RENORMALIZE=bool(renormalize), ROWS=cfg["ROWS"], BLOCK_E=triton.next_power_of_2(E),
        num_warps=cfg["num_warps"])
    return d_logits


def moe_sigmoid_topk_forward(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
                             topk_group: int, renormalize: bool, scaling: float):
    """logits[T, E], bias[E] -> (weights[T, k] fp32, ids[T, k] int32), ids by descending score + bias."""
    name = "moe_sigmoid_topk_forward"
    T, E = _check_logits(logits, top_k, name)
    if bias.shape != (E,):
        raise ValueError(f"{name}: bias (e_score_correction_bias) shape {tuple(bias.shape)} != ({E},)")
    if not 1 <= n_group <= MAX_GROUPS or E % n_group or E // n_group < 2:
        raise ValueError(f"{name}: n_group={n_group} must divide E={E} into groups of ≥ 2 experts "
                         f"(n_group ≤ {MAX_GROUPS})")
    if not 1 <= topk_group <= n_group or top_k > topk_group * (E // n_group):
        raise ValueError(f"{name}: topk_group={topk_group} must be in [1, n_group={n_group}] and its groups "
                         f"must hold top_k={top_k} experts")
    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    cfg = _rows_config("moe_sigmoid_topk_fwd", E)
    _sigmoid_topk_fwd_kernel[(triton.cdiv(T, cfg["ROWS"]),)](
        logits, bias.contiguous(), weights, ids, T, E, logits.stride(0), float(scaling),
        TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, RENORMALIZE=bool(renormalize), ROWS=cfg["ROWS"],
        BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_G=triton.next_power_of_2(n_group), num_warps=cfg["num_warps"])
    return weights, ids


def moe_sigmoid_topk_backward(d_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                              renormalize: bool, scaling: float) -> torch.Tensor:
    """d_weights[T, k] fp32 -> d_logits[T, E] (logits.dtype)."""
    T, E, k = _check_backward(d_weights, logits, ids, "moe_sigmoid_topk_backward")
    d_logits = torch.empty_like(logits)
    cfg = _rows_config("moe_sigmoid_topk_bwd", E)
    _sigmoid_topk_bwd_kernel[(triton.cdiv(T, cfg["ROWS"]),)](
        d_weights.contiguous(), logits, ids.contiguous(), d_logits, T, E, logits.stride(0), d_logits.stride(0),
        float(scaling), TOP_K=k, RENORMALIZE=bool(renormalize), ROWS=cfg["ROWS"],
        BLOCK_E=triton.next_power_of_2(E), num_warps=cfg["num_warps"])
    return d_logits


PERMUTE_BLOCK = 128          # slots per program of the counting sort (its rank step compares BLOCK² pairs)


def moe_permute(ids: torch.Tensor, num_experts: int):
    """ids[T, k] int32 -> (order[T·k] int32, offsets[E + 1] int32); no host sync."""
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype != torch.int32:
        raise ValueError(f"moe_permute: ids must be a non-empty int32 [T, k] (what routing returns), got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"moe_permute: num_experts={num_experts} must be in [1, {MAX_EXPERTS}]")
    flat = ids.contiguous().view(-1)
    S, E, block = flat.numel(), num_experts, PERMUTE_BLOCK
    n_blocks = triton.cdiv(S, block)
    counts = torch.empty((n_blocks, E), dtype=torch.int32, device=ids.device)
    _expert_histogram_kernel[(n_blocks,)](flat, counts, S, E, BLOCK_S=block,
                                          BINS=triton.next_power_of_2(E + 1), num_warps=4)
    start, offsets = block_starts(counts, S)
    order = torch.empty(S, dtype=torch.int32, device=ids.device)
    _expert_scatter_kernel[(n_blocks,)](flat, start, order, S, n_blocks, E, BLOCK_S=block, num_warps=4)
    return order, offsets


def block_starts(counts: torch.Tensor, slots: int):
    """counts[blocks, E] int32 -> (start[E, blocks]: the sorted rows before block b's first slot of expert e,
    offsets[E + 1]), by torch ops on [E · blocks] ints (no sync). The dry run's model runs this too."""
    E, n_blocks = counts.shape[1], counts.shape[0]
    per_expert = counts.t().reshape(-1)                                        # e-major, then block
    start = (per_expert.cumsum(0, dtype=torch.int32) - per_expert).view(E, n_blocks)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=counts.device)
    offsets[:E] = start[:, 0]
    offsets[E] = slots
    return start, offsets


# ----------------------------------------------------------------------------------------------------------
# Autotuning (GPU; AUTOTUNE_DEVICE is swapped for "cpu" in the interpreter's dry-run test): rows per program
# of the four routing kernels; GB/s counts the logits read (and d_logits written) once.
# ----------------------------------------------------------------------------------------------------------
AUTOTUNE_DEVICE = "cuda"
DEFAULT_SHAPES = [dict(T=32768, E=128, k=4), dict(T=32768, E=128, k=8), dict(T=32768, E=256, k=8)]
CANDIDATES = [{"ROWS": r, "num_warps": w} for r in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)]


def _launches(logits, bias, d_weights, top_k):
    """name -> (run(cfg), check(cfg)) for the four routing kernels on one shape."""
    T, E = logits.shape
    n_group = 8 if E % 8 == 0 and E >= 16 else 1
    w_ref, ids_ref = moe_softmax_topk_forward_ref(logits, top_k, True)
    ws_ref, ids_s_ref = moe_sigmoid_topk_forward_ref(logits, bias, top_k, n_group, min(4, n_group), True, 2.5)
    dl_ref = moe_softmax_topk_backward_ref(d_weights, logits, ids_ref, True)
    dls_ref = moe_sigmoid_topk_backward_ref(d_weights, logits, ids_s_ref, True, 2.5)
    out = {}

    def grid(cfg):
        return (triton.cdiv(T, cfg["ROWS"]),)

    def common(cfg):
        return dict(ROWS=cfg["ROWS"], BLOCK_E=triton.next_power_of_2(E), num_warps=cfg["num_warps"])

    def softmax_fwd(cfg):
        w, ids = torch.empty_like(w_ref), torch.empty_like(ids_ref)
        _softmax_topk_fwd_kernel[grid(cfg)](logits, w, ids, T, E, logits.stride(0), TOP_K=top_k, RENORMALIZE=True,
                                            BLOCK_K=triton.next_power_of_2(top_k), **common(cfg))
        return w

    def sigmoid_fwd(cfg):
        w, ids = torch.empty_like(ws_ref), torch.empty_like(ids_s_ref)
        _sigmoid_topk_fwd_kernel[grid(cfg)](logits, bias, w, ids, T, E, logits.stride(0), 2.5, TOP_K=top_k,
                                            N_GROUP=n_group, TOPK_GROUP=min(4, n_group), RENORMALIZE=True,
                                            BLOCK_K=triton.next_power_of_2(top_k),
                                            BLOCK_G=triton.next_power_of_2(n_group), **common(cfg))
        return w

    def softmax_bwd(cfg):
        dl = torch.empty_like(logits)
        _softmax_topk_bwd_kernel[grid(cfg)](d_weights, logits, ids_ref, dl, T, E, logits.stride(0), dl.stride(0),
                                            TOP_K=top_k, RENORMALIZE=True, **common(cfg))
        return dl

    def sigmoid_bwd(cfg):
        dl = torch.empty_like(logits)
        _sigmoid_topk_bwd_kernel[grid(cfg)](d_weights, logits, ids_s_ref, dl, T, E, logits.stride(0),
                                            dl.stride(0), 2.5, TOP_K=top_k, RENORMALIZE=True, **common(cfg))
        return dl

    for name, run, ref in (("moe_softmax_topk_fwd", softmax_fwd, w_ref), ("moe_sigmoid_topk_fwd", sigmoid_fwd, ws_ref),
                           ("moe_softmax_topk_bwd", softmax_bwd, dl_ref),
                           ("moe_sigmoid_topk_bwd", sigmoid_bwd, dls_ref)):
        out[name] = (run, lambda c, run=run, ref=ref: sweep.max_rel_error(run(c), ref))
    return out


def autotune(shape: dict | None = None) -> list[dict]:
    dev, out = AUTOTUNE_DEVICE, []
    for s in ([shape] if shape else DEFAULT_SHAPES):
        T, E, k = s["T"], s["E"], s["k"]
        logits = torch.randn(T, E, device=dev, dtype=torch.float32)
        bias = 0.1 * torch.randn(E, device=dev)
        d_weights = torch.randn(T, k, device=dev)
        for name, (run, check) in _launches(logits, bias, d_weights, k).items():
            cfg, ms = sweep.fastest(name, CANDIDATES, run, check)
            tuning.store_config(name, f"E{E}", cfg)
            moved = T * E * 4 * (2 if name.endswith("bwd") else 1)
            out.append(dict(shape=dict(kernel=name, T=T, E=E, k=k, dtype="fp32"), config=cfg, ms=ms,
                            throughput=f"{moved / ms / 1e6:.0f} GB/s"))
    return out
