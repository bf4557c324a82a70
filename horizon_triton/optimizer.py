"""Optimizer driver: the CPU AdamW over the host store, one layer at a time, on a worker thread.

After the backward the global gradient norm is known, so clipping is exact (torch.nn.utils.clip_grad_norm_'s
coefficient, folded into the update as grad_scale). The worker then updates layers 0, 1, 2, … in order and
marks each one done, so the next step's forward can stream layer i in as soon as layer i is updated while the
update of the later layers continues. Each update also rewrites the layer's bf16 working copy in place.
"""
from __future__ import annotations

import threading

from horizon_triton.kernels.cpu_adam import adamw_step_

from .config import TrainConfig
from .store import HostStore


def clip_coefficient(total_norm: float, max_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1."""
    if not max_norm:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


class OptimizerDriver:
    def __init__(self, store: HostStore, train_cfg: TrainConfig):
        self.store = store
        self.cfg = train_cfg
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
        s, c = self.store, self.cfg
        split = s.layouts[i].decay_numel   # decayed matrices first, then norms and biases
        working = s.working[i]
        out = None if working is s.master[i] else working
        for lo, hi, wd in ((0, split, c.weight_decay), (split, s.layouts[i].numel, 0.0)):
            if hi == lo:
                continue
            adamw_step_(s.master[i][lo:hi], s.grad[i][lo:hi], s.exp_avg[i][lo:hi], s.exp_avg_sq[i][lo:hi],
                        None if out is None else out[lo:hi], step=step, lr=lr, beta1=c.betas[0],
                        beta2=c.betas[1], eps=c.eps, weight_decay=wd, grad_scale=grad_scale)
