"""The stateless layer template: one decoder layer, the embedding and the head, computed on whichever layer's
weights are bound to them.

Weights come in as ``w`` (a dict of views into a device staging slot, see layout.LayerLayout.views) and weight
gradients are accumulated into ``g`` (the same views into an fp32 accumulator). Nothing here owns a tensor
beyond one call. The forward keeps nothing but its output; ``decoder_backward`` recomputes the layer from its
input and runs the hand-written backward of every op (kernels/reference.py gives the formulas).

With LoRA adapters (lora.py) ``w`` also holds each target's A and B ("q.lora_A", "q.lora_B", ...) and their
scale (``w[LORA_SCALE]``), the base is frozen, and ``g`` holds the adapters' gradients only: every projection then
runs as the frozen matmul plus its adapters (the helpers below), its backward gives d(input) and the adapters'
gradients, and no base weight gradient is ever formed; the head gets ``g = {"lm_head": None, "norm": scratch}``.

Shapes: T = B·S tokens, H hidden, Hq/Hkv heads of size D, I intermediate, V vocabulary, r the LoRA rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ModelConfig

router_balance = None      # the template's MoE auxiliary loss (the generic template's RouterBalance): none here


@dataclass
class MicroBatch:
    """One micro-batch, prepared on the compute device."""
    input_ids: torch.Tensor           # [B, S] int64
    host_ids: torch.Tensor            # [T] int64 on the host: the embedding rows are gathered there
    targets: torch.Tensor             # [T] int64: labels shifted left by one, -100 where nothing is predicted
    cos: torch.Tensor | None          # [T, D] fp32 rotary tables at each token's position (None: the generic
    sin: torch.Tensor | None          # template, whose model makes its own)
    doc_ids: torch.Tensor | None      # [B, S] int32 document index (packed sequences), None: one document a row
    num_targets: int                  # counted (non-ignored) targets, known on the host without a sync
    position_ids: torch.Tensor | None = None    # [B, S] int64 each token's position (the generic template's)
    attention_mask: torch.Tensor | None = None  # [B, S] bool, False at padding; None: no padding
    embed_grad_mask: torch.Tensor | None = None  # [T] bool, False at the pad id: that embedding row gets no
                                                 # gradient from the lookup (padding_idx); None: no pad id
    preference: object = None         # preference.PreferenceBatch with objective "dpo": the pairs, their references
    model_inputs: dict | None = None  # the generic template's per-layer call arguments, made on first use
    host_layout: tuple | None = None  # on the meta device: (position_ids, doc_ids, attention_mask) on the host,
                                      # from which the generic template records its layer inputs (values needed)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


# ---------------------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------------------
# The table stays on the host: the step's distinct token ids are gathered there (rows [U, H]) and each token
# reads its row through ``index`` [T] (positions in rows). The backward accumulates into those U rows only.
def embed_forward(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return rows[index]                                                               # [T, H]


def embed_backward(d_rows: torch.Tensor, index: torch.Tensor, dx: torch.Tensor, keep: torch.Tensor | None = None,
                   token_chunk: int = 4096) -> None:
    """d_rows fp32[U, H] += dx[T, H] scattered by index; dx is widened to fp32 token_chunk rows at a time. Tokens
    where keep[T] is False (the pad id, as nn.Embedding(padding_idx=...)) add nothing."""
    for s in range(0, dx.shape[0], token_chunk):
        d = dx[s:s + token_chunk].float()
        if keep is not None:
            d.masked_fill_(~keep[s:s + token_chunk, None], 0.0)
        d_rows.index_add_(0, index[s:s + token_chunk], d)


# ---------------------------------------------------------------------------------------------------------
# projections: the fused kernels of a full fine-tune, or a frozen matmul plus LoRA adapters
# ---------------------------------------------------------------------------------------------------------
LORA_SCALE = "lora_scale"      # key of the adapters' scale s in w: its presence marks a frozen base


def _members(cfg: ModelConfig, proj: str) -> list[tuple[str, int, int]]:
    """(key, first column, end column) of each projection fused into ``proj``'s output."""
    q, kv, I = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"qkv": [("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)],
            "gate_up": [("gate", 0, I), ("up", I, 2 * I)]}.get(proj, [(proj, 0, None)])


def _with_adapters(ops, cfg, w, x: torch.Tensor, y: torch.Tensor, proj: str, saved: dict) -> torch.Tensor:
    """y[T, N] += s·(x Aᵀ) Bᵀ for each adapter of proj's members; keeps xa = s·x Aᵀ [T, r] in saved."""
    for key, lo, hi in _members(cfg, proj):
        if key + ".lora_A" in w:
            delta, saved[key + ".xa"] = ops.lora_forward(x, w[key + ".lora_A"], w[key + ".lora_B"], w[LORA_SCALE])
            y[:, lo:hi] += delta
    return y


def _normed_projection(ops, cfg, w, x: torch.Tensor, norm: str, proj: str, saved: dict):
    """(rmsnorm(x) W[proj]ᵀ [T, N], rstd[T]): the fused kernel; with adapters the norm's output is kept for them."""
    if LORA_SCALE not in w:
        return ops.rmsnorm_matmul_forward(x, w[norm], w[proj], cfg.rms_norm_eps)
    xn, rstd = ops.rmsnorm_forward(x, w[norm], cfg.rms_norm_eps)
    saved[proj + ".x"] = xn
    return _with_adapters(ops, cfg, w, xn, ops.linear_forward(xn, w[proj]), proj, saved), rstd


def _projection(ops, cfg, w, x: torch.Tensor, proj: str, saved: dict, bias=None) -> torch.Tensor:
    y = ops.linear_forward(x, w[proj], bias)
    return _with_adapters(ops, cfg, w, x, y, proj, saved) if LORA_SCALE in w else y


def _frozen_backward(ops, cfg, w, g, dy: torch.Tensor, x: torch.Tensor, proj: str, saved: dict) -> torch.Tensor:
    """d(x) of x W[proj]ᵀ + adapters with W frozen: dy W (no dW), plus each adapter's share; dA, dB into g."""
    dx = dy @ w[proj]
    for key, lo, hi in _members(cfg, proj):
        if key + ".lora_A" in w:
            dx += ops.lora_backward(dy[:, lo:hi], x, saved.get(key + ".xa"), w[key + ".lora_A"], w[key + ".lora_B"],
                                    w[LORA_SCALE], g[key + ".lora_A"], g[key + ".lora_B"])
    return dx


def _norm_grad(g, w, key: str) -> torch.Tensor:
    """Where a norm's gradient goes: g's buffer, or with a frozen base a discarded fp32 scratch of its size."""
    return g[key] if key in g else torch.zeros(w[key].shape, dtype=torch.float32, device=w[key].device)


def _normed_projection_backward(ops, cfg, w, g, dy, x, rstd, norm: str, proj: str, saved: dict) -> torch.Tensor:
    if LORA_SCALE not in w:
        return ops.rmsnorm_matmul_backward(dy, x, w[norm], w[proj], rstd, g[proj], g[norm])
    dxn = _frozen_backward(ops, cfg, w, g, dy, saved[proj + ".x"], proj, saved)
    return ops.rmsnorm_backward(dxn, x, w[norm], rstd, _norm_grad(g, w, norm))


def _projection_backward(ops, cfg, w, g, dy, x, proj: str, saved: dict, d_bias=None) -> torch.Tensor:
    if LORA_SCALE not in w:
        return ops.linear_backward(dy, x, w[proj], g[proj], d_bias)
    return _frozen_backward(ops, cfg, w, g, dy, x, proj, saved)


# ---------------------------------------------------------------------------------------------------------
# decoder layer
# ---------------------------------------------------------------------------------------------------------
def _decoder_recompute(ops, cfg: ModelConfig, w, x: torch.Tensor, mb: MicroBatch) -> dict:
    """The layer's forward up to the MLP activation: every intermediate the backward needs (the backward never
    needs the down projection's output, so the recompute does not pay for that matmul)."""
    B, S = mb.shape
    T, Hq, Hkv, D = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    saved = {}
    qkv, rstd_in = _normed_projection(ops, cfg, w, x, "input_norm", "qkv", saved)             # [T, (Hq+2Hkv)D]
    if cfg.attention_bias:
        qkv += w["qkv_bias"]
    # contiguous copies: the kernels take dense tensors, and RoPE rotates in place
    q_lin = qkv[:, :cfg.q_size].reshape(T, Hq, D).contiguous()
    k_lin = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].reshape(T, Hkv, D).contiguous()
    v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(B, S, Hkv, D).contiguous()
    del qkv                                   # the backward never reads it: freed before the attention runs
    saved.update(rstd_in=rstd_in, q_lin=q_lin, k_lin=k_lin)
    if cfg.qk_norm:
        q, saved["rstd_q"] = ops.rmsnorm_forward(q_lin, w["q_norm"], cfg.rms_norm_eps)
        k, saved["rstd_k"] = ops.rmsnorm_forward(k_lin, w["k_norm"], cfg.rms_norm_eps)
    else:
        q, k = q_lin, k_lin  # only the q/k-norm backward needs the unrotated values
    ops.rope_forward_(q, mb.cos, mb.sin)
    ops.rope_forward_(k, mb.cos, mb.sin)
    q, k = q.view(B, S, Hq, D), k.view(B, S, Hkv, D)
    attn, lse = ops.attention_forward(q, k, v, mb.doc_ids, D ** -0.5, cfg.sliding_window)     # [B, S, Hq, D]
    attn_flat = attn.view(T, cfg.q_size)
    h = x + _projection(ops, cfg, w, attn_flat, "o", saved, w.get("o_bias"))                 # [T, H]
    gate_up, rstd_post = _normed_projection(ops, cfg, w, h, "post_norm", "gate_up", saved)     # [T, 2I]
    act = ops.swiglu_forward(gate_up)                                                         # [T, I]
    saved.update(q=q, k=k, v=v, attn=attn, lse=lse, attn_flat=attn_flat, h=h, gate_up=gate_up,
                 rstd_post=rstd_post, act=act)
    return saved


def decoder_forward(ops, cfg: ModelConfig, w, x: torch.Tensor, mb: MicroBatch, layer: int) -> torch.Tensor:
    """x[T, H] -> the layer's output [T, H]; every intermediate is dropped. (``layer``, the store index, tells
    apart the layers of a generic model; here every layer is alike.)"""
    s = _decoder_recompute(ops, cfg, w, x, mb)
    return s["h"] + _projection(ops, cfg, w, s["act"], "down", s)


def decoder_backward(ops, cfg: ModelConfig, w, g, x: torch.Tensor, mb: MicroBatch,
                     d_out: torch.Tensor, layer: int) -> torch.Tensor:
    """Recomputes the layer from its input x, accumulates weight gradients into g, returns d(x)."""
    s = _decoder_recompute(ops, cfg, w, x, mb)
    T, D = x.shape[0], cfg.head_dim
    # MLP block: out = h + down(swiglu(gate_up(rmsnorm(h))))
    d_act = _projection_backward(ops, cfg, w, g, d_out, s["act"], "down", s)
    d_gate_up = ops.swiglu_backward(d_act, s["gate_up"])
    d_h = d_out + _normed_projection_backward(ops, cfg, w, g, d_gate_up, s["h"], s["rstd_post"], "post_norm",
                                              "gate_up", s)
    # attention block: h = x + o(attention(rope(q), rope(k), v))
    d_attn = _projection_backward(ops, cfg, w, g, d_h, s["attn_flat"], "o", s, g.get("o_bias"))
    dq, dk, dv = ops.attention_backward(d_attn.view_as(s["attn"]), s["q"], s["k"], s["v"], s["attn"], s["lse"],
                                        mb.doc_ids, D ** -0.5, cfg.sliding_window)
    dq, dk = dq.view(T, cfg.num_heads, D), dk.view(T, cfg.num_kv_heads, D)
    ops.rope_backward_(dq, mb.cos, mb.sin)
    ops.rope_backward_(dk, mb.cos, mb.sin)
    if cfg.qk_norm:
        dq = ops.rmsnorm_backward(dq, s["q_lin"], w["q_norm"], s["rstd_q"], _norm_grad(g, w, "q_norm"))
        dk = ops.rmsnorm_backward(dk, s["k_lin"], w["k_norm"], s["rstd_k"], _norm_grad(g, w, "k_norm"))
    d_qkv = torch.cat((dq.reshape(T, -1), dk.reshape(T, -1), dv.reshape(T, -1)), dim=1)      # [T, (Hq+2Hkv)D]
    if "qkv_bias" in g:                       # the biases, unless frozen
        g["qkv_bias"] += d_qkv.sum(0, dtype=torch.float32)
    return d_h + _normed_projection_backward(ops, cfg, w, g, d_qkv, x, s["rstd_in"], "input_norm", "qkv", s)


# ---------------------------------------------------------------------------------------------------------
# head: final RMSNorm, lm_head and cross-entropy in one pass that also yields the gradients
# ---------------------------------------------------------------------------------------------------------
def head_forward_backward(ops, cfg: ModelConfig, w, g, x: torch.Tensor, mb: MicroBatch,
                          grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x[T, H] -> (summed loss over counted tokens (fp32 scalar), d(x) of grad_scale · loss).

    Logits exist one chunk of tokens at a time inside linear_cross_entropy."""
    xn, rstd = ops.rmsnorm_forward(x, w["norm"], cfg.rms_norm_eps)
    loss_sum, d_xn = ops.linear_cross_entropy(xn, w["lm_head"], mb.targets, g["lm_head"], grad_scale)
    return loss_sum, ops.rmsnorm_backward(d_xn, x, w["norm"], rstd, g["norm"])


# The head in vocabulary chunks (when lm_head is larger than a staging slot): the norm once, then two passes over
# the chunks, w = {"lm_head": rows [start, start + V_c), "norm"} (see kernels/reference.py for the maths).
def head_norm(ops, cfg: ModelConfig, w, x: torch.Tensor):
    return ops.rmsnorm_forward(x, w["norm"], cfg.rms_norm_eps)                      # (xn[T, H], rstd[T])


def head_chunk_logits(w, xn: torch.Tensor) -> torch.Tensor:
    """The logits [T, V_c] of a vocabulary chunk's rows w["lm_head"] (a forward-only pass: Engine.logits)."""
    return xn @ w["lm_head"].t()


def head_chunk_stats(ops, w, xn: torch.Tensor, mb: MicroBatch, start: int, stats: tuple) -> None:
    """Pass 1: stats = (row_max, row_sum, target_logit) fp32 [T], updated in place."""
    ops.cross_entropy_chunk_stats_(xn, w["lm_head"], mb.targets, start, *stats)


def head_chunk_backward(ops, w, g, xn: torch.Tensor, mb: MicroBatch, start: int, lse: torch.Tensor,
                        grad_scale, d_xn: torch.Tensor) -> None:
    """Pass 2: d_xn fp32[T, H] and g["lm_head"] (this chunk's rows) accumulate. grad_scale: one number (the mean
    loss's 1 / tokens) or fp32 [T] per-token weights (DPO's, preference.DPOHead)."""
    ops.cross_entropy_chunk_backward(xn, w["lm_head"], mb.targets, start, lse, grad_scale, d_xn, g["lm_head"])


def head_norm_backward(ops, w, g, x: torch.Tensor, rstd: torch.Tensor, d_xn: torch.Tensor) -> torch.Tensor:
    return ops.rmsnorm_backward(d_xn.to(x.dtype), x, w["norm"], rstd, g["norm"])
