"""Activation checkpoints of one step: each decoder layer's input per micro-batch, kept on the compute device
while they fit a byte budget, the rest offloaded to the host during the forward and brought back one layer ahead
of the backward; and the default budget, from the device's free memory (scheduler.run_step uses both).

A forward-only pass (scheduler.run_forward) holds one hidden state per micro-batch instead of one per layer, on
the same terms (``HiddenStates``): kept on the device within the same budget, the rest waiting in host memory
between the units and brought back, two at a time, for each one. ``forward_group_full`` sizes its groups."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..models.family import is_generic
from ..models.generic.footprint import backward_bytes
from .embedding_rows import to_device
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


def layer_backward_bytes(p: Pipeline, rows: int, seq: int) -> int:
    """Device bytes one decoder layer's recompute + backward holds for a micro-batch of rows × seq tokens: the
    generic template's measured figure (models.generic.footprint), else the dense template's per token."""
    if is_generic(p.cfg):
        return backward_bytes(p.cfg, p.store.compute_dtype, rows, seq)
    b, H = p.store.compute_dtype.itemsize, p.cfg.hidden_size
    # a frozen base (LoRA) keeps both norms' outputs for its adapters: the fused norm + matmul is split there
    return rows * seq * (backward_bytes_per_token(p.cfg, b) + (2 * H * b if p.store.lora is not None else 0))


def default_checkpoint_budget(p: Pipeline, free_bytes: int, mb_shapes: list[tuple[int, int]],
                              unique_rows: int, together: int = 1) -> int:
    """Bytes of activation checkpoints the device can keep this step, from its free memory at the step's start
    (slots and accumulators already allocated), for micro-batches of these (rows, seq) shapes:

        budget = free − margin − activations − backward − head − embedding,   margin = free / 20
        activations = Σ_m T_m·H·(3b + 4)      hidden, the head's x̂ and fp32 d(x̂), the d(x) it returns
        backward    = Σ of the G largest layer_backward_bytes(m)           G micro-batches through one layer
        head        = min(T_max, 4096) · V_c · (b + 8)                   one logits chunk, fp32 softmax
        embedding   = U·H·(b + 4)                                         gathered rows, their fp32 gradient

    with b the compute dtype's bytes, T_m the micro-batches' tokens, V_c the head's rows per chunk, U the step's
    distinct token ids and G = ``together`` the micro-batches whose recomputes of a layer live at once;
    never below 0 (then every checkpoint is offloaded to the host)."""
    b, H = p.store.compute_dtype.itemsize, p.cfg.hidden_size
    mb_tokens = [rows * seq for rows, seq in mb_shapes]
    T_max = max(mb_tokens, default=0)
    each = {shape: layer_backward_bytes(p, *shape) for shape in set(mb_shapes)}
    backward = sum(sorted((each[shape] for shape in mb_shapes), reverse=True)[:together])
    need = (sum(mb_tokens) * H * (3 * b + 4) + backward
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
                self.on_host[i][m] = to_host(p, self.on_host[i][m])
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
                self.on_device[i][m], self.on_host[i][m] = p.meter.add(to_device(p, self.on_host[i][m])), None
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


def to_host(p: Pipeline, x: torch.Tensor) -> torch.Tensor:
    """copy_out stream: a host copy of the device tensor x (pinned where the device copies asynchronously);
    x's memory stays reserved until the copy has run (the compute stream may drop x before)."""
    host = p.dev.host_empty(x.shape, x.dtype)
    host.copy_(x, non_blocking=True)
    p.meter.copied(x, to_device=False)
    p.dev.retain(x, "copy_out")
    return host


# ------------------------------------------------------------------------------------------------------------
# forward-only passes
# ------------------------------------------------------------------------------------------------------------
IN_FLIGHT = 2      # hidden states waiting on the host that a forward-only pass has on the device at once


def forward_budget(p: Pipeline, shape: tuple[int, int]) -> int | None:
    """Bytes of hidden states a forward-only pass keeps on the device: the step's checkpoint budget (the
    configured one, else default_checkpoint_budget from the free memory, for IN_FLIGHT micro-batches of
    this (rows, seq) ``shape`` being computed); None on CPU devices (their memory is the host's: keep every one)."""
    if p.checkpoint_budget is not None:
        return p.checkpoint_budget
    free = p.dev.free_memory()
    return None if free is None else default_checkpoint_budget(p, free, [shape] * IN_FLIGHT, 0)


def forward_group_full(num_mbs: int, nbytes: int, next_bytes: int, min_mbs: int, budget: int | None) -> bool:
    """Whether a forward-only pass's group of ``num_mbs`` micro-batches holding ``nbytes`` of hidden states is
    closed before one more of ``next_bytes``: once it has ``min_mbs`` (grad_accum_steps × layers: one hidden
    state each is what one step's checkpoints of grad_accum_steps such micro-batches hold, one per layer) and
    the next one no longer fits the device's ``budget`` (None: the device is the host, nothing more fits)."""
    return num_mbs >= min_mbs and (budget is None or nbytes + next_bytes > budget)


class HiddenStates:
    """The hidden state of each micro-batch of a forward-only pass between its units (scheduler.run_forward).
    The first ones whose bytes fit ``budget`` (None: all) stay on the device; the others wait in host memory as
    offloaded checkpoints do: brought back on the copy-in stream before each unit computes on them, the new state
    sent out on the copy-out stream after, at most IN_FLIGHT of them on the device at once (the copy-in stream
    waits for the compute that read the one IN_FLIGHT before, the compute for the copy-out of the one
    IN_FLIGHT before). Decided on the host from the sizes: no sync.

    Per unit and micro-batch m the scheduler calls ``before(m, result)``, submits ``task(m, fn, result)`` to
    the compute stream, then ``after(m, result)``; ``result`` says what becomes of fn's output: "new" (the next
    state), "same" (fn returned its input: a waiting state's host copy stays valid) or "drop" (the last unit)."""

    def __init__(self, p: Pipeline, nbytes: list[int], budget: int | None):
        self.p = p
        self.kept, total = [], 0
        for size in nbytes:
            keep = budget is None or total + size <= budget
            total += size if keep else 0
            self.kept.append(keep)
        M = len(nbytes)
        self.x = [None] * M          # device tensors: the kept states, or a waiting one brought back
        self.host = [None] * M       # host tensors: the waiting states
        self.ready = [None] * M      # event: the host copy (waiting) or the device copy (kept) is complete
        self.consumed = []           # events: compute has read each brought-back state, in order
        self.sent = []               # events: each new waiting state has left the device, in order

    def enter(self, m: int, gather) -> None:
        """copy_in stream: micro-batch m's first state ``gather()`` (a host tensor made on that stream), copied
        to the device when kept, else left waiting on the host."""
        p = self.p

        def first():
            rows = gather()
            if self.kept[m]:
                self.x[m] = p.meter.add(to_device(p, rows))
            else:
                self.host[m] = rows
        p.dev.submit("copy_in", traced(p.tracer, "stream_in embed rows", "copy_in", first))
        self.ready[m] = p.dev.record("copy_in")

    def before(self, m: int, result: str) -> None:
        """Host, before the compute on m: a waiting state comes back (copy_in); compute waits for it."""
        p = self.p
        if self.kept[m]:
            p.dev.wait("compute", self.ready[m])
            self.ready[m] = None
            return
        k = len(self.consumed)
        if k >= IN_FLIGHT:
            p.dev.wait("copy_in", self.consumed[k - IN_FLIGHT])
        p.dev.wait("copy_in", self.ready[m])

        def fetch():
            self.x[m] = p.meter.add(to_device(p, self.host[m]))
        p.dev.submit("copy_in", traced(p.tracer, "prefetch hidden state", "copy_in", fetch))
        p.dev.wait("compute", p.dev.record("copy_in"))
        if result == "new" and len(self.sent) >= IN_FLIGHT:
            p.dev.wait("compute", self.sent[len(self.sent) - IN_FLIGHT])

    def task(self, m: int, fn, result: str):
        """The compute work: m's state through ``fn``."""
        def work():
            x = self.x[m]
            y = fn(x)
            self.p.meter.sub(x)
            self.x[m] = self.p.meter.add(y) if result == "new" or (result == "same" and self.kept[m]) else None
        return work

    def after(self, m: int, result: str) -> None:
        """Host, after the compute on m: a new waiting state goes back to the host (copy_out)."""
        p = self.p
        if self.kept[m]:
            return
        self.consumed.append(p.dev.record("compute"))
        if result != "new":          # the host copy stays; the next fetch of m comes after this compute's read
            self.ready[m] = self.consumed[-1]
            return
        p.dev.wait("copy_out", self.consumed[-1])

        def send():
            y, self.x[m] = self.x[m], None
            self.host[m] = to_host(p, y)
            p.meter.sub(y)
        p.dev.submit("copy_out", traced(p.tracer, "offload hidden state", "copy_out", send))
        self.ready[m] = p.dev.record("copy_out")
        self.sent.append(self.ready[m])
