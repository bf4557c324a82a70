"""The scheduler: streams layer weights through device staging slots while the compute stream works.

Four primitives, each issuing work to one stream of the device (see device.py):

    stream_in(u, slot)   copy_in   unit u's working weights: pinned host store -> staging slot
    bind(u, slot)        (host)    views of the slot shaped as u's parameters (no device copy)
    compute(i, ...)      compute   forward of every micro-batch, or recompute + backward
    stream_out(acc)      copy_out  an fp32 gradient accumulator -> host grad buffer (once per step)

and ``run_step`` strings them together (what they keep on the device between them, the ``Pipeline``, is in
pipeline.py). Layers are [embed, decoder 1..L, head] as in store.py; what streams
through a slot is a ``Unit``: a decoder layer, or one vocabulary chunk of the head. Within a step the work is
layer-major: every micro-batch passes through unit u while its weights are resident, so weights cross the bus
twice per step (forward, backward) whatever the number of micro-batches.

Device memory is O(decoder layer), whatever the vocabulary: slots and accumulators hold the largest decoder
layer. The embedding table never leaves the host: the step's U distinct token ids are gathered there and only
those rows cross the bus (U·H·b in, U·H·b gradient out, with b the compute dtype's bytes). The head streams in
vocabulary chunks of V_c rows; when there is more than one, the softmax over all chunks needs two passes
(pass 1: each token's running max and sum of exp; pass 2: each chunk's logits again, its gradient, d(x̂) and the
chunk's lm_head gradient, streamed out per chunk). Against the one fused pass this costs one more logits GEMM,
2·T·H·V flops per step (8·T·H·V instead of 6·T·H·V for the head), and the head's weights cross the bus twice
(2·V·H·b in, against once for the fused pass) like every decoder layer's. The tied head's chunks are the
embedding's rows, and their gradient goes to the embedding's grad buffer.

With LoRA adapters on a frozen base (store.lora), each decoder layer's adapters stream in right after its base
weights into the same slot, the accumulators hold and stream out only the adapters' gradients (store.trainable),
and the embedding and head get none: the head still gives d(x), the embedding's backward is skipped.

Ordering, enforced with events so that the async test device catches any missing wait:
- a slot is refilled only after the compute that read it finished      (slot_free[slot])
- compute reads a slot only after its copy finished                    (slot_ready[slot])
- a gradient accumulator is zeroed for reuse only after its copy-out   (acc_free[k])
- layer i streams in only after the optimizer updated it               (host waits optimizer.layer_done(i))

Forward-only passes (``run_forward``: evaluation, DPO's reference, logits) run like the step's forward: layer-major
over a group of micro-batches, double-buffered through the slots, so the weights cross once per group (the
engine groups a pass's batches: activations.forward_group_full).

The step's activation checkpoints and their default budget are in activations.py, its embedding rows (gathered
on the host, their gradient written back) in embedding_rows.py.

Where a completed gradient goes is its sink (``gradient_sinks``): ``LocalSink`` alone, ``ReducingSink`` under data
parallel, ``FrozenSink`` for a LoRA store's embedding and head; run_step calls ``completed`` on the compute stream
and ``out`` on the host, the same calls whatever the sink.

Data parallel (``p.dist``, distributed.py): every completed fp32 gradient (a decoder layer's accumulator, a head
chunk's, the final norm's, the embedding rows') is all-reduced (summed) over the ranks by a compute-stream task
queued right after the work that completed it, so every rank issues the same reductions in the same order.
Its squared norm and its copy-out then run on the copy_out stream: on CUDA the reduction is asynchronous (NCCL
waits for the compute stream's work before it, the copy-out waits for the reduction), so it overlaps the next
layer's backward instead of holding the compute stream; on CPU (gloo) it runs inside the compute task. The
embedding rows are those of the union of every rank's token ids (the same rows on every rank, exactly the
rows one process with all ranks' micro-batches would gather). When the ranks of a node share one host store
(``store.shared``), each streams out and norms only its shard [lo, hi) of each layer (``store.shard_bounds``; of
a LoRA store, of each layer's adapters: the only gradients a frozen base has, and the only ones reduced).
"""
from __future__ import annotations

import torch

from ..models.dense import layer as lt
from .activations import Checkpoints, HiddenStates, default_checkpoint_budget
from .embedding_rows import EmbeddingRows, stream_in_embedding, write_embedding_grad
from .pipeline import Pipeline, Unit
from .trace import traced


# ------------------------------------------------------------------------------------------------------------
# the four primitives
# ------------------------------------------------------------------------------------------------------------
def stream_in(p: Pipeline, u: Unit, slot: int) -> None:
    """copy_in stream. Waits (host) for the optimizer to have updated u's layers, then (stream) for the last
    compute that read ``slot``; copies u's working weights into the slot and records slot_ready[slot]."""
    for j in p.sources(u):
        p.optimizer.wait_layer(j)
        p.store.wait_pinned(j)    # host: only before the first copy of j while pinning runs (covers its grad too)
    p.dev.wait("copy_in", p.slot_free[slot])
    hosts = p.head_segments(p.store.working, u) if u.layer == p.head else [p.store.working[u.layer]]
    if p.store.lora is not None and u.layer != p.head:
        hosts.append(p.store.trainable.working[u.layer])      # the layer's adapters, right after its base
    dst, offset = p.slots[slot], 0
    for host in hosts:
        seg = dst[offset:offset + host.numel()]

        def copy(seg=seg, host=host):
            seg.copy_(host, non_blocking=True)
            p.meter.copied(host, to_device=True)
        p.dev.submit("copy_in", traced(p.tracer, f"stream_in {p.name(u)}", "copy_in", copy))
        offset += host.numel()
    p.slot_ready[slot] = p.dev.record("copy_in")


def bind(p: Pipeline, u: Unit, slot: int) -> dict[str, torch.Tensor]:
    """Host only: u's parameters as views into the slot (nothing is copied on the device)."""
    if u.layer != p.head:
        layout = p.store.layouts[u.layer]
        w = layout.views(p.slots[slot][:layout.numel])
        if p.store.lora is not None:                           # A, B and their scale (layer.LORA_SCALE)
            adapters = p.store.trainable.layouts[u.layer]
            w.update(adapters.views(p.slots[slot][layout.numel:layout.numel + adapters.numel]))
            w[lt.LORA_SCALE] = p.store.lora.scale
        return w
    H, n = p.cfg.hidden_size, u.stop - u.start
    return {"lm_head": p.slots[slot][:n * H].view(n, H), "norm": p.slots[slot][n * H:(n + 1) * H]}


def compute(p: Pipeline, i: int, slot: int | None, work, name: str) -> None:
    """compute stream. Waits for slot_ready[slot], runs ``work`` (every micro-batch through layer i), then
    records slot_free[slot] so the copy-in stream may refill the slot."""
    if slot is not None:
        p.dev.wait("compute", p.slot_ready[slot])
    p.dev.submit("compute", traced(p.tracer, name, "compute", work))
    if slot is not None:
        p.slot_free[slot] = p.dev.record("compute")


def stream_out(p: Pipeline, name: str, acc: torch.Tensor, host: torch.Tensor, before=None):
    """copy_out stream. Waits for the compute that finished a gradient and copies the fp32 accumulator ``acc``
    into ``host`` (a host grad buffer or a slice of it; on CUDA rounded on the device first: half the bus bytes
    in bf16 mode), after running ``before()`` on the stream (data parallel: the wait for the reduction, the
    norm). Returns the event after which the accumulator may be reused."""
    p.dev.wait("copy_out", p.dev.record("compute"))

    def copy():
        if before is not None:
            before()
        p.meter.copied(host, to_device=False)
        if acc.device.type == "cpu":
            host.copy_(acc)
            return
        staged = acc.to(host.dtype)
        host.copy_(staged, non_blocking=True)
        p.dev.retain(staged, "copy_out")    # freed now, its memory reused only after the copy has run
    p.dev.submit("copy_out", traced(p.tracer, f"stream_out {name}", "copy_out", copy))
    return p.dev.record("copy_out")


# ------------------------------------------------------------------------------------------------------------
# where a completed gradient goes
# ------------------------------------------------------------------------------------------------------------
class LocalSink:
    """One process: a completed gradient's squared norm is taken on the compute stream, by the work that completed
    it, into totals[key]; then it streams out whole."""
    takes_gradient = True

    def __init__(self, p: Pipeline, totals: dict):
        self.p, self.totals = p, totals

    def completed(self, key: str, acc: torch.Tensor) -> None:
        """Compute stream, once ``acc`` holds its gradient."""
        self.totals[key] = _sq_norm(acc)

    def out(self, name: str, acc: torch.Tensor, host: torch.Tensor, key: str, layer: int | None, offset: int = 0,
            norm: bool = True):
        """Host, right after submitting the compute that completed the fp32 gradient ``acc``: elements
        [offset, offset + n) of host layer ``layer`` (None: not a layer's), to go into ``host`` (the same range
        of its grad buffer). Returns the event after which ``acc`` may be reused."""
        return stream_out(self.p, name, acc, host)


class ReducingSink(LocalSink):
    """Data parallel: a compute task sums ``acc`` over the ranks; then, on the copy_out stream, the squared norm of
    this rank's shard of it into totals[key] (if ``norm``) and the shard's copy (layer None: all of it). Sharded
    (a node-shared store), the sum is a reduce-scatter inside the node onto each local rank's shard (half an
    all-reduce's bytes), then an all-reduce of the shard across the nodes: only this rank's shard of ``acc``
    holds the sum."""

    def completed(self, key: str, acc: torch.Tensor) -> None:
        """Nothing on the compute stream: ``out`` norms the reduced gradient on the copy_out stream."""

    def out(self, name: str, acc: torch.Tensor, host: torch.Tensor, key: str, layer: int | None, offset: int = 0,
            norm: bool = True):
        p, n = self.p, acc.numel()

        def within(lo: int, hi: int) -> tuple[int, int]:          # a layer's element range, in acc's positions
            a = min(max(lo - offset, 0), n)
            return a, max(a, min(hi - offset, n))
        parts = None
        if layer is None:
            a, b = 0, n
        elif p.sharded:
            local_world = p.store.shared.local_world
            bounds = [within(*p.store.shard_bounds(layer, r, local_world)) for r in range(local_world)]
            parts = [acc[x:y] for x, y in bounds]                 # every local rank's shard, covering acc
            a, b = bounds[p.store.shared.local_rank]
        else:
            a, b = 0, n
        pending = []

        def reduce():
            p.meter.reduced(acc)
            pending.append(p.dist.reduce_gradient(acc, asynchronous=p.dev.type == "cuda", shards=parts))
        p.dev.submit("compute", traced(p.tracer, f"all_reduce {name}", "compute", reduce))

        def reduced():
            if pending[0] is not None:
                pending[0].wait()                   # CUDA: this stream waits for the reduction, the host does not
            self.totals[key] = _sq_norm(acc[a:b]) if norm else 0.0
        return stream_out(p, name, acc[a:b], host[a:b], before=reduced)


class FrozenSink:
    """A frozen part of the model (LoRA's base: the embedding and the head): it forms no gradient, so nothing is
    normed or streamed out (the head still gives d(x))."""
    takes_gradient = False

    def completed(self, key: str, acc) -> None:
        pass

    def out(self, *args, **kwargs) -> None:
        return None


def gradient_sinks(p: Pipeline, totals: dict):
    """(the decoder layers' sink, the embedding's and head's): local or reducing (data parallel), and frozen for
    the embedding and head of a LoRA store."""
    trained = ReducingSink(p, totals) if p.dist is not None else LocalSink(p, totals)
    return trained, FrozenSink() if p.store.lora is not None else trained


NORM_ROW = 1024   # elements of each fp32 partial sum in _sq_norm


def _sq_norm(acc: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm as a float64 device scalar: the fp32 norms of rows of NORM_ROW elements, their squares
    summed in float64. One fp32 reduction over a layer of millions of elements is off by up to ~1e-3 relative on
    CPU; this stays within ~1e-8 of the float64 norm, with one reduction kernel and no layer-sized temporary
    (casting the layer to float64 would need twice its size, and is ~10x slower on CPU)."""
    acc = acc.reshape(-1)                                  # any contiguous accumulator: a layer's, or rows [U, H]
    full = acc.numel() // NORM_ROW * NORM_ROW
    rows = torch.linalg.vector_norm(acc[:full].view(-1, NORM_ROW), dim=1)          # [numel // NORM_ROW] fp32
    tail = torch.linalg.vector_norm(acc[full:], dtype=torch.float64)
    return rows.double().square().sum() + tail.square()


# ------------------------------------------------------------------------------------------------------------
# one optimizer step's forward and backward
# ------------------------------------------------------------------------------------------------------------
def merged_microbatches(p: Pipeline) -> int:
    """Micro-batches that pass each decoder layer of a step together (TrainConfig.moe_merge_microbatches): only
    where the layer template runs fused MoE experts (generic models: their grouped GEMMs then run once over all
    the group's tokens), else 1."""
    return p.merge_microbatches if getattr(p.template, "fused_experts", False) else 1


def run_step(p: Pipeline, mbs: list[lt.MicroBatch], grad_scale: float, preference=None):
    """Embedding rows in, forward through every decoder layer, the head (its backward included) in vocabulary
    chunks, then the backward in reverse and the embedding rows' gradients out.

    ``preference`` (a preference.DPOHead): the DPO objective instead of the mean cross-entropy. The head then
    always takes its two passes, even over one chunk: the first pass's statistics give each sequence's summed
    log-prob, the DPO loss and every token's weight, which the second pass uses in place of grad_scale.

    Returns (loss_sum, squared gradient norm) as device scalars, after one sync at the end of the backward (with
    ``preference``, loss_sum is the sum of the pairs' losses). With the template's router auxiliary loss, loss_sum
    also holds coef·(its mean over the step's micro-batches)/grad_scale, and the mean is left in
    ``router_balance.step_aux``."""
    S, cfg, ops, L, H = len(p.slots), p.cfg, p.ops, p.cfg.num_layers, p.cfg.hidden_size
    tpl = p.template                            # the decoder layers' and the head's computations
    M = len(mbs)
    hidden = [None] * M                         # the activation flowing forward, per micro-batch
    grads = [None] * M                          # d(activation) flowing backward, per micro-batch
    emb = EmbeddingRows(p, mbs)
    # micro-batches through a decoder layer together (their MoE experts run once over all their tokens)
    together = merged_microbatches(p)
    groups = [list(range(m, min(m + together, M))) for m in range(0, M, together)]
    budget, free = p.checkpoint_budget, p.dev.free_memory()
    if budget is None and free is not None:      # the configured budget overrides; CPU devices keep every one
        budget = default_checkpoint_budget(p, free, [mb.shape for mb in mbs], emb.ids.numel(), together)
    ckpt = Checkpoints(p, L, M, budget)         # ckpt i: input of decoder layer i (1..L)
    act_bytes = [mb.input_ids.numel() * H * p.store.compute_dtype.itemsize for mb in mbs]
    totals = {}                                 # device scalars written by compute work
    head = {}                                   # the head's per-micro-batch state: xn, rstd, stats, lse, d_xn
    #                                             (and with preference: scale, the per-token weights [T] fp32)
    trained = p.store.trainable                 # the gradients' layouts and host buffers (LoRA: the adapters')
    sink, edge = gradient_sinks(p, totals)      # the decoder layers' gradients; the embedding's and the head's
    acc_turn = [0]
    balance = tpl.router_balance                # the MoE router's auxiliary loss (models/generic/router_balance)
    if balance is not None:
        if preference is not None:
            raise ValueError("DPO with the router auxiliary loss (output_router_logits=True in the model's config) "
                             "is not supported yet; set output_router_logits=False")
        balance.begin(mbs, M * (p.dist.world if p.dist is not None else 1))

    def run_layers(plan) -> None:
        """The ping-pong: plan[pos] = (unit, make_work, after) computes from slot pos % S while the next S-1
        units stream in. make_work(w) -> the compute work on the bound weights; after() runs on the host.

        Unit pos's compute is submitted before the stream-in of the unit S-1 ahead: that stream-in first waits on
        the host for the optimizer to have updated its layer, and compute pos must not wait with it."""
        for pos in range(min(S - 1, len(plan))):
            stream_in(p, plan[pos][0], pos % S)
        for pos, (u, make_work, after) in enumerate(plan):
            work = make_work(bind(p, u, pos % S))
            compute(p, u.layer, pos % S, work, f"{make_work.__name__} {p.name(u)}")
            if after is not None:
                after()
            if pos + S - 1 < len(plan):     # refills the slot of compute pos-1 (stream_in waits for it)
                stream_in(p, plan[pos + S - 1][0], (pos + S - 1) % S)

    def take_acc(numel: int):
        """The next ping-pong accumulator (its previous gradient has left the device before compute zeroes it)."""
        k = acc_turn[0] % 2
        acc_turn[0] += 1
        p.dev.wait("compute", p.acc_free[k])
        return k, p.accs[k][:numel]

    def give_acc(to, k: int, name: str, acc: torch.Tensor, host: torch.Tensor, key: str, layer: int,
                 offset: int) -> None:
        p.acc_free[k] = to.out(name, acc, host, key, layer, offset)

    # ---- embedding ---------------------------------------------------------------------------------------
    def embed():
        for m in range(M):
            hidden[m] = p.meter.add(lt.embed_forward(emb.rows, emb.index[m]))
        p.meter.sub(emb.rows)
        emb.rows = None

    def embed_backward(d_rows):
        """d_rows None (a frozen embedding): the first decoder layer's d(x) has nowhere to go."""
        for m in range(M):
            if d_rows is not None:
                lt.embed_backward(d_rows, emb.index[m], grads[m], mbs[m].embed_grad_mask)
            p.meter.sub(grads[m])
            grads[m] = None
        edge.completed("sq_embed", d_rows)

    # ---- decoder layers ----------------------------------------------------------------------------------
    def decoder_step(u: Unit):
        def forward(w):
            def decoder():
                for group in groups:
                    xs = [hidden[m] for m in group]
                    outs = ([tpl.decoder_forward(ops, cfg, w, xs[0], mbs[group[0]], u.layer)] if len(group) == 1
                            else tpl.decoders_forward(ops, cfg, w, xs, [mbs[m] for m in group], u.layer))
                    for m, x, out in zip(group, xs, outs):
                        hidden[m] = p.meter.add(out)
                        p.meter.sub(x)
            return decoder
        return u, forward, (lambda: ckpt.save(u.layer + 1, hidden, act_bytes)) if u.layer < L else None

    def decoder_backward_step(u: Unit):
        state = {}

        def backward(w):
            if u.layer > 1:
                ckpt.prefetch(u.layer - 1)       # one layer ahead of the backward
            ckpt.wait(u.layer)
            state["k"], acc = take_acc(trained.layouts[u.layer].numel)
            g = trained.layouts[u.layer].views(acc)

            def decoder():
                acc.zero_()
                for group in groups:
                    xs = [ckpt.pop(u.layer, m) for m in group]
                    dxs = ([tpl.decoder_backward(ops, cfg, w, g, xs[0], mbs[group[0]], grads[group[0]], u.layer)]
                           if len(group) == 1 else
                           tpl.decoders_backward(ops, cfg, w, g, xs, [mbs[m] for m in group],
                                                 [grads[m] for m in group], u.layer))
                    for m, dx in zip(group, dxs):
                        p.meter.sub(grads[m])
                        grads[m] = p.meter.add(dx)
                sink.completed(f"sq_{u.layer}", acc)
            state["acc"] = acc
            return decoder
        return u, backward, lambda: give_acc(sink, state["k"], p.name(u), state["acc"], trained.grad[u.layer],
                                             f"sq_{u.layer}", u.layer, 0)

    # ---- head --------------------------------------------------------------------------------------------
    def head_gradient(u: Unit, state: dict):
        """Host: chunk u's accumulator (state: its ping-pong index, for head_out) and the gradient views; a frozen
        head none (the norm's gradient goes to a scratch: only d(x) is wanted)."""
        if not edge.takes_gradient:
            state["k"], state["acc"] = None, None
            return None, {"lm_head": None, "norm": p.norm_acc}
        state["k"], state["acc"] = take_acc((u.stop - u.start) * H)
        if cfg.tie_word_embeddings:
            emb.grad()                           # the chunks hand the gathered rows' gradient to the embedding
        return state["acc"], {"lm_head": state["acc"].view(-1, H), "norm": p.norm_acc}

    def head_gradient_done(u: Unit, acc: torch.Tensor) -> None:
        """Compute stream, after every micro-batch's lm_head gradient of chunk u is in acc: when tied, the rows
        the embedding also gathered move to its row gradient (one sum, rounded once), zero here."""
        if acc is None:
            return
        if cfg.tie_word_embeddings:
            lo, hi = emb.locate(u.start, u.stop)
            if hi > lo:
                local = emb.ids_dev[lo:hi] - u.start
                rows = acc.view(-1, H)
                emb.d_rows[lo:hi] = rows.index_select(0, local)
                rows.index_fill_(0, local, 0.0)
        edge.completed(f"sq_head{u.start}", acc)

    def head_out(k: int, u: Unit, acc: torch.Tensor, last: bool) -> None:
        if not edge.takes_gradient:
            return
        rows, norm = p.head_segments(p.store.grad, u)
        layer, offset, norm_offset = p.head_offsets(u)
        give_acc(edge, k, p.name(u), acc, rows, f"sq_head{u.start}", layer, offset)
        if last:
            edge.out("head norm", p.norm_acc, norm, "sq_norm", p.head, norm_offset)

    def head_fused_step(u: Unit):
        """One chunk holds the whole vocabulary: the fused one-pass cross-entropy."""
        state = {}

        def forward(w):
            acc, g = head_gradient(u, state)

            def head_loss():
                if acc is not None:
                    acc.zero_()
                p.norm_acc.zero_()
                loss = torch.zeros((), dtype=torch.float32, device=p.norm_acc.device)
                for m, mb in enumerate(mbs):
                    loss_m, dx = tpl.head_forward_backward(ops, cfg, w, g, hidden[m], mb, grad_scale)
                    loss += loss_m
                    p.meter.sub(hidden[m])
                    hidden[m], grads[m] = None, p.meter.add(dx)
                totals["loss"] = loss
                edge.completed("sq_norm", p.norm_acc)     # frozen: the norm's gradient is scratch
                head_gradient_done(u, acc)
            return head_loss
        return u, forward, lambda: head_out(state["k"], u, state["acc"], last=True)

    def head_stats_step(u: Unit, first: bool, last: bool):
        """Pass 1 over the chunks: per-token running max and sum of exp, and the target's logit."""
        def forward(w):
            def head_stats():
                for m, mb in enumerate(mbs):
                    if first:
                        xn, rstd = tpl.head_norm(ops, cfg, w, hidden[m])
                        T = xn.shape[0]
                        stats = [torch.full((T,), float("-inf"), device=xn.device),           # row_max
                                 xn.new_zeros(T, dtype=torch.float32),                          # row_sum
                                 xn.new_zeros(T, dtype=torch.float32)]                          # target_logit
                        head[m] = dict(xn=p.meter.add(xn), rstd=p.meter.add(rstd),
                                       stats=[p.meter.add(t) for t in stats])
                    tpl.head_chunk_stats(ops, w, head[m]["xn"], mb, u.start, head[m]["stats"])
                    if last:
                        stats = head[m].pop("stats")
                        loss_m, head[m]["lse"] = ops.cross_entropy_chunk_loss(*stats, mb.targets)
                        if preference is not None:     # DPO: the pairs' losses, each token's weight for pass 2
                            loss_m, scale = preference.token_weights(mb, head[m]["lse"], stats[2])
                            head[m]["scale"] = p.meter.add(scale)
                        totals["loss"] = loss_m if m == 0 else totals["loss"] + loss_m
                        p.meter.add(head[m]["lse"])
                        for t in stats:
                            p.meter.sub(t)
            return head_stats
        return u, forward, None

    def head_grad_step(u: Unit, first: bool, last: bool):
        """Pass 2 over the chunks: each chunk's logits again, its lm_head gradient and its share of d(x̂)."""
        state = {}

        def forward(w):
            acc, g = head_gradient(u, state)

            def head_grad():
                if acc is not None:
                    acc.zero_()
                for m, mb in enumerate(mbs):
                    s = head[m]
                    if first:
                        s["d_xn"] = p.meter.add(torch.zeros(s["xn"].shape, dtype=torch.float32,
                                                            device=s["xn"].device))
                    tpl.head_chunk_backward(ops, w, g, s["xn"], mb, u.start, s["lse"], s.get("scale", grad_scale),
                                           s["d_xn"])
                head_gradient_done(u, acc)
                if not last:
                    return
                p.norm_acc.zero_()
                for m in range(M):
                    s = head.pop(m)
                    dx = tpl.head_norm_backward(ops, w, g, hidden[m], s["rstd"], s["d_xn"])
                    for t in (hidden[m], s["xn"], s["rstd"], s["lse"], s["d_xn"], s.get("scale")):
                        if t is not None:
                            p.meter.sub(t)
                    hidden[m], grads[m] = None, p.meter.add(dx)
                edge.completed("sq_norm", p.norm_acc)     # frozen: the norm's gradient is scratch
            return head_grad
        return u, forward, lambda: head_out(state["k"], u, state["acc"], last)

    chunks = p.head_chunks()
    if len(chunks) == 1 and preference is None:
        head_plan = [head_fused_step(chunks[0])]
    else:
        K = len(chunks)
        head_plan = ([head_stats_step(u, c == 0, c == K - 1) for c, u in enumerate(chunks)]
                     + [head_grad_step(u, c == 0, c == K - 1) for c, u in enumerate(chunks)])

    stream_in_embedding(p, emb)
    p.dev.wait("compute", emb.ready)
    compute(p, 0, None, embed, "forward embed")
    if L:
        ckpt.save(1, hidden, act_bytes)
    run_layers([decoder_step(Unit(i)) for i in range(1, L + 1)] + head_plan)   # decoders, the head's passes
    if balance is not None:           # every layer's routing is known: the aux loss, and its backward weights
        compute(p, p.head, None, lambda: balance.finish_forward(totals, grad_scale), "router aux loss")
    ckpt.prefetch(L)
    run_layers([decoder_backward_step(Unit(i)) for i in range(L, 0, -1)])    # decoders L..1, recomputed
    d_rows = emb.grad() if edge.takes_gradient else None
    compute(p, 0, None, lambda: embed_backward(d_rows),                     # needs no weights: a scatter-add
            "backward embed" if d_rows is not None else "backward embed (frozen: nothing)")
    if d_rows is not None:
        rows_grad = p.dev.host_empty((emb.ids.numel() * H,), p.store.grad[0].dtype)
        # every rank takes every row (each writes its shard of them); one rank of a node norms them
        edge.out("embed rows", d_rows.view(-1), rows_grad, "sq_embed", None,
                 norm=not p.sharded or p.store.shared.local_rank == 0)

    # sync: the loss and the gradient norm are needed on the host to clip and to report
    p.dev.sync(p.dev.record("compute"))
    p.dev.sync(p.dev.record("copy_out"))
    if d_rows is not None:
        write_embedding_grad(p, emb, rows_grad)
    emb.release()
    if balance is not None:
        balance.end()
    sq = sum(v for k, v in totals.items() if k.startswith("sq_"))
    return totals["loss"], sq


# ------------------------------------------------------------------------------------------------------------
# a forward-only pass
# ------------------------------------------------------------------------------------------------------------
def run_forward(p: Pipeline, mbs: list[lt.MicroBatch], budget: int | None, head_chunk, finish=None) -> None:
    """The forward of every micro-batch of ``mbs`` (a group of a pass), layer-major as run_step's forward: every
    decoder layer and head chunk streams in once, through the slots' ping-pong, and computes every micro-batch
    while resident. Their hidden states stay on the device within ``budget`` bytes, the rest wait on the host
    (activations.HiddenStates). Each micro-batch's embedding rows are gathered on the host.

    At the head, on the compute stream: ``head_chunk(m, xn, w, u)`` for each vocabulary chunk u (bound weights
    w) and micro-batch m, with xn its final-normed hidden state [T, H] (normed once, with the first chunk's
    norm), and ``finish(m)`` after m's last chunk. Returns after a sync: what they wrote is ready."""
    S, cfg, ops, H, tpl = len(p.slots), p.cfg, p.ops, p.cfg.hidden_size, p.template
    states = HiddenStates(p, [mb.host_ids.numel() * H * p.store.compute_dtype.itemsize for mb in mbs], budget)
    p.optimizer.wait_layer(0)
    table = p.store.working[0].view(-1, H)
    for m, mb in enumerate(mbs):
        def gather(mb=mb):
            rows = p.dev.host_empty((mb.host_ids.numel(), H), table.dtype)
            return torch.index_select(table, 0, mb.host_ids, out=rows)
        states.enter(m, gather)
    chunks = p.head_chunks()
    units = [Unit(i) for i in range(1, p.head)] + chunks

    def through(u: Unit, w: dict, m: int):
        """(what m's state goes through in unit u, what becomes of its output: HiddenStates.before's result)."""
        if u.layer < p.head:
            return (lambda x: tpl.decoder_forward(ops, cfg, w, x, mbs[m], u.layer)), "new"
        first, last = u == chunks[0], u == chunks[-1]

        def head(x):
            xn = tpl.head_norm(ops, cfg, w, x)[0] if first else x
            head_chunk(m, xn, w, u)
            if last and finish is not None:
                finish(m)
            return xn
        return head, "drop" if last else "new" if first else "same"

    for pos in range(min(S - 1, len(units))):
        stream_in(p, units[pos], pos % S)
    for pos, u in enumerate(units):
        w = bind(p, u, pos % S)
        for m in range(len(mbs)):
            fn, result = through(u, w, m)
            states.before(m, result)
            compute(p, u.layer, pos % S, states.task(m, fn, result), f"forward {p.name(u)}")
            states.after(m, result)
        if pos + S - 1 < len(units):     # refills the slot of compute pos-1 (stream_in waits for it)
            stream_in(p, units[pos + S - 1], (pos + S - 1) % S)
    # sync: the caller reads what the head wrote
    p.dev.sync(p.dev.record("compute"))
    p.dev.sync(p.dev.record("copy_out"))
