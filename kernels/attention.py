"""Flash attention in Triton: causal, grouped-query, packed documents, optional sliding window; forward and backward.

Per batch b and query head h (kv head h // G, G = Hq / Hkv), for token positions i (query) and j (key):
    allowed(i, j) = j ≤ i  ∧  doc[i] = doc[j]  ∧  i − j < W          (W = sliding window; ∞ without one)
    s_ij  = scale · q_i·k_j  (−∞ where not allowed)
    lse_i = log Σ_j exp(s_ij),      o_i = Σ_j exp(s_ij − lse_i) · v_j
Forward (FA2 online softmax): a program owns BLOCK_M queries and streams BLOCK_N keys at a time, keeping a
running max m, running sum l and an fp32 accumulator, rescaled by exp(m_old − m_new) when the max grows. It
works in base 2: log2(e) is folded into the scale (qk_scale = scale·log2 e) so every exp is an exp2.
Backward (FA2 split; P is recomputed from lse, nothing S×S is ever stored):
    Δ_i  = Σ_d dO_id · O_id                                                        _attn_bwd_preprocess
    P_ij = exp(s_ij − lse_i),   dP = dO·Vᵀ,   dS = P ∘ (dP − Δ)
    dV_j = Σ_{h∈group} Σ_i P_ij dO_i,   dK_j = scale · Σ_{h∈group} Σ_i dS_ij q_i    _attn_bwd_dkdv
    dQ_i = scale · Σ_j dS_ij k_j                                                   _attn_bwd_dq
A dkdv program owns BLOCK_N keys of one kv head and loops over (q head of its group, query block) in one flat
loop, so dK/dV are written once, without atomics.
The fused backward (an autotune choice, never the default): the dkdv kernel also computes each visited (head,
query block)'s dQ share scale · dS K from the dS it already holds and adds it by fp32 atomic adds into a zeroed
[B, Hq, S, D] accumulator, cast to q's dtype after; no dq kernel, so 5 matmuls instead of 7 (the split
backward recomputes S, P and dP in the dq kernel), in one launch besides Δ's. Atomic fp32 adds land in an order
that varies from run to run on a GPU, so its dQ is NOT deterministic (bitwise): it runs only where the GPU's
autotune measured it faster than the split backward and stored it (a dkdv config with "backward": "fused",
fuses_dq); the untuned default is the deterministic split backward.

Block skipping. The key blocks of a query block fall in three ranges, each a plain loop:
    [lo, full_lo)   window edge: masked (only with a sliding window),
    [full_lo, m0)   every (query, key) pair allowed by causality and window: no mask at all,
    [m0, m0+BM)     the causal diagonal: masked.
Blocks above the diagonal and behind the window are never visited; the dkdv kernel uses the mirror ranges over
query blocks. With documents, each range is further trimmed to the blocks whose [min, max] doc ids intersect
the program's own [min, max] (a short scan of the doc ids, no S×S work), and all pairs are masked by doc id;
for the usual packed batches (documents contiguous) this skips every block of an earlier document.

Pointer or TMA tiles, one contract. Each kernel (forward, dkdv, dq) has a constexpr TMA switch for how its
[rows, head dim] tiles move. TMA=False: masked pointer loads and stores (any layout, any GPU). TMA=True: Hopper
TMA through tensor descriptors made in the kernel (_tiles), one 2-D [seq_len, HEAD_DIM] descriptor per (batch
row, head) over the token-major tensors (dkdv reads its GROUP q heads' Q and dO through one 3-D [GROUP, seq_len,
HEAD_DIM] descriptor); they zero-fill rows past seq_len and columns past HEAD_DIM and clip the stores, so the
tiles carry no masks; the attention masks (causality, documents, window) stay on the scores in registers, over
the same block ranges, and lse/Δ stay pointer loads. A config's "kernel": "tma" sets it (uses_tma); the
bf16/fp16 defaults at head dims 64 and 128 are TMA configs, and the launchers fall back to the pointer defaults
where TMA cannot run (pre-Hopper GPU, head-dim stride ≠ 1, strides or base not 16-byte aligned:
tma_unsupported; a fused TMA choice falls back to the split backward's pointer default). The fused backward's dQ
atomic adds are pointer atomics in both forms. Descriptors made on the device need global scratch, so the
launchers set triton's allocator before each TMA launch.

FLOPs (for TFLOPS figures): causal forward ≈ 2·B·Hq·S²·D (4·B·Hq·S²·D for two matmuls, halved by causality);
backward = 2.5 × forward (five matmuls instead of two).

Supported: q[B, S, Hq, D], k/v[B, S, Hkv, D] with Hq a multiple of Hkv; bf16, fp16 or fp32 (all three the same);
head dims 32 to 256 in steps of 16 (tiles are the next power of two, the pad masked: 96 costs as much as 128);
any strides; doc_ids[B, S] int32 or None; sliding_window ≥ 1 or None.
Known gaps:
- fp32 inputs use exact ("ieee") fp32 dots: correct but far slower than bf16 on tensor cores.
- the Hopper configs follow the Triton fused-attention tutorial and FA2 and were checked only statically
  (tests/test_attention.py builds them for sm_90 on a CPU machine: no spills, wgmma used), never timed: run
  `python -m horizon_triton.kernels.autotune attention` on the GPU, which sweeps pointer and TMA candidates of
  each kernel, and the fused backward's against the split one (whether fusing pays is for that measurement).
  TMA tiles are the default at hd64/hd128 without a measurement (forward and backward); no warp
  specialization (see _fwd_range). hd256 is the least explored: its dkdv default runs mma.sync, not wgmma
  (DKDV_HD256_KEYS).
- kernels launch on the current CUDA device; tensors on another device are not switched to.
- stored configs are keyed by head dim, dtype and a sequence-length bucket, not by documents or window.
- Triton's CPU interpreter gets bf16 tl.dot wrong, so when interpreting (UPCAST) the dot operands are upcast to
  fp32 after the same rounding to the input dtype the GPU does. (It also truncates fp32 → bf16 instead of
  rounding; the tests patch that cast with tests/kernel_checks.py's bf16_round_to_nearest.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sweep, tuning
from .reference import attention_backward as attention_backward_ref  # noqa: F401  (tests and benchmarks use it)
from .reference import attention_forward as attention_forward_ref  # noqa: F401
from .reference import attention_mask

MAX_HEAD_DIM = 256
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LOG2E = tl.constexpr(1.4426950408889634)   # kernels go to base 2 with it (tl.constexpr: readable inside @jit)
LN2 = tl.constexpr(0.6931471805599453)     # and come back to natural log with it


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None, scale: float,
                  sliding_window: int | None = None, upcast: bool = True) -> torch.Tensor:
    """Differentiable torch attention (autograd works through it): o[B, S, Hq, D] in q.dtype.

    upcast=True computes in fp32 (the accurate reference); upcast=False keeps the matmuls in the input dtype
    the way plain PyTorch code would, which measures how much error the low precision itself costs."""
    B, S, Hq, _ = q.shape
    group = Hq // k.shape[2]
    work = torch.float32 if upcast else q.dtype
    qw = q.to(work)
    kw = k.to(work).repeat_interleave(group, dim=2)
    vw = v.to(work).repeat_interleave(group, dim=2)
    mask = attention_mask(S, doc_ids, sliding_window, q.device, B)                      # [B, S, S]
    s = torch.einsum("bihd,bjhd->bhij", qw, kw).float() * scale                         # [B, Hq, S, S] fp32
    p = torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), dim=-1).to(work)
    return torch.einsum("bhij,bjhd->bihd", p, vw).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Helpers shared by the kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (interpreter only) does the product in fp32, because the
    interpreter's bf16 tl.dot is wrong; the operands were already rounded to the input dtype."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_rows(ptr, pos, stride_s, stride_d, seq_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr):
    """The [len(pos), BLOCK_D] tile of rows at token positions pos, zero-padded past HEAD_DIM (BLOCK_D is the
    power of two ≥ HEAD_DIM that tl.arange needs); MASKED tiles may run past seq_len (zeros there too)."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = ptr + pos[:, None] * stride_s + offs_d[None, :] * stride_d
    if MASKED:
        tile = tl.load(ptrs, mask=(pos[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(ptr, pos, stride_s, stride_d, tile, seq_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stores the rows of tile at token positions pos < seq_len, columns < HEAD_DIM."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(ptr + pos[:, None] * stride_s + offs_d[None, :] * stride_d, tile,
             mask=(pos[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _add_rows_t(ptr, pos, tile_t, seq_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adds tile_t [BLOCK_D, len(pos)] (fp32, head dim first) into the rows at pos < seq_len of a contiguous fp32
    [*, HEAD_DIM] accumulator at ptr, by atomic adds: other programs add into the same rows."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.atomic_add(ptr + pos[None, :] * HEAD_DIM + offs_d[:, None], tile_t,
                  mask=(pos[None, :] < seq_len) & (offs_d[:, None] < HEAD_DIM), sem="relaxed")


@triton.jit
def _tiles(ptr, seq_len, stride_s, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
           TMA: tl.constexpr):
    """What a kernel moves one (batch row, head)'s [seq_len, HEAD_DIM] rows at ptr through: with TMA a Hopper
    tensor descriptor of [BLOCK_ROWS, BLOCK_D] tiles (unit head-dim stride; it zero-fills reads past seq_len and
    HEAD_DIM and clips writes there, so its tiles need no masks), else ptr itself (loads and stores masked)."""
    if TMA:
        tiles = tl.make_tensor_descriptor(ptr, [seq_len, HEAD_DIM], [stride_s, 1], [BLOCK_ROWS, BLOCK_D])
    else:
        tiles = ptr
    return tiles


@triton.jit
def _group_tiles(ptr, seq_len, stride_h, stride_s, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """_tiles over GROUP heads from ptr's on: with TMA one 3-D descriptor [GROUP, seq_len, HEAD_DIM], so a loop
    over (head, block) needs no descriptor per head."""
    if TMA:
        tiles = tl.make_tensor_descriptor(ptr, [GROUP, seq_len, HEAD_DIM], [stride_h, stride_s, 1],
                                          [1, BLOCK_ROWS, BLOCK_D])
    else:
        tiles = ptr
    return tiles


@triton.jit
def _load_tile(tiles, start, stride_s, stride_d, seq_len, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """The [BLOCK_ROWS, BLOCK_D] tile of rows start.. of _tiles' result (pointer loads masked as _load_rows)."""
    if TMA:
        tile = tiles.load([start, 0])
    else:
        tile = _load_rows(tiles, start + tl.arange(0, BLOCK_ROWS), stride_s, stride_d, seq_len, HEAD_DIM, BLOCK_D,
                          MASKED)
    return tile


@triton.jit
def _load_group_tile(tiles, head, start, stride_h, stride_s, stride_d, seq_len, HEAD_DIM: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """_load_tile of head ``head`` of _group_tiles' result."""
    if TMA:
        tile = tl.reshape(tiles.load([head, start, 0]), [BLOCK_ROWS, BLOCK_D])
    else:
        tile = _load_rows(tiles + head * stride_h, start + tl.arange(0, BLOCK_ROWS), stride_s, stride_d, seq_len,
                          HEAD_DIM, BLOCK_D, MASKED)
    return tile


@triton.jit
def _store_tile(tiles, start, stride_s, stride_d, tile, seq_len, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """Stores tile as rows start.. of _tiles' result, those < seq_len and columns < HEAD_DIM."""
    if TMA:
        tiles.store([start, 0], tile)
    else:
        _store_rows(tiles, start + tl.arange(0, BLOCK_ROWS), stride_s, stride_d, tile, seq_len, HEAD_DIM, BLOCK_D)


@triton.jit
def _allowed(q_pos, k_pos, q_doc, k_doc, seq_len, window,
             MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs may interact; the operands broadcast to the tile's shape.

    MASKED tiles apply causality, the window and the query bound (queries ≥ seq_len are padding); unmasked
    tiles are fully allowed by position, so only the document test is left (called only with HAS_DOCS)."""
    if MASKED:
        ok = (k_pos <= q_pos) & (q_pos < seq_len)
        if HAS_WINDOW:
            ok = ok & (q_pos - k_pos < window)
        if HAS_DOCS:
            ok = ok & (q_doc == k_doc)
    else:
        ok = q_doc == k_doc
    return ok


@triton.jit
def _doc_range(DOC, start, seq_len, BLOCK: tl.constexpr):
    """(doc ids [BLOCK] of positions start.., their min, their max) over the positions < seq_len."""
    offs = start + tl.arange(0, BLOCK)
    inside = offs < seq_len
    doc = tl.load(DOC + offs, mask=inside, other=-1)
    lo = tl.min(tl.where(inside, doc, 2147483647), 0)
    hi = tl.max(tl.where(inside, doc, -2147483647), 0)
    return doc, lo, hi


@triton.jit
def _doc_span(DOC, doc_lo, doc_hi, lo, hi, seq_len, BLOCK: tl.constexpr):
    """[first, end): the smallest run of the blocks of [lo, hi) (step BLOCK) that holds every block containing a
    document id in [doc_lo, doc_hi]. Blocks outside it cannot match and are skipped.

    The scan reads 1024 positions (CHUNK blocks) per step: a block per step would be S / BLOCK dependent global
    loads, tens of microseconds of latency per program at S = 4K."""
    CHUNK: tl.constexpr = 1024 // BLOCK if BLOCK < 1024 else 1
    first = hi
    end = lo
    for start in range(lo, hi, CHUNK * BLOCK):
        offs = start + tl.arange(0, CHUNK * BLOCK)
        inside = offs < seq_len
        doc = tl.load(DOC + offs, mask=inside, other=-1)
        doc_min = tl.reshape(tl.where(inside, doc, 2147483647), [CHUNK, BLOCK])
        doc_max = tl.reshape(tl.where(inside, doc, -2147483647), [CHUNK, BLOCK])
        block_lo = start + tl.arange(0, CHUNK) * BLOCK                                  # [CHUNK] block starts
        hit = (tl.max(doc_max, 1) >= doc_lo) & (tl.min(doc_min, 1) <= doc_hi) & (block_lo < hi)
        first = tl.minimum(first, tl.min(tl.where(hit, block_lo, hi), 0))
        end = tl.maximum(end, tl.max(tl.where(hit, block_lo + BLOCK, lo), 0))
    return first, end


@triton.jit
def _key_ranges(DOC, m0, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key positions visited by the query block [m0, m0 + BLOCK_M), as the three ranges of the module docstring:
    [lo, edge_hi) masked window edge, [full_lo, full_hi) unmasked, [diag_lo, hi) masked diagonal; with
    documents each is trimmed to the doc span. Also returns the block's doc ids (its positions without docs)."""
    q_doc = m0 + tl.arange(0, BLOCK_M)
    hi = tl.minimum(m0 + BLOCK_M, seq_len)
    if HAS_WINDOW:
        # row i sees keys (i − W, i]: the block's first row reaches back to m0 − W + 1, its last row only to
        # m0 + BLOCK_M − W, so keys from there up to m0 are seen by every row
        lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.minimum((tl.maximum(m0 + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, m0)
    else:
        lo = m0 * 0
        full_lo = m0 * 0
    edge_hi = full_lo
    full_hi = m0
    diag_lo = m0
    if HAS_DOCS:
        q_doc, doc_lo, doc_hi = _doc_range(DOC, m0, seq_len, BLOCK_M)
        first, end = _doc_span(DOC, doc_lo, doc_hi, lo, hi, seq_len, BLOCK_N)
        lo = tl.maximum(lo, first)
        edge_hi = tl.minimum(edge_hi, end)
        full_lo = tl.maximum(full_lo, first)
        full_hi = tl.minimum(full_hi, end)
        diag_lo = tl.maximum(diag_lo, first)
        hi = tl.minimum(hi, end)
    return q_doc, lo, edge_hi, full_lo, full_hi, diag_lo, hi


@triton.jit
def _query_ranges(n0, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query positions that see the key block [n0, n0 + BLOCK_N): (diag_hi, full_hi, hi) with [n0, diag_hi) the
    masked diagonal, [n0 + BLOCK_N, full_hi) unmasked (whole query blocks inside the sequence and the window)
    and [full_hi, hi) the masked tail (last partial block, window edge)."""
    diag_hi = tl.minimum(n0 + BLOCK_N, seq_len)
    if HAS_WINDOW:
        # key j is seen by queries [j, j + W): the block's last key by queries up to n0 + BLOCK_N − 2 + W, its
        # first key only by queries < n0 + W
        hi = tl.minimum(n0 + BLOCK_N - 1 + window, seq_len)
        full_hi = tl.minimum(n0 + window, seq_len)
    else:
        hi = seq_len + n0 * 0
        full_hi = seq_len + n0 * 0
    full_hi = tl.maximum((full_hi - n0) // BLOCK_M * BLOCK_M + n0, n0 + BLOCK_N)
    return diag_hi, full_hi, hi


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _softmax_step(qk, acc, l_i, m_i, q_pos, q_doc, k_pos, DOC, start_n, seq_len, window, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """One key block's online-softmax update from its raw scores qk = q·kᵀ [BLOCK_M, BLOCK_N]: -> (p in fp32,
    acc rescaled, l_i, m_i); the caller adds p·v to acc. Both forward kernels share it."""
    if MASKED or HAS_DOCS:
        k_doc = k_pos
        if HAS_DOCS:
            k_doc, _, _ = _doc_range(DOC, start_n, seq_len, BLOCK_N)
        ok = _allowed(q_pos[:, None], k_pos[None, :], q_doc[:, None], k_doc[None, :], seq_len, window,
                      MASKED, HAS_DOCS, HAS_WINDOW)
        # a large negative bias, not −inf: a row masked so far keeps a finite max, and its bogus terms
        # are wiped by alpha = exp2(−1e6 − m) = 0 once it meets its first allowed key (always j = i)
        qk = qk * qk_scale + tl.where(ok, 0.0, -1.0e6)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk -= m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, acc, l_i, m_ij


@triton.jit
def _fwd_range(acc, l_i, m_i, q, q_pos, q_doc,
               k_tiles, v_tiles, DOC, stride_ks, stride_vs, stride_kd, stride_vd,
               lo, hi, seq_len, window, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               TMA: tl.constexpr):
    """Online-softmax update of one query block over the key blocks [lo, hi). With TMA the compiler's pipeliner
    issues the K/V copies num_stages − 1 blocks ahead into shared memory, and the wgmma reads them from there.

    No warp specialization: triton 3.9 compiles tl.range(..., warp_specialize=True) here for sm_90a to the
    very same registers and shared memory as without (nothing specialized), and fails in its
    NVGPUWarpSpecialization pass on 4-warp tiles."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k_pos = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_tiles, start_n, stride_ks, stride_kd, seq_len, HEAD_DIM, BLOCK_N, BLOCK_D, MASKED,
                       TMA)                                                             # [BLOCK_N, BLOCK_D]
        qk = _dot(q, tl.trans(k), None, UPCAST, PRECISION)                              # [BLOCK_M, BLOCK_N]
        p, acc, l_i, m_i = _softmax_step(qk, acc, l_i, m_i, q_pos, q_doc, k_pos, DOC, start_n, seq_len, window,
                                         qk_scale, BLOCK_N, MASKED, HAS_DOCS, HAS_WINDOW)
        v = _load_tile(v_tiles, start_n, stride_vs, stride_vd, seq_len, HEAD_DIM, BLOCK_N, BLOCK_D, MASKED, TMA)
        acc = _dot(p.to(v.dtype), v, acc, UPCAST, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    # pointers
    Q, K, V, DOC, O, LSE,
    # shapes
    seq_len, num_heads, window, qk_scale,
    # strides
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_docb,
    # meta
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Grid (query blocks, B·Hq). Writes o[b, m0:m0+BLOCK_M, h] and lse[b, h, m0:m0+BLOCK_M]. TMA: the Q/K/V/O
    tiles move through tensor descriptors (_tiles; the launcher sends other layouts to the pointer loads)."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)          # the longest (last) query blocks start first
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = off_bh % num_heads
    off_kh = off_h // GROUP
    q_tiles = _tiles(Q + off_b * stride_qb + off_h * stride_qh, seq_len, stride_qs, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
    k_tiles = _tiles(K + off_b * stride_kb + off_kh * stride_kh, seq_len, stride_ks, HEAD_DIM, BLOCK_N, BLOCK_D,
                     TMA)
    v_tiles = _tiles(V + off_b * stride_vb + off_kh * stride_vh, seq_len, stride_vs, HEAD_DIM, BLOCK_N, BLOCK_D,
                     TMA)
    o_tiles = _tiles(O + off_b * stride_ob + off_h * stride_oh, seq_len, stride_os, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
    LSE += off_bh.to(tl.int64) * seq_len

    m0 = start_m * BLOCK_M
    q_pos = m0 + tl.arange(0, BLOCK_M)
    q = _load_tile(q_tiles, m0, stride_qs, stride_qd, seq_len, HEAD_DIM, BLOCK_M, BLOCK_D, True,
                   TMA)                                                                 # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_DOCS:
        DOC += off_b * stride_docb
    q_doc, lo, edge_hi, full_lo, full_hi, diag_lo, hi = _key_ranges(DOC, m0, seq_len, window, BLOCK_M, BLOCK_N,
                                                                    HAS_DOCS, HAS_WINDOW)
    args = (k_tiles, v_tiles, DOC, stride_ks, stride_vs, stride_kd, stride_vd)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, q_pos, q_doc, *args, lo, edge_hi, seq_len, window, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_DOCS, HAS_WINDOW, UPCAST, PRECISION, TMA)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, q_pos, q_doc, *args, full_lo, full_hi, seq_len, window, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_DOCS, HAS_WINDOW, UPCAST, PRECISION, TMA)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, q_pos, q_doc, *args, diag_lo, hi, seq_len, window, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_DOCS, HAS_WINDOW, UPCAST, PRECISION, TMA)

    acc = acc / l_i[:, None]
    tl.store(LSE + q_pos, (m_i + tl.math.log2(l_i)) * LN2, mask=q_pos < seq_len)      # natural log
    _store_tile(o_tiles, m0, stride_os, stride_od, acc.to(O.dtype.element_ty), seq_len, HEAD_DIM, BLOCK_M, BLOCK_D,
                TMA)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(
    # pointers
    O, DO, DELTA,
    # shapes
    seq_len, num_heads,
    # strides
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dob, stride_dos, stride_doh, stride_dod,
    # meta
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (query blocks, B·Hq). Δ[b, h, i] = Σ_d dO · O in fp32."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = off_bh % num_heads
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(O + off_b * stride_ob + off_h * stride_oh, pos, stride_os, stride_od, seq_len, HEAD_DIM, BLOCK_D,
                   True)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, pos, stride_dos, stride_dod, seq_len, HEAD_DIM,
                    BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * seq_len + pos, delta, mask=pos < seq_len)


@triton.jit
def _dkdv_range(dk, dv, k, v, k_pos, k_doc,
                q_tiles, do_tiles, LSE, DELTA, DOC, DQ_ACC, stride_qh, stride_qs, stride_qd, stride_doh, stride_dos,
                stride_dod, lo, hi, seq_len, window, qk_scale, scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, TMA: tl.constexpr, FUSED_DQ: tl.constexpr):
    """dK/dV of one key block accumulated over the query blocks [lo, hi) of each of the GROUP q heads (q_tiles,
    do_tiles from _group_tiles; LSE, DELTA, DQ_ACC point at the group's first head). Tiles are key-major:
    [BLOCK_N keys, BLOCK_M queries]. FUSED_DQ also adds each (head, query block)'s share of dQ, scale · dS K,
    into the fp32 accumulator DQ_ACC [heads, seq_len, HEAD_DIM] by atomic adds; it is computed transposed, as
    scale · Kᵀ dSᵀ [BLOCK_D, BLOCK_M], so that the MMA's rows are the head dim (a warpgroup MMA takes 64 rows and
    more) rather than the few queries of a dkdv tile.

    One flat loop over (head, query block) rather than a head loop around a block loop: the nested form made
    the compiler keep per-head address tiles live and spill on Hopper; the flat one pipelines as one loop."""
    n_blocks = tl.cdiv(hi - lo, BLOCK_M)
    for it in range(0, GROUP * n_blocks):
        g = it // n_blocks
        start_m = tl.multiple_of(lo + (it - g * n_blocks) * BLOCK_M, BLOCK_M)
        q_pos = start_m + tl.arange(0, BLOCK_M)
        LSE_g = LSE + g * seq_len
        DELTA_g = DELTA + g * seq_len
        q = _load_group_tile(q_tiles, g, start_m, stride_qh, stride_qs, stride_qd, seq_len, HEAD_DIM, BLOCK_M,
                             BLOCK_D, MASKED, TMA)                                      # [BLOCK_M, BLOCK_D]
        if MASKED:
            lse = tl.load(LSE_g + q_pos, mask=q_pos < seq_len, other=0.0)
        else:
            lse = tl.load(LSE_g + q_pos)
        qkT = _dot(k, tl.trans(q), None, UPCAST, PRECISION)                             # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :] * LOG2E)
        if MASKED or HAS_DOCS:
            q_doc = q_pos
            if HAS_DOCS:
                q_doc, _, _ = _doc_range(DOC, start_m, seq_len, BLOCK_M)
            ok = _allowed(q_pos[None, :], k_pos[:, None], q_doc[None, :], k_doc[:, None], seq_len, window,
                          MASKED, HAS_DOCS, HAS_WINDOW)
            pT = tl.where(ok, pT, 0.0)
        do = _load_group_tile(do_tiles, g, start_m, stride_doh, stride_dos, stride_dod, seq_len, HEAD_DIM, BLOCK_M,
                              BLOCK_D, MASKED, TMA)
        if MASKED:
            delta = tl.load(DELTA_g + q_pos, mask=q_pos < seq_len, other=0.0)
        else:
            delta = tl.load(DELTA_g + q_pos)
        dv = _dot(pT.to(do.dtype), do, dv, UPCAST, PRECISION)                 # [BLOCK_N, BLOCK_D]
        dpT = _dot(v, tl.trans(do), None, UPCAST, PRECISION)                            # [BLOCK_N, BLOCK_M]
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = _dot(dsT, q, dk, UPCAST, PRECISION)                              # [BLOCK_N, BLOCK_D]
        if FUSED_DQ:
            dqT = _dot(tl.trans(k), dsT, None, UPCAST, PRECISION)                       # [BLOCK_D, BLOCK_M]
            _add_rows_t(DQ_ACC + g * seq_len * HEAD_DIM, q_pos, dqT * scale, seq_len, HEAD_DIM, BLOCK_D)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    # pointers
    Q, K, V, DO, LSE, DELTA, DOC, DK, DV, DQ_ACC,
    # shapes
    seq_len, num_heads, num_kv_heads, window, qk_scale, scale,
    # strides
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_docb,
    # meta
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, FUSED_DQ: tl.constexpr,
):
    """Grid (key blocks, B·Hkv). Writes dk, dv[b, n0:n0+BLOCK_N, kv head], summed over the GROUP q heads. TMA:
    the K/V/dK/dV tiles through 2-D descriptors, the group's Q/dO tiles through 3-D ones (_group_tiles).
    FUSED_DQ (the fused backward): also adds dQ into DQ_ACC, fp32 [B, Hq, S, HEAD_DIM] zeroed by the launcher
    (None without FUSED_DQ), by atomic adds (_dkdv_range)."""
    n0 = tl.program_id(0) * BLOCK_N
    off_bkh = tl.program_id(1)
    off_b = (off_bkh // num_kv_heads).to(tl.int64)
    off_kh = off_bkh % num_kv_heads
    k_pos = n0 + tl.arange(0, BLOCK_N)
    k_tiles = _tiles(K + off_b * stride_kb + off_kh * stride_kh, seq_len, stride_ks, HEAD_DIM, BLOCK_N, BLOCK_D,
                     TMA)
    v_tiles = _tiles(V + off_b * stride_vb + off_kh * stride_vh, seq_len, stride_vs, HEAD_DIM, BLOCK_N, BLOCK_D,
                     TMA)
    k = _load_tile(k_tiles, n0, stride_ks, stride_kd, seq_len, HEAD_DIM, BLOCK_N, BLOCK_D, True,
                   TMA)                                                                 # [BLOCK_N, BLOCK_D]
    v = _load_tile(v_tiles, n0, stride_vs, stride_vd, seq_len, HEAD_DIM, BLOCK_N, BLOCK_D, True, TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    diag_hi, full_hi, hi = _query_ranges(n0, seq_len, window, BLOCK_M, BLOCK_N, HAS_WINDOW)
    diag_lo = n0
    full_lo = n0 + BLOCK_N
    tail_lo = full_hi
    k_doc = k_pos
    if HAS_DOCS:
        DOC += off_b * stride_docb
        k_doc, doc_lo, doc_hi = _doc_range(DOC, n0, seq_len, BLOCK_N)
        first, end = _doc_span(DOC, doc_lo, doc_hi, n0, hi, seq_len, BLOCK_M)
        diag_lo = tl.maximum(diag_lo, first)
        diag_hi = tl.minimum(diag_hi, end)
        full_lo = tl.maximum(full_lo, first)
        full_hi = tl.minimum(full_hi, end)
        tail_lo = tl.maximum(tail_lo, first)
        hi = tl.minimum(hi, end)

    first_h = off_kh * GROUP
    row = (off_b * num_heads + first_h) * seq_len
    q_tiles = _group_tiles(Q + off_b * stride_qb + first_h * stride_qh, seq_len, stride_qh, stride_qs, GROUP,
                           HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
    do_tiles = _group_tiles(DO + off_b * stride_dob + first_h * stride_doh, seq_len, stride_doh, stride_dos, GROUP,
                            HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
    if FUSED_DQ:
        DQ_ACC += row * HEAD_DIM                                 # laid out as LSE, HEAD_DIM values a row
    args = (q_tiles, do_tiles, LSE + row, DELTA + row, DOC, DQ_ACC, stride_qh, stride_qs, stride_qd, stride_doh,
            stride_dos, stride_dod)
    dk, dv = _dkdv_range(dk, dv, k, v, k_pos, k_doc, *args, diag_lo, diag_hi, seq_len, window, qk_scale, scale,
                         GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_DOCS, HAS_WINDOW, UPCAST, PRECISION, TMA,
                         FUSED_DQ)
    dk, dv = _dkdv_range(dk, dv, k, v, k_pos, k_doc, *args, full_lo, full_hi, seq_len, window, qk_scale, scale,
                         GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, False, HAS_DOCS, HAS_WINDOW, UPCAST, PRECISION, TMA,
                         FUSED_DQ)
    dk, dv = _dkdv_range(dk, dv, k, v, k_pos, k_doc, *args, tail_lo, hi, seq_len, window, qk_scale, scale,
                         GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_DOCS, HAS_WINDOW, UPCAST, PRECISION, TMA,
                         FUSED_DQ)

    dk *= scale
    dk_tiles = _tiles(DK + off_b * stride_dkb + off_kh * stride_dkh, seq_len, stride_dks, HEAD_DIM, BLOCK_N, BLOCK_D,
                      TMA)
    dv_tiles = _tiles(DV + off_b * stride_dvb + off_kh * stride_dvh, seq_len, stride_dvs, HEAD_DIM, BLOCK_N, BLOCK_D,
                      TMA)
    _store_tile(dk_tiles, n0, stride_dks, stride_dkd, dk.to(DK.dtype.element_ty), seq_len, HEAD_DIM, BLOCK_N,
                BLOCK_D, TMA)
    _store_tile(dv_tiles, n0, stride_dvs, stride_dvd, dv.to(DV.dtype.element_ty), seq_len, HEAD_DIM, BLOCK_N,
                BLOCK_D, TMA)


@triton.jit
def _dq_range(dq, q, do, lse2, delta, q_pos, q_doc,
              k_tiles, v_tiles, DOC, stride_ks, stride_vs, stride_kd, stride_vd,
              lo, hi, seq_len, window, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              TMA: tl.constexpr):
    """dQ of one query block accumulated over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k_pos = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_tiles, start_n, stride_ks, stride_kd, seq_len, HEAD_DIM, BLOCK_N, BLOCK_D, MASKED,
                       TMA)                                                             # [BLOCK_N, BLOCK_D]
        v = _load_tile(v_tiles, start_n, stride_vs, stride_vd, seq_len, HEAD_DIM, BLOCK_N, BLOCK_D, MASKED, TMA)
        qk = _dot(q, tl.trans(k), None, UPCAST, PRECISION)                              # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED or HAS_DOCS:
            k_doc = k_pos
            if HAS_DOCS:
                k_doc, _, _ = _doc_range(DOC, start_n, seq_len, BLOCK_N)
            ok = _allowed(q_pos[:, None], k_pos[None, :], q_doc[:, None], k_doc[None, :], seq_len, window,
                          MASKED, HAS_DOCS, HAS_WINDOW)
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), None, UPCAST, PRECISION)                             # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, UPCAST, PRECISION)                   # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit
def _attn_bwd_dq(
    # pointers
    Q, K, V, DO, LSE, DELTA, DOC, DQ,
    # shapes
    seq_len, num_heads, window, qk_scale, scale,
    # strides
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_docb,
    # meta
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Grid (query blocks, B·Hq). Writes dq[b, m0:m0+BLOCK_M, h]; same key ranges as the forward. TMA: the
    Q/K/V/dO/dQ tiles through 2-D descriptors, as the forward's."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = off_bh % num_heads
    off_kh = off_h // GROUP
    k_tiles = _tiles(K + off_b * stride_kb + off_kh * stride_kh, seq_len, stride_ks, HEAD_DIM, BLOCK_N, BLOCK_D,
                     TMA)
    v_tiles = _tiles(V + off_b * stride_vb + off_kh * stride_vh, seq_len, stride_vs, HEAD_DIM, BLOCK_N, BLOCK_D,
                     TMA)
    q_tiles = _tiles(Q + off_b * stride_qb + off_h * stride_qh, seq_len, stride_qs, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
    do_tiles = _tiles(DO + off_b * stride_dob + off_h * stride_doh, seq_len, stride_dos, HEAD_DIM, BLOCK_M, BLOCK_D,
                      TMA)
    m0 = start_m * BLOCK_M
    q_pos = m0 + tl.arange(0, BLOCK_M)
    q_in = q_pos < seq_len
    q = _load_tile(q_tiles, m0, stride_qs, stride_qd, seq_len, HEAD_DIM, BLOCK_M, BLOCK_D, True,
                   TMA)                                                                 # [BLOCK_M, BLOCK_D]
    do = _load_tile(do_tiles, m0, stride_dos, stride_dod, seq_len, HEAD_DIM, BLOCK_M, BLOCK_D, True, TMA)
    row = off_bh.to(tl.int64) * seq_len
    lse2 = tl.load(LSE + row + q_pos, mask=q_in, other=0.0) * LOG2E                  # base 2, as the scores
    delta = tl.load(DELTA + row + q_pos, mask=q_in, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_DOCS:
        DOC += off_b * stride_docb
    q_doc, lo, edge_hi, full_lo, full_hi, diag_lo, hi = _key_ranges(DOC, m0, seq_len, window, BLOCK_M, BLOCK_N,
                                                                    HAS_DOCS, HAS_WINDOW)
    args = (k_tiles, v_tiles, DOC, stride_ks, stride_vs, stride_kd, stride_vd)
    dq = _dq_range(dq, q, do, lse2, delta, q_pos, q_doc, *args, lo, edge_hi, seq_len, window,
                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_DOCS, HAS_WINDOW, UPCAST, PRECISION, TMA)
    dq = _dq_range(dq, q, do, lse2, delta, q_pos, q_doc, *args, full_lo, full_hi, seq_len, window,
                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_DOCS, HAS_WINDOW, UPCAST, PRECISION, TMA)
    dq = _dq_range(dq, q, do, lse2, delta, q_pos, q_doc, *args, diag_lo, hi, seq_len, window,
                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_DOCS, HAS_WINDOW, UPCAST, PRECISION, TMA)

    dq *= scale
    dq_tiles = _tiles(DQ + off_b * stride_dqb + off_h * stride_dqh, seq_len, stride_dqs, HEAD_DIM, BLOCK_M, BLOCK_D,
                      TMA)
    _store_tile(dq_tiles, m0, stride_dqs, stride_dqd, dq.to(DQ.dtype.element_ty), seq_len, HEAD_DIM, BLOCK_M,
                BLOCK_D, TMA)
# ----------------------------------------------------------------------------------------------------------
# Launch functions: configs, input checks, grids
# ----------------------------------------------------------------------------------------------------------
# Hopper candidates (bf16), swept by autotune(); BLOCK_M/BLOCK_N are the query/key tile of each kernel. The forward
# and dq kernels step the diagonal in key blocks (BLOCK_M % BLOCK_N == 0), dkdv steps it in query blocks
# (BLOCK_N % BLOCK_M == 0). Each one compiles for sm_90a at head dim 128 with documents and a window (the heaviest
# variant a stored config meets) without register spills, within an H100's 227 KB of shared memory, every dot a
# wgmma (tests/test_attention.py); the lists were cut to those from a 99-config grid in which 30 spilled and the
# forward's 128×128 tile with 4 stages needed 288 KB (the forward's 128×128 tiles and dkdv's 64×128 on 8 warps,
# 64×64 and 32×64 on 4 also spill at hd128 with documents and a window).
def _cfg(bm, bn, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def _tma_cfg(bm, bn, warps, stages):
    """A config that moves the tiles by TMA (the kernel's TMA=True); configs without "kernel" use pointers."""
    return {**_cfg(bm, bn, warps, stages), "kernel": "tma"}


def uses_tma(cfg: dict) -> bool:
    """Whether a config runs its kernel with TMA tiles (where tma_unsupported lets it)."""
    return cfg.get("kernel") == "tma"


def _fused_cfg(bm, bn, warps, stages, tma: bool = False):
    """A dkdv config that runs the fused backward: the dkdv kernel adds dQ by atomic adds (FUSED_DQ), no dq kernel."""
    return {**(_tma_cfg if tma else _cfg)(bm, bn, warps, stages), "backward": "fused"}


def fuses_dq(cfg: dict) -> bool:
    """Whether a dkdv config runs the fused backward (dQ by atomic adds in the dkdv kernel; not deterministic)."""
    return cfg.get("backward") == "fused"


def _cfg_label(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}{' tma' * uses_tma(cfg)}"
            f"{' fused' * fuses_dq(cfg)}")


# The TMA forward's candidates (bf16): K/V copies pipelined num_stages deep in shared memory.
# 128×128 tiles are left out: at head dim 128 with documents or a window they spill under triton 3.6 (16-40 B of
# stack at 255 registers; 3.9 fits them at 198-255), and with 4 stages they need 290 KB of shared memory.
FWD_TMA_CONFIGS = [_tma_cfg(128, 64, 8, 2), _tma_cfg(128, 64, 8, 3), _tma_cfg(128, 64, 8, 4),
                   _tma_cfg(64, 64, 4, 2), _tma_cfg(64, 64, 4, 3), _tma_cfg(64, 64, 4, 4)]
FWD_CONFIGS = [_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 2),
               _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3)] + FWD_TMA_CONFIGS
# The TMA backward's candidates (bf16): the pointer ones' tiles, and dkdv's 32×64 on 4 warps, which spills with
# pointer loads but not with TMA ones. Left out: dkdv 64×128 on 8 warps and dq 128×128 spill at head dim 128 under
# both tritons (40-272 B of stack at 255 registers).
DKDV_TMA_CONFIGS = [_tma_cfg(32, 128, 8, 2), _tma_cfg(32, 128, 8, 3), _tma_cfg(16, 128, 8, 3),
                    _tma_cfg(16, 64, 4, 2), _tma_cfg(32, 64, 4, 2)]
DQ_TMA_CONFIGS = [_tma_cfg(128, 64, 8, 2), _tma_cfg(128, 64, 8, 3), _tma_cfg(128, 32, 8, 2),
                  _tma_cfg(128, 32, 8, 3), _tma_cfg(64, 64, 4, 2), _tma_cfg(64, 64, 4, 3), _tma_cfg(64, 32, 4, 3)]
DKDV_CONFIGS = [_cfg(32, 128, 8, 2), _cfg(32, 128, 8, 3), _cfg(16, 128, 8, 3), _cfg(16, 64, 4, 2)] + DKDV_TMA_CONFIGS
DQ_CONFIGS = [_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2), _cfg(128, 32, 8, 3),
              _cfg(64, 64, 4, 2), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3)] + DQ_TMA_CONFIGS
# The fused backward's candidates (dkdv tiles; its dQ share adds a [BLOCK_D, BLOCK_M] fp32 tile and a dot a step).
# Left out (spills at head dim 128 with documents and a window, triton 3.9 · 3.6): 32×128 on 8 warps (pointer
# 24 · 0 B, TMA 32 · 160 B), TMA 32×64 on 4 warps (40 · 96 B), TMA 16×128 on 8 warps (0 · 56 B at 3 stages,
# 0 · 40 B at 2) and TMA 16×64 on 4 warps (0 · 8 B); 16×64 pointer on 4 warps fits at 255 registers under 3.6,
# too close.
# 64 keys on 8 warps halve dK/dV's accumulators per thread, which leaves room for the dQ tile.
FUSED_CONFIGS = [_fused_cfg(16, 128, 8, 3), _fused_cfg(32, 64, 8, 2),
                 _fused_cfg(32, 64, 8, 2, tma=True), _fused_cfg(16, 64, 8, 3, tma=True)]

# hd256's dkdv takes 32 keys a program: with the 64 a warpgroup MMA needs, its two fp32 [64, 256] accumulators
# alone fill 128 registers a thread on 8 warps and it spills (48 B at 2 stages, more with 1 stage or 16 warps);
# at 32 keys its dots are mma.sync, without spills.
DKDV_HD256_KEYS = 32

# Defaults by head dim (the tile width BLOCK_D) and dtype: Triton tutorial / FA2 shapes for bf16 and fp16. fp32
# takes IEEE dots on the FMA units, whose operands live in registers: the bf16 tiles spill kilobytes there (and
# take up to a minute each to compile), and even 32×32 tiles spilled in the unmasked (plain) variant at hd128, so
# fp32 has 16×16 tiles of its own (exact mode: correctness, not speed; its forward unpipelined, which triton 3.9
# compiles without spills where 2 stages spilled 8–24 B, and 8 warps 8 B). The hd128 bf16 forward has 2 stages: with 3, a window
# without documents spilled 8 B under triton 3.9. The TMA defaults (bf16/fp16 at hd64 and hd128, every kernel)
# keep the pointer defaults' tiles, which need fewer registers with TMA loads. Each default compiles for sm_90a
# with documents and a window without spills (tests/test_attention.py). Not timed: `python -m
# horizon_triton.kernels.autotune attention` on the GPU replaces the bf16 ones.
_DEFAULTS = {
    "attention_fwd": {32: _cfg(128, 64, 8, 3), 64: _cfg(128, 64, 8, 3), 128: _cfg(128, 64, 8, 2),
                      256: _cfg(128, 32, 8, 2)},
    "attention_bwd_dkdv": {32: _cfg(64, 128, 8, 3), 64: _cfg(64, 128, 8, 3), 128: _cfg(32, 128, 8, 3),
                           256: _cfg(16, DKDV_HD256_KEYS, 8, 2)},
    "attention_bwd_dq": {32: _cfg(128, 64, 8, 3), 64: _cfg(128, 64, 8, 3), 128: _cfg(128, 64, 8, 2),
                         256: _cfg(128, 32, 8, 2)},
    "attention_fwd/tma": {64: _tma_cfg(128, 64, 8, 3), 128: _tma_cfg(128, 64, 8, 2)},
    "attention_bwd_dkdv/tma": {64: _tma_cfg(64, 128, 8, 3), 128: _tma_cfg(32, 128, 8, 3)},
    "attention_bwd_dq/tma": {64: _tma_cfg(128, 64, 8, 3), 128: _tma_cfg(128, 64, 8, 2)},
    "attention_fwd/fp32": dict.fromkeys((32, 64, 128, 256), _cfg(16, 16, 4, 1)),
    "attention_bwd_dkdv/fp32": {**dict.fromkeys((32, 64, 128), _cfg(16, 16, 4, 2)), 256: _cfg(16, 16, 8, 1)},
    "attention_bwd_dq/fp32": dict.fromkeys((32, 64, 128, 256), _cfg(16, 16, 4, 2)),
}
# Interpreter tiles. Short sequences (the tests) get small tiles, so every range (edge, full, diagonal, tail)
# has several blocks and BLOCK_M ≠ BLOCK_N; longer ones (the engine on HORIZON_KERNELS=interpret) get 64×64 tiles,
# about 4× faster there since the interpreter pays per tile operation.
_INTERPRETER = {"attention_fwd": _cfg(32, 16, 4, 1), "attention_bwd_dkdv": _cfg(16, 32, 4, 1),
                "attention_bwd_dq": _cfg(32, 16, 4, 1)}
_INTERPRETER_LONG_S = 256


def _shape_key(S: int, D: int, dtype: torch.dtype) -> str:
    return f"D{D}_{str(dtype).removeprefix('torch.')}_{'S<=2K' if S <= 2048 else 'S>2K'}"


def _block_d(D: int) -> int:
    """The tile width over the head dim: D rounded up to a power of two (96 → 128; the pad is masked)."""
    return triton.next_power_of_2(D)


def _config(kernel: str, S: int, D: int, dtype: torch.dtype) -> dict:
    if tuning.interpreting():
        default = _INTERPRETER[kernel] if S <= _INTERPRETER_LONG_S else _cfg(64, 64, 4, 1)
    else:
        default = default_config(kernel, D, dtype)
    return tuning.best_config(kernel, _shape_key(S, D, dtype), default)


def default_config(kernel: str, D: int, dtype: torch.dtype, tma: bool = True) -> dict:
    """The untuned Hopper config of ``kernel`` at head dim D: fp32's own (its IEEE dots hold fp32 tiles in
    registers), the bf16 one for bf16 and fp16. Every kernel's bf16/fp16 default at head dims 64 and 128 moves
    its tiles by TMA (the launchers fall back to the pointer loads' default, tma=False, where TMA cannot run)."""
    tma_defaults = _DEFAULTS.get(f"{kernel}/tma", {})
    if tma and dtype != torch.float32 and D in tma_defaults:
        return tma_defaults[D]
    return _DEFAULTS[kernel if dtype != torch.float32 else f"{kernel}/fp32"][_block_d(D)]


def unsupported(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernels do not take this head dim and dtype (None: they do)."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (bf16, fp16, fp32)"
    if not (32 <= head_dim <= MAX_HEAD_DIM and head_dim % 16 == 0):
        return f"head dim {head_dim} is not supported (multiples of 16 from 32 to {MAX_HEAD_DIM})"
    return None


def _check_inputs(q, k, v, doc_ids, sliding_window) -> tuple[int, int, int, int, int]:
    """-> (B, S, Hq, Hkv, D), or a ValueError that names the problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [B, S, heads, D] (token-major), got shape "
                             f"{tuple(t.shape)}")
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B={B}, S={S}, Hkv, "
                         f"D={D}] to match q {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: Hq={Hq} query heads is not a multiple of Hkv={Hkv} kv heads (grouped-query "
                         f"attention needs Hq = G·Hkv)")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share one dtype among bf16, fp16, fp32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    refused = unsupported(D, q.dtype)
    if refused is not None:
        raise ValueError(f"attention: {refused}; pad the head dim or use kernels.reference.attention_forward")
    if S == 0 or B == 0:
        raise ValueError(f"attention: empty input, q shape {tuple(q.shape)}")
    devices = {t.device for t in (q, k, v)} | ({doc_ids.device} if doc_ids is not None else set())
    if len(devices) != 1:
        raise ValueError(f"attention: q, k, v (and doc_ids) must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not tuning.interpreting():
        raise ValueError(f"attention: tensors are on {q.device}; the Triton kernels need a CUDA device (or "
                         f"TRITON_INTERPRET=1). On CPU use kernels.reference.attention_forward/backward")
    if doc_ids is not None:
        if doc_ids.shape != (B, S):
            raise ValueError(f"attention: doc_ids must be [B={B}, S={S}], got {tuple(doc_ids.shape)}")
        if doc_ids.dtype != torch.int32:
            raise ValueError(f"attention: doc_ids must be int32, got {doc_ids.dtype} (use doc_ids.int())")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"attention: sliding_window must be a positive int or None, got {sliding_window!r}")
    return B, S, Hq, Hkv, D


def _window(S: int, sliding_window: int | None) -> int:
    """0 = no window; a window that covers the whole sequence is no window."""
    return 0 if sliding_window is None or sliding_window >= S else sliding_window


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"   # "tf32" is ignored for bf16/fp16 operands


MAX_GRID_Y = 65535   # CUDA's limit on a grid's y dimension, which holds (batch row, head) pairs here


def batch_slices(B: int, heads: int) -> list[tuple[int, int]]:
    """[b0, b1) ranges of batch rows with (b1 - b0) · heads ≤ MAX_GRID_Y: one launch per range (a long
    packed batch of short rows can exceed the limit with B · Hq)."""
    if heads > MAX_GRID_Y:
        raise ValueError(f"attention: {heads} heads exceed the launch grid's y limit {MAX_GRID_Y}")
    rows = MAX_GRID_Y // heads
    return [(b0, min(b0 + rows, B)) for b0 in range(0, B, rows)]


def tma_unsupported(*tensors: torch.Tensor) -> str | None:
    """Why TMA tiles cannot move these [B, S, heads, D] tensors (None: they can). A TMA descriptor needs an
    sm_90+ GPU (or the interpreter), a 16-byte aligned base and row stride, and a unit head-dim stride; the
    per-(batch, head) bases need the batch and head strides 16-byte aligned too."""
    t0 = tensors[0]
    if not tuning.interpreting() and torch.cuda.get_device_capability(t0.device)[0] < 9:
        return f"{torch.cuda.get_device_name(t0.device)} has no TMA (sm_90 or newer)"
    for t in tensors:
        if t.stride(3) != 1:
            return f"head-dim stride {t.stride(3)} (TMA needs 1)"
        unaligned = [st for st in t.stride()[:3] if st * t.element_size() % 16] + \
            ([t.data_ptr()] if t.data_ptr() % 16 else [])
        if unaligned:
            return f"strides {t.stride()} or base address not 16-byte aligned"
    return None


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory in which each program of a TMA launch writes its tensor descriptors (triton.set_allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _runnable(kernel: str, cfg: dict, *tensors: torch.Tensor) -> dict:
    """cfg, or the pointer loads' default where cfg is a TMA config that ``tensors`` (every [B, S, heads, D]
    tensor the kernel reads or writes) cannot take (tma_unsupported)."""
    if uses_tma(cfg) and tma_unsupported(*tensors) is not None:
        return default_config(kernel, tensors[0].shape[3], tensors[0].dtype, tma=False)
    return cfg


def _launch_fwd(q, k, v, doc_ids, o, lse, scale: float, window: int, cfg: dict) -> None:
    cfg = _runnable("attention_fwd", cfg, q, k, v, o)
    doc = doc_ids.contiguous() if doc_ids is not None else None
    for b0, b1 in batch_slices(q.shape[0], q.shape[2]):
        _launch_fwd_rows(q[b0:b1], k[b0:b1], v[b0:b1], None if doc is None else doc[b0:b1], o[b0:b1],
                         lse[b0:b1], scale, window, cfg)


def _launch_fwd_rows(q, k, v, doc, o, lse, scale: float, window: int, cfg: dict) -> None:
    B, S, Hq, D = q.shape
    grid = (triton.cdiv(S, cfg["BLOCK_M"]), B * Hq)
    if uses_tma(cfg) and not tuning.interpreting():
        triton.set_allocator(_tma_scratch)     # a context variable: set at each launch, whichever thread launches
    _attn_fwd[grid](
        q, k, v, doc, o, lse,
        S, Hq, window, scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        doc.stride(0) if doc is not None else 0,
        GROUP=Hq // k.shape[2], HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_DOCS=doc is not None, HAS_WINDOW=window > 0, UPCAST=tuning.interpreting(),
        PRECISION=_precision(q.dtype), TMA=uses_tma(cfg), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                      scale: float, sliding_window: int | None = None):
    """-> (o[B, S, Hq, D] in q.dtype, lse[B, Hq, S] fp32). Same contract as kernels.reference.attention_forward."""
    B, S, Hq, Hkv, D = _check_inputs(q, k, v, doc_ids, sliding_window)
    o = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    _launch_fwd(q, k, v, doc_ids, o, lse, scale, _window(S, sliding_window),
                _config("attention_fwd", S, D, q.dtype))
    return o, lse


def _launch_bwd(do, q, k, v, o, lse, doc_ids, scale: float, window: int, cfg_dkdv: dict, cfg_dq: dict):
    """-> (dq, dk, dv). A fused cfg_dkdv (fuses_dq) runs the fused backward and leaves cfg_dq unused."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    doc = doc_ids.contiguous() if doc_ids is not None else None
    delta = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, S, Hkv, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, S, Hkv, D), dtype=q.dtype, device=q.device)
    cfg_dkdv = _runnable("attention_bwd_dkdv", cfg_dkdv, q, k, v, do, dk, dv)
    cfg_dq = _runnable("attention_bwd_dq", cfg_dq, q, k, v, do, dq)
    dq_acc = torch.zeros((B, Hq, S, D), dtype=torch.float32, device=q.device) if fuses_dq(cfg_dkdv) else None
    for b0, b1 in batch_slices(B, Hq):
        rows = [t[b0:b1] for t in (do, q, k, v, o, lse, delta, dq, dk, dv)]
        _launch_bwd_rows(*rows, None if dq_acc is None else dq_acc[b0:b1], None if doc is None else doc[b0:b1],
                         scale, window, cfg_dkdv, cfg_dq)
    if dq_acc is not None:
        dq.copy_(dq_acc.transpose(1, 2))              # one pass: to token-major [B, S, Hq, D] and q's dtype
    return dq, dk, dv


def _launch_bwd_rows(do, q, k, v, o, lse, delta, dq, dk, dv, dq_acc, doc, scale: float, window: int,
                     cfg_dkdv: dict, cfg_dq: dict) -> None:
    """The backward's launches over these batch rows; with dq_acc (the fused backward, fp32 [B, Hq, S, D] zeros)
    the dkdv kernel adds dQ there and the dq kernel (and its cfg_dq) is left out."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    doc_stride = doc.stride(0) if doc is not None else 0
    meta = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=_block_d(D), HAS_DOCS=doc is not None, HAS_WINDOW=window > 0,
                UPCAST=tuning.interpreting(), PRECISION=_precision(q.dtype))
    pre_block = 64 if not tuning.interpreting() else 32
    fused = dq_acc is not None
    if (uses_tma(cfg_dkdv) or (uses_tma(cfg_dq) and not fused)) and not tuning.interpreting():
        triton.set_allocator(_tma_scratch)
    _attn_bwd_preprocess[(triton.cdiv(S, pre_block), B * Hq)](
        o, do, delta, S, Hq, *o.stride(), *do.stride(), HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=pre_block)
    _attn_bwd_dkdv[(triton.cdiv(S, cfg_dkdv["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, doc, dk, dv, dq_acc,
        S, Hq, Hkv, window, scale * LOG2E.value, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), doc_stride,
        BLOCK_M=cfg_dkdv["BLOCK_M"], BLOCK_N=cfg_dkdv["BLOCK_N"], TMA=uses_tma(cfg_dkdv), FUSED_DQ=fused, **meta,
        num_warps=cfg_dkdv["num_warps"], num_stages=cfg_dkdv["num_stages"])
    if fused:
        return
    _attn_bwd_dq[(triton.cdiv(S, cfg_dq["BLOCK_M"]), B * Hq)](
        q, k, v, do, lse, delta, doc, dq,
        S, Hq, window, scale * LOG2E.value, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), doc_stride,
        BLOCK_M=cfg_dq["BLOCK_M"], BLOCK_N=cfg_dq["BLOCK_N"], TMA=uses_tma(cfg_dq), **meta,
        num_warps=cfg_dq["num_warps"], num_stages=cfg_dq["num_stages"])


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, doc_ids: torch.Tensor | None, scale: float,
                       sliding_window: int | None = None):
    """-> (dq[B, S, Hq, D], dk[B, S, Hkv, D], dv[B, S, Hkv, D]) in the input dtype.
    Same contract as kernels.reference.attention_backward."""
    B, S, Hq, Hkv, D = _check_inputs(q, k, v, doc_ids, sliding_window)
    for name, t in (("do", do), ("o", o)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"attention_backward: {name} must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), "
                             f"got ({tuple(t.shape)}, {t.dtype}, {t.device})")
    if lse.shape != (B, Hq, S) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"attention_backward: lse must be fp32 [B={B}, Hq={Hq}, S={S}] as attention_forward "
                         f"returns it, got {lse.dtype} {tuple(lse.shape)}")
    return _launch_bwd(do, q, k, v, o, lse.contiguous(), doc_ids, scale, _window(S, sliding_window),
                       _config("attention_bwd_dkdv", S, D, q.dtype), _config("attention_bwd_dq", S, D, q.dtype))


# ----------------------------------------------------------------------------------------------------------
# Autotune (python -m horizon_triton.kernels.autotune attention [--shape B=.. S=.. Hq=.. Hkv=.. D=..])
# ----------------------------------------------------------------------------------------------------------
def attention_flops(B: int, S: int, Hq: int, D: int, backward: bool = False) -> float:
    """Causal attention FLOPs: forward 2·B·Hq·S²·D (QKᵀ and PV, half the S² pairs); backward 2.5× that."""
    fwd = 2.0 * B * Hq * S * S * D
    return 2.5 * fwd if backward else fwd


def _tune_shape(B: int, S: int, Hq: int, Hkv: int, D: int, device="cuda",
                configs: tuple[list, list, list, list] = (FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS, FUSED_CONFIGS)
                ) -> list[dict]:
    """Sweeps one shape (bf16, causal, no documents) with sweep.fastest and stores the winners; -> the fwd and
    bwd rows. Each candidate is first checked against the reference on batch 0's first kv-head group (G query
    heads and their kv head: the reference's [G, S, S] scores stay small at S = 4K); a wrong one is skipped.
    The backward: the split one's dkdv and dq configs, then the fused candidates, timed whole; the fused one is
    stored as the dkdv choice only where it beats the split backward (dq's choice is stored either way)."""
    dtype = torch.bfloat16
    q = torch.randn(B, S, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, S, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, S, Hkv, D, device=device, dtype=dtype)
    scale = D ** -0.5
    key = _shape_key(S, D, dtype)
    fwd_configs, dkdv_configs, dq_configs, fused_configs = configs
    G = Hq // Hkv

    def group(t: torch.Tensor, heads: int = G) -> torch.Tensor:
        return t[:1, :, :heads]                                   # [1, S, heads, D] of batch 0

    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, S), device=device, dtype=torch.float32)
    o_ref, _ = attention_forward_ref(group(q), group(k, 1), group(v, 1), None, scale)

    no_tma = tma_unsupported(q, k, v, o)
    if no_tma is not None:                   # the TMA configs would time the pointer loads under their name
        print(f"  attention: no TMA configs: {no_tma}")
        fwd_configs, dkdv_configs, dq_configs, fused_configs = (
            [c for c in candidates if not uses_tma(c)]
            for candidates in (fwd_configs, dkdv_configs, dq_configs, fused_configs))

    def run_fwd(cfg: dict) -> None:
        _launch_fwd(q, k, v, None, o, lse, scale, 0, cfg)

    def fwd_error(cfg: dict) -> float:
        run_fwd(cfg)
        return sweep.max_rel_error(group(o), o_ref)

    fwd_cfg, fwd_ms = sweep.fastest("attention_fwd", fwd_configs, run_fwd, fwd_error)
    tuning.store_config("attention_fwd", key, fwd_cfg)

    o, lse = attention_forward(q, k, v, None, scale)
    do = torch.randn_like(o)
    grads_ref = attention_backward_ref(group(do), group(q), group(k, 1), group(v, 1), group(o), lse[:1, :G], None,
                                       scale)                                     # dq, dk, dv of the group

    def bwd_error(cfg_dkdv: dict, cfg_dq: dict) -> float:
        dq, dk, dv = _launch_bwd(do, q, k, v, o, lse, None, scale, 0, cfg_dkdv, cfg_dq)
        return max(sweep.max_rel_error(group(g, n), r) for g, n, r in zip((dq, dk, dv), (G, 1, 1), grads_ref))

    dq_now = _config("attention_bwd_dq", S, D, dtype)        # dkdv is timed with today's dq config, then dq
    dkdv_cfg, _ = sweep.fastest("attention_bwd_dkdv", dkdv_configs,
                                lambda c: _launch_bwd(do, q, k, v, o, lse, None, scale, 0, c, dq_now),
                                lambda c: bwd_error(c, dq_now))
    dq_cfg, _ = sweep.fastest("attention_bwd_dq", dq_configs,
                              lambda c: _launch_bwd(do, q, k, v, o, lse, None, scale, 0, dkdv_cfg, c),
                              lambda c: bwd_error(dkdv_cfg, c))
    split_ms = tuning.time_ms(lambda: _launch_bwd(do, q, k, v, o, lse, None, scale, 0, dkdv_cfg, dq_cfg))
    fused_cfg, fused_ms = sweep.fastest("attention_bwd_fused", fused_configs,
                                        lambda c: _launch_bwd(do, q, k, v, o, lse, None, scale, 0, c, dq_cfg),
                                        lambda c: bwd_error(c, dq_cfg))
    bwd_cfg = {"dkdv": dkdv_cfg, "dq": dq_cfg}
    if fused_ms < split_ms:                  # not deterministic: only where measured faster
        print(f"  attention_bwd: fused {fused_ms:.3f} ms < split {split_ms:.3f} ms: storing the fused backward")
        dkdv_cfg, bwd_cfg = fused_cfg, {"fused": fused_cfg}
    tuning.store_config("attention_bwd_dkdv", key, dkdv_cfg)
    tuning.store_config("attention_bwd_dq", key, dq_cfg)
    bwd_ms = tuning.time_ms(lambda: attention_backward(do, q, k, v, o, lse, None, scale))
    rows = []
    for label, cfg, ms, backward in (("fwd", fwd_cfg, fwd_ms, False), ("bwd", bwd_cfg, bwd_ms, True)):
        tflops = attention_flops(B, S, Hq, D, backward) / (ms * 1e-3) / 1e12
        rows.append({"shape": f"B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} bf16 causal {label}", "config": cfg, "ms": ms,
                     "throughput": f"{tflops:.0f} TFLOPS ({'2.5 × ' if backward else ''}2·B·Hq·S²·D)"})
    return rows


def autotune(shape: dict | None = None) -> list[dict]:
    """Sweep the Hopper config lists on the current GPU (bf16), store the winners, return one row per kernel
    pass (forward, backward) and shape with its TFLOPS. Default shapes: 16K tokens per batch, Hq=32, Hkv=8,
    D in (128, 64), S in (1024, 4096); --shape takes B, S, Hq, Hkv, D."""
    shapes = [shape] if shape else [dict(B=16384 // S, S=S, Hq=32, Hkv=8, D=D) for D in (128, 64)
                                    for S in (1024, 4096)]
    rows = []
    for sh in shapes:
        unknown = set(sh) - {"B", "S", "Hq", "Hkv", "D"}
        if unknown:
            raise ValueError(f"autotune attention: unknown shape names {sorted(unknown)}; use B, S, Hq, Hkv, D")
        rows += _tune_shape(*(int(sh.get(n, d)) for n, d in (("B", 1), ("S", 4096), ("Hq", 32), ("Hkv", 8),
                                                               ("D", 128))))
    return rows
