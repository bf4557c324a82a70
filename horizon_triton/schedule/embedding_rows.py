"""The step's embedding rows (scheduler.run_step): the table never leaves the host; the distinct token ids of the
step are gathered there, cross the bus once, and their fp32 gradients come back and are written into the
embedding's grad buffer (within this rank's shard under data parallel)."""
from __future__ import annotations

import torch

from ..models.dense import layer as lt
from .pipeline import Pipeline
from .trace import traced


class EmbeddingRows:
    """The step's embedding rows. The table stays on the host: the distinct token ids of all micro-batches
    (sorted, found on the host, no sync) are gathered there and cross the bus once; each token reads its row
    through ``index``. The backward accumulates fp32 gradients of those rows only, which the host writes into
    the embedding's grad buffer at the end of the step (every other row is zero, or the tied head's gradient)."""

    def __init__(self, p: Pipeline, mbs: list[lt.MicroBatch]):
        self.p = p
        host_ids = torch.cat([mb.host_ids for mb in mbs])
        self.ids, index = torch.unique(host_ids, return_inverse=True)                                # host
        if p.dist is not None:    # every rank gathers the rows of every rank's ids: the reductions line up
            self.ids = p.dist.union_ids(self.ids, p.cfg.vocab_size)
            index = torch.searchsorted(self.ids, host_ids)
        self.index_host = index.split([mb.host_ids.numel() for mb in mbs])
        self.rows = None          # device [U, H] compute dtype, during the embedding's forward
        self.index = None         # device, per micro-batch [T] int64: positions in ids
        self.index_all = None     # the tensor those are views of
        self.ids_dev = None       # device [U] int64 (tied: the head's chunks pick these rows of their gradient)
        self.d_rows = None        # device fp32 [U, H], from the head (tied) or the embedding's backward on
        self.ready = None         # event: rows and indices are on the device

    def locate(self, start: int, stop: int) -> tuple[int, int]:
        """Host: the positions [lo, hi) in ids of the rows inside [start, stop) (ids are sorted)."""
        lo, hi = torch.searchsorted(self.ids, torch.tensor([start, stop])).tolist()
        return lo, hi

    def grad(self) -> torch.Tensor:
        """Host, when the compute work that first adds to it is made: the fp32 row gradient, zeroed (the
        tied head needs it from its first gradient chunk on, the untied embedding from its backward)."""
        if self.d_rows is None:
            self.d_rows = self.p.meter.add(torch.zeros(self.ids.numel(), self.p.cfg.hidden_size,
                                                       dtype=torch.float32, device=self.p.dev.torch_device))
        return self.d_rows

    def release(self) -> None:
        """Host, after the step's last sync: what the engine's bookkeeping still counts."""
        for t in (self.index_all, self.ids_dev, self.d_rows):
            if t is not None:
                self.p.meter.sub(t)


def to_device(p: Pipeline, host: torch.Tensor) -> torch.Tensor:
    """copy_in stream: a device copy of a host tensor, through a pinned buffer where the device copies
    asynchronously; kept alive for the compute stream that reads it."""
    if p.dev.pin_memory and not p.dev.is_pinned(host):
        staged = p.dev.host_empty(host.shape, host.dtype)
        staged.copy_(host)
        host = staged
    x = torch.empty(host.shape, dtype=host.dtype, device=p.dev.torch_device)
    x.copy_(host, non_blocking=True)
    p.meter.copied(host, to_device=True)
    p.dev.retain(x, "compute")
    return x


def stream_in_embedding(p: Pipeline, emb: EmbeddingRows) -> None:
    """copy_in stream. Waits (host) for the optimizer to have updated the embedding; gathers the step's rows of
    the host table (host work, into pinned memory on CUDA) and copies them and each token's row index in."""
    p.optimizer.wait_layer(0)
    H = p.cfg.hidden_size

    def copy():
        table = p.store.working[0].view(-1, H)
        host_rows = p.dev.host_empty((emb.ids.numel(), H), table.dtype)
        torch.index_select(table, 0, emb.ids.to(table.device), out=host_rows)
        host_index = torch.cat(emb.index_host)
        rows, index = to_device(p, host_rows), to_device(p, host_index)
        if p.cfg.tie_word_embeddings:
            emb.ids_dev = p.meter.add(to_device(p, emb.ids))
        emb.rows, emb.index_all = p.meter.add(rows), p.meter.add(index)
        emb.index = index.split([t.numel() for t in emb.index_host])
    p.dev.submit("copy_in", traced(p.tracer, "stream_in embed rows", "copy_in", copy))
    emb.ready = p.dev.record("copy_in")


def write_embedding_grad(p: Pipeline, emb: EmbeddingRows, rows: torch.Tensor) -> None:
    """Host, after the step's last copy-out: the gathered rows' gradients into the embedding's grad buffer.
    Untied, the rows the last step wrote are zeroed first (the rest are still zero); tied, the head's chunks
    wrote every row this step (zeros where these rows go)."""
    ids = emb.ids.to(p.store.grad[0].device)    # the store's device: the host (meta in a dry run)
    if not p.cfg.tie_word_embeddings:
        if p.embed_grad_rows is not None:
            _write_rows(p, p.embed_grad_rows, None)
        p.embed_grad_rows = ids
    _write_rows(p, ids, rows.view(-1, p.cfg.hidden_size))


def _write_rows(p: Pipeline, ids: torch.Tensor, rows: torch.Tensor | None) -> None:
    """Host: embedding grad rows ``ids`` = ``rows`` (None: zeros), within this rank's shard of the embedding only
    (a shard's bounds may cut a row: its part is written element-wise)."""
    H = p.cfg.hidden_size
    flat = p.store.grad[0]
    grad = flat.view(-1, H)
    lo, hi = p.shard(0)
    if (lo, hi) == (0, flat.numel()):
        grad.index_fill_(0, ids, 0) if rows is None else grad.index_copy_(0, ids, rows)
        return
    whole = (ids * H >= lo) & ((ids + 1) * H <= hi)
    if rows is None:
        grad.index_fill_(0, ids[whole], 0)
    else:
        grad.index_copy_(0, ids[whole], rows[whole])
    for k in (~whole & (ids * H < hi) & ((ids + 1) * H > lo)).nonzero().reshape(-1).tolist():
        start, r = int(ids[k]) * H, slice(max(lo - int(ids[k]) * H, 0), min(hi - int(ids[k]) * H, H))
        flat[start + r.start:start + r.stop] = 0 if rows is None else rows[k, r]
