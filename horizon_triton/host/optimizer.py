"""Optimizer driver: the CPU AdamW over the host store, one layer at a time, on a worker thread.

After the backward the global gradient norm is known, so clipping is exact (torch.nn.utils.clip_grad_norm_'s
coefficient, folded into the update as grad_scale). The worker then updates layers 0, 1, 2, … in order and
marks each one done, so the next step's forward can stream layer i in as soon as layer i is updated while the
update of the later layers continues. In bf16 mode the working weights are the high half of the master, so the
update rewrites them in place; in fp32 mode the master is what streams.

The update runs on ``optimizer_threads`` OpenMP threads (default: every core but one, which stays free for the
thread that launches the device's kernels and copies).

Sharded (``shard=(local_rank, local_world)``, on a store shared by a node's local ranks): each rank's driver
updates only its elements of every layer (store.shard_bounds), on its part of the node's cores, and records
each finished layer on the store's board (node_store.py); wait_layer(i) then returns when every local rank has
updated its part of layer i, and raises, naming the rank, if one of them failed, died or hung. The shards round
as the whole layer does (the 8-bit moments' stochastic rounding is seeded by the element's index in the layer),
so the node's update is the unsharded one bit for bit.
"""
from __future__ import annotations

import threading

from horizon_triton.kernels.cpu_adam import (adamw_step_, adamw_step_split_, adamw_step_split_8bit_,
                                             default_num_threads)
from horizon_triton.kernels.host_formats import QBLOCK, num_blocks

from ..config import TrainConfig
from .store import HostStore


def clip_coefficient(total_norm: float, max_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1."""
    if not max_norm:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def optimizer_threads(train_cfg: TrainConfig, local_world: int = 1) -> int:
    """TrainConfig.optimizer_threads, or this process's share of the cores it may use (all of them divided
    between the ``local_world`` ranks that share them) but one, at least one. A launcher that already binds each
    rank to cores of its own gives it fewer: set optimizer_threads then."""
    if train_cfg.optimizer_threads is not None:
        return train_cfg.optimizer_threads
    return max(1, default_num_threads() // local_world - 1)


class OptimizerDriver:
    def __init__(self, store: HostStore, train_cfg: TrainConfig, shard: tuple[int, int] | None = None):
        """shard: (local_rank, local_world) to update only that rank's part of every layer of a store shared by
        local_world ranks (the store's NodeShare must say the same); None updates all of it."""
        self.store = store
        self.cfg = train_cfg
        rank, world = shard if shard is not None else (0, 1)
        if shard is not None and world > 1:
            share = store.shared
            if share is None or (share.local_rank, share.local_world) != (rank, world):
                raise ValueError(f"OptimizerDriver shard={shard} needs a store shared by {world} local ranks as rank "
                                 f"{rank}; the store's NodeShare is {share}")
        self.shard = shard
        self._board = store.board if world > 1 else None
        self._bounds = [store.shard_bounds(i, rank, world) if world > 1 else (0, store.trainable.layouts[i].numel)
                        for i in range(store.num_layers)]
        self._generation = 0                # updates started: the same count on every local rank
        self.num_threads = optimizer_threads(train_cfg, world)
        self._done = [threading.Event() for _ in range(store.num_layers)]
        for event in self._done:
            event.set()                     # before the first step every layer's weights are current
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.tracer = None

    def wait_layer(self, i: int) -> None:
        """Host blocks until layer i holds this step's updated weights (every local rank's part of them)."""
        self._done[i].wait()
        self._raise()
        if self._board is not None:
            self._board.wait_layer(i, self._generation)

    def wait_all(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()
        if self._board is not None:
            self._board.wait_all(self._generation)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def start_step(self, step: int, lr: float, grad_scale: float) -> None:
        """Begins the update of every layer on a worker thread; returns at once."""
        self.wait_all()
        for event in self._done:
            event.clear()
        self._generation += 1
        self._thread = threading.Thread(target=self._run, args=(step, lr, grad_scale), daemon=True,
                                        name="cpu-adamw")
        self._thread.start()

    def _run(self, step: int, lr: float, grad_scale: float) -> None:
        try:
            for i in range(self.store.num_layers):
                if self.tracer is not None:
                    self.tracer.wrap(f"adamw {self.store.layouts[i].name}", "optimizer",
                                     lambda i=i: self.update_layer(i, step, lr, grad_scale))()
                else:
                    self.update_layer(i, step, lr, grad_scale)
                if self._board is not None:      # first: a wait that sees the event finds this rank's mark
                    self._board.mark_done(i, self._generation)
                self._done[i].set()
        except BaseException as e:
            if self._board is not None:      # first: this rank may raise it and exit as soon as _error is set
                self._board.mark_failed(f"its optimizer update of step {step} raised {type(e).__name__}: {e}")
            self._error = e
        finally:
            for event in self._done:  # never leave the streaming side waiting forever
                event.set()

    def update_layer(self, i: int, step: int, lr: float, grad_scale: float) -> None:
        """Updates this driver's elements [lo, hi) of layer i (all of it unsharded), cut where the decayed
        matrices end and the norms and biases begin."""
        s, c = self.store.trainable, self.cfg       # the store itself, or a LoRA store's adapters (none: no-op)
        lo, hi = self._bounds[i]
        split = s.layouts[i].decay_numel
        hyper = dict(step=step, lr=lr, beta1=c.betas[0], beta2=c.betas[1], eps=c.eps, grad_scale=grad_scale,
                     num_threads=self.num_threads)
        parts = ((lo, min(hi, split), c.weight_decay), (max(lo, split), hi, 0.0))
        grad = s.grad[i]
        if not s.split_master:
            master = s.master[i]
            for a, b, wd in parts:
                if b > a:
                    adamw_step_(master[a:b], grad[a:b], s.exp_avg[i][a:b], s.exp_avg_sq[i][a:b], None,
                                weight_decay=wd, **hyper)
            return
        weights, low = s.working[i], s.master_low[i]
        if s.optimizer_states == "8bit":
            # the matrices' moments are 8-bit codes; the norms' and biases' (exp_avg[i]: [n - split]) stay fp32
            (a, b, wd), (rest_a, rest_b, _) = parts
            if b > a:
                q, blocks = s.buffers, slice(a // QBLOCK, num_blocks(b))
                adamw_step_split_8bit_(weights[a:b], low[a:b], grad[a:b], q("exp_avg_q")[i][a:b],
                                       q("exp_avg_scale")[i][blocks], q("exp_avg_sq_q")[i][a:b],
                                       q("exp_avg_sq_scale")[i][blocks], weight_decay=wd, seed=i, first_index=a,
                                       **hyper)
            if rest_b > rest_a:
                adamw_step_split_(weights[rest_a:rest_b], low[rest_a:rest_b], grad[rest_a:rest_b],
                                  s.exp_avg[i][rest_a - split:rest_b - split],
                                  s.exp_avg_sq[i][rest_a - split:rest_b - split], weight_decay=0.0, **hyper)
            return
        for a, b, wd in parts:
            if b > a:
                adamw_step_split_(weights[a:b], low[a:b], grad[a:b], s.exp_avg[i][a:b], s.exp_avg_sq[i][a:b],
                                  weight_decay=wd, **hyper)
