"""Activation checkpoints of one step: each decoder layer's input per micro-batch, kept on the compute device
while they fit a byte budget, the rest offloaded to the host during the forward and brought back one layer ahead
of the backward; and the default budget, from the device's free memory (scheduler.run_step uses both)."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .pipeline import Pipeline
from .trace import traced


CROSS_ENTROPY_TOKEN_CHUNK = 4096   # tokens whose logits exist at once in the head (the ops' chunk_size default)


def backward_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """Device bytes a decoder layer's recompute + backward holds per token of one micro-batch, at its peak: what
    _decoder_recompute keeps (qkv, contiguous q/k/v, normed q/k, attention output, h, gate_up, act) and the
    backward's live gradients (d_act, d_gate_up, d_h, d_attn, dq/dk/dv, d_qkv), in the compute dtype, plus the
    fp32 widenings the weight-gradient products make of one [T, 2I] and one [T, H] operand, and the attention's
    fp32 lse and dq workspace."""
    q, kv, H, I = cfg.q_size, cfg.kv_size, cfg.hidden_size, cfg.intermediate_size
    kept = (q + 2 * kv) + (q + 2 * kv) + (q + kv) * cfg.qk_norm + q + H + 2 * I + I
    live = I + 2 * I + H + q + (q + 2 * kv) * 2
    return itemsize * (kept + live) + 4 * (2 * I + H + cfg.num_heads + q)


def default_checkpoint_budget(p: Pipeline, free_bytes: int, mb_tokens: list[int], unique_rows: int) -> int:
    """Bytes of activation checkpoints the device can keep this step, from its free memory at the step's start
    (slots and accumulators already allocated):

        budget = free − margin − activations − backward − head − embedding,   margin = free / 20
        activations = Σ_m T_m·H·(3b + 4)      hidden, the head's x̂ and fp32 d(x̂), the d(x) it returns
        backward    = max_m T_m · backward_bytes_per_token(b)            one micro-batch through one layer
        head        = min(T_max, 4096) · V_c · (b + 8)                   one logits chunk, fp32 softmax
        embedding   = U·H·(b + 4)                                         gathered rows, their fp32 gradient

    with b the compute dtype's bytes, T_m the micro-batches' tokens, V_c the head's rows per chunk and U the
    step's distinct token ids; never below 0 (then every checkpoint is offloaded to the host)."""
    b, H = p.store.compute_dtype.itemsize, p.cfg.hidden_size
    T_max = max(mb_tokens, default=0)
    # a frozen base (LoRA) keeps both norms' outputs for its adapters: the fused norm + matmul is split there
    per_token = backward_bytes_per_token(p.cfg, b) + (2 * H * b if p.store.lora is not None else 0)
    need = (sum(mb_tokens) * H * (3 * b + 4) + T_max * per_token
            + min(T_max, CROSS_ENTROPY_TOKEN_CHUNK) * p.head_rows * (b + 8) + unique_rows * H * (b + 4))
    return max(0, free_bytes - free_bytes // 20 - need)


class Checkpoints:
    """Each decoder layer's input per micro-batch. Kept on the device while they fit ``budget`` bytes; the rest go
    to host memory on the copy-out stream during the forward and come back on the copy-in stream one layer
    ahead of the backward. Which ones go is decided on the host from their sizes, so no sync is needed."""

    def __init__(self, p: Pipeline, num_layers: int, num_mbs: int, budget: int | None):
        self.p = p
        self.budget = budget                                                  # None: keep every one
        self.on_device = [[None] * num_mbs for _ in range(num_layers + 1)]   # [layer][mb] device tensors
        self.on_host = [[None] * num_mbs for _ in range(num_layers + 1)]     # [layer][mb] host tensors
        self.offloaded = [([], None)] * (num_layers + 1)                      # (mbs, event: copies done)
        self.ready = [None] * (num_layers + 1)                                # event: prefetch done
        self.kept_bytes = 0

    def save(self, i: int, hidden: list, nbytes: list[int]) -> None:
        """Host, after the compute that produced layer i's input in ``hidden``: keep it or stream it out."""
        p = self.p
        offload = []
        for m, size in enumerate(nbytes):
            keep = self.budget is None or self.kept_bytes + size <= self.budget
            self.kept_bytes += size if keep else 0
            if not keep:
                offload.append(m)
            # compute stream, right after the producing work: hold this very tensor (hidden[m] moves on)
            p.dev.submit("compute", lambda m=m, keep=keep: (self.on_device[i].__setitem__(m, p.meter.add(hidden[m]))
                                                           if keep else self.on_host[i].__setitem__(m, hidden[m])))
        if not offload:
            return
        p.dev.wait("copy_out", p.dev.record("compute"))
        for m in offload:
            def copy(m=m):
                x = self.on_host[i][m]
                host = p.dev.host_empty(x.shape, x.dtype)
                host.copy_(x, non_blocking=True)
                p.meter.copied(x, to_device=False)
                p.dev.retain(x, "copy_out")      # the compute stream may drop x before this copy ran
                self.on_host[i][m] = host
            p.dev.submit("copy_out", traced(p.tracer, f"offload checkpoint {i}", "copy_out", copy))
        self.offloaded[i] = (offload, p.dev.record("copy_out"))

    def prefetch(self, i: int) -> None:
        """copy_in stream: brings layer i's offloaded inputs back; ``wait(i)`` makes compute wait for them."""
        p = self.p
        todo, copied = self.offloaded[i]
        if not todo:
            return
        p.dev.wait("copy_in", copied)
        for m in todo:
            def copy(m=m):
                host = self.on_host[i][m]
                x = torch.empty(host.shape, dtype=host.dtype, device=p.dev.torch_device)
                x.copy_(host, non_blocking=True)
                p.meter.copied(host, to_device=True)
                p.dev.retain(x, "compute")
                self.on_device[i][m], self.on_host[i][m] = p.meter.add(x), None
            p.dev.submit("copy_in", traced(p.tracer, f"prefetch checkpoint {i}", "copy_in", copy))
        self.ready[i] = p.dev.record("copy_in")

    def wait(self, i: int) -> None:
        self.p.dev.wait("compute", self.ready[i])

    def pop(self, i: int, m: int) -> torch.Tensor:
        """Compute stream: the checkpoint, released from the engine's bookkeeping."""
        x = self.on_device[i][m]
        self.on_device[i][m] = None
        self.p.meter.sub(x)
        return x
