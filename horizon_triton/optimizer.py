"""Optimizer driver: the CPU AdamW over the host store, one layer at a time, on a worker thread.

After the backward the global gradient norm is known, so clipping is exact (torch.nn.utils.clip_grad_norm_'s
coefficient, folded into the update as grad_scale). The worker then updates layers 0, 1, 2, … in order and
marks each one done, so the next step's forward can stream layer i in as soon as layer i is updated while the
update of the later layers continues. In bf16 mode the working weights are the high half of the master, so the
update rewrites them in place; in fp32 mode the master is what streams.

The update runs on ``optimizer_threads`` OpenMP threads (default: every core but one, which stays free for the
thread that launches the device's kernels and copies).
"""
from __future__ import annotations

import threading

from horizon_triton.kernels.cpu_adam import (adamw_step_, adamw_step_split_, adamw_step_split_8bit_,
                                             default_num_threads)

from .config import TrainConfig
from .store import HostStore


def clip_coefficient(total_norm: float, max_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1."""
    if not max_norm:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def optimizer_threads(train_cfg: TrainConfig) -> int:
    """TrainConfig.optimizer_threads, or every core this process may use but one (at least one)."""
    if train_cfg.optimizer_threads is not None:
        return train_cfg.optimizer_threads
    return max(1, default_num_threads() - 1)


class OptimizerDriver:
    def __init__(self, store: HostStore, train_cfg: TrainConfig):
        self.store = store
        self.cfg = train_cfg
        self.num_threads = optimizer_threads(train_cfg)
        self._done = [threading.Event() for _ in range(store.num_layers)]
        for event in self._done:
            event.set()                     # before the first step every layer's weights are current
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.tracer = None

    def wait_layer(self, i: int) -> None:
        """Host blocks until layer i holds this step's updated weights."""
        self._done[i].wait()
        self._raise()

    def wait_all(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def start_step(self, step: int, lr: float, grad_scale: float) -> None:
        """Begins the update of every layer on a worker thread; returns at once."""
        self.wait_all()
        for event in self._done:
            event.clear()
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
                self._done[i].set()
        except BaseException as e:
            self._error = e
        finally:
            for event in self._done:  # never leave the streaming side waiting forever
                event.set()

    def update_layer(self, i: int, step: int, lr: float, grad_scale: float) -> None:
        s, c = self.store.trainable, self.cfg       # the store itself, or a LoRA store's adapters (none: no-op)
        split, n = s.layouts[i].decay_numel, s.layouts[i].numel   # decayed matrices first, then norms and biases
        hyper = dict(step=step, lr=lr, beta1=c.betas[0], beta2=c.betas[1], eps=c.eps, grad_scale=grad_scale,
                     num_threads=self.num_threads)
        grad = s.grad[i]
        if not s.split_master:
            master = s.master[i]
            for lo, hi, wd in ((0, split, c.weight_decay), (split, n, 0.0)):
                if hi > lo:
                    adamw_step_(master[lo:hi], grad[lo:hi], s.exp_avg[i][lo:hi], s.exp_avg_sq[i][lo:hi], None,
                                weight_decay=wd, **hyper)
            return
        weights, low = s.working[i], s.master_low[i]
        if s.optimizer_states == "8bit":
            # the matrices' moments are 8-bit codes; the norms' and biases' (exp_avg[i]: [n - split]) stay fp32
            if split:
                b = s.buffers
                adamw_step_split_8bit_(weights[:split], low[:split], grad[:split], b("exp_avg_q")[i],
                                       b("exp_avg_scale")[i], b("exp_avg_sq_q")[i], b("exp_avg_sq_scale")[i],
                                       weight_decay=c.weight_decay, seed=i, **hyper)
            if n > split:
                adamw_step_split_(weights[split:], low[split:], grad[split:], s.exp_avg[i], s.exp_avg_sq[i],
                                  weight_decay=0.0, **hyper)
            return
        for lo, hi, wd in ((0, split, c.weight_decay), (split, n, 0.0)):
            if hi > lo:
                adamw_step_split_(weights[lo:hi], low[lo:hi], grad[lo:hi], s.exp_avg[i][lo:hi],
                                  s.exp_avg_sq[i][lo:hi], weight_decay=wd, **hyper)
