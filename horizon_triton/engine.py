"""Engine: the public entry point. ``Engine(model_cfg, train_cfg).fit(loader)``."""
from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path

import torch

from horizon_triton.kernels.cpu_adam import implementation as adam_implementation
from horizon_triton.kernels.reference import IGNORE_INDEX

from . import layer as lt

from .checkpoint import DTYPES, load_weights, save_weights
from .config import ModelConfig, TrainConfig
from .device import make_device
from .ops import load_ops, select_backend
from .optimizer import OptimizerDriver, clip_coefficient
from .scheduler import bind, build_pipeline, run_step, stream_in
from .store import HostStore
from .trace import Tracer

log = logging.getLogger("horizon_triton")


class Engine:
    """Trains a Llama-family model whose parameters live in host RAM, streaming one layer at a time through
    the compute device. Losses and weights match transformers + torch.optim.AdamW."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None):
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg = train_cfg or TrainConfig()
        self.device = make_device(train_cfg.device, train_cfg.seed)
        self.compute_dtype = DTYPES[train_cfg.compute_dtype]
        self.store = HostStore(model_cfg, self.compute_dtype, pin=self.device.pin_memory,
                               optimizer_states=train_cfg.optimizer_states)
        if model_cfg.source_path is not None:
            load_weights(self.store, model_cfg.source_path)
        else:
            self.store.init_random(train_cfg.seed)
        self.kernel_backend = select_backend(self.device.type)
        self.ops = load_ops(self.kernel_backend)
        self.optimizer = OptimizerDriver(self.store, train_cfg)
        self.tracer = Tracer() if train_cfg.trace_path else None
        self.optimizer.tracer = self.tracer
        self.pipeline = build_pipeline(model_cfg, self.store, self.ops, self.device, self.optimizer,
                                       train_cfg.num_slots, self.tracer, train_cfg.checkpoint_budget_bytes)
        self.step = 0                     # optimizer steps taken
        self._inv_freq = model_cfg.inv_freq().to(self.device.torch_device)
        log.info("horizon-triton: %s parameters, host store %.2f GB (%s moments), kernels=%s, device=%s, "
                 "cpu adamw=%s, optimizer_threads=%d", f"{self.store.num_parameters():,}", self.store.nbytes() / 1e9,
                 train_cfg.optimizer_states, self.kernel_backend, train_cfg.device,
                 adam_implementation(), self.optimizer.num_threads)

    # ---- data -------------------------------------------------------------------------------------------
    def prepare(self, batch: dict, where: str = "batch") -> lt.MicroBatch:
        """Checks one loader batch and moves it to the compute device with its rotary tables and doc ids."""
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError(f"{where}: expected a dict with 'input_ids' and 'labels', got {type(batch).__name__}")
        ids = torch.as_tensor(batch["input_ids"])
        labels = torch.as_tensor(batch["labels"]) if "labels" in batch else None
        if labels is None:
            raise ValueError(f"{where}: no 'labels' (use input_ids with -100 where no loss is wanted)")
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{where}: input_ids must be an integer tensor [batch, seq], got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        if labels.shape != ids.shape:
            raise ValueError(f"{where}: labels shape {tuple(labels.shape)} differs from input_ids shape "
                             f"{tuple(ids.shape)}")
        V = self.model_cfg.vocab_size
        if ids.numel() and (ids.min() < 0 or ids.max() >= V):
            bad = ids[(ids < 0) | (ids >= V)][0].item()
            raise ValueError(f"{where}: token id {bad} is outside the vocabulary [0, {V})")
        bad_labels = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
        if bad_labels.any():
            raise ValueError(f"{where}: label {labels[bad_labels][0].item()} is neither -100 nor in [0, {V})")
        B, S = ids.shape
        pos = batch.get("position_ids")
        doc_ids = None
        if pos is not None:
            pos = torch.as_tensor(pos).long()
            if pos.shape != ids.shape:
                raise ValueError(f"{where}: position_ids shape {tuple(pos.shape)} differs from input_ids shape "
                                 f"{tuple(ids.shape)}")
            restart = torch.zeros_like(pos, dtype=torch.bool)
            restart[:, 1:] = pos[:, 1:] <= pos[:, :-1]   # a position that does not grow starts a new document
            if restart.any():
                doc_ids = restart.cumsum(1).to(torch.int32)
        else:
            pos = torch.arange(S).expand(B, S)
        targets = torch.full_like(labels, IGNORE_INDEX, dtype=torch.int64)
        targets[:, :-1] = labels[:, 1:]                  # the transformers convention: shift inside the loss
        dev = self.device.torch_device
        freqs = pos.reshape(-1, 1).to(dev).float() * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)          # [T, D]
        return lt.MicroBatch(input_ids=ids.long().to(dev), targets=targets.reshape(-1).to(dev),
                             cos=emb.cos(), sin=emb.sin(),
                             doc_ids=None if doc_ids is None else doc_ids.to(dev),
                             num_targets=int((targets != IGNORE_INDEX).sum()))

    # ---- training ---------------------------------------------------------------------------------------
    def fit(self, loader, max_steps: int | None = None, callback=None) -> list[dict]:
        """Trains on ``loader`` (an iterable of batches, one micro-batch each) until it is exhausted or
        ``max_steps`` optimizer steps were taken. Returns one dict per optimizer step."""
        accum = self.train_cfg.grad_accum_steps
        total_steps = max_steps
        if total_steps is None and hasattr(loader, "__len__"):
            total_steps = math.ceil(len(loader) / accum)
        if self.train_cfg.lr_schedule == "cosine" and total_steps is None:
            self.train_cfg.lr_at(self.train_cfg.warmup_steps + 1, None)  # raises the explanatory error
        history, group, seen = [], [], 0
        for index, batch in enumerate(loader):
            group.append(self.prepare(batch, where=f"batch {index}"))
            seen += 1
            if len(group) == accum:
                history.append(self._optimizer_step(group, total_steps, callback))
                group = []
                if max_steps is not None and len(history) >= max_steps:
                    break
        if group:  # a last, partial accumulation group still makes a step of its own
            history.append(self._optimizer_step(group, total_steps, callback))
        if seen == 0:
            raise ValueError("the loader yielded no batches")
        self.optimizer.wait_all()
        if self.tracer is not None:
            self.tracer.write(self.train_cfg.trace_path)
            summary = self.tracer.summary()
            log.info("trace %s: compute stream busy %.0f%%, copy time hidden under compute %.0f%%",
                     self.train_cfg.trace_path, 100 * summary.get("compute_busy", 0),
                     100 * summary.get("copy_hidden", 0))
        return history

    def _optimizer_step(self, mbs: list[lt.MicroBatch], total_steps: int | None, callback) -> dict:
        tokens = sum(mb.num_targets for mb in mbs)
        if tokens == 0:
            raise ValueError(f"optimizer step {self.step + 1} has no label tokens (every label is -100)")
        start = time.perf_counter()
        self.pipeline.meter.reset_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        loss_sum, sq_norm = run_step(self.pipeline, mbs, grad_scale=1.0 / tokens)
        grad_norm = math.sqrt(float(sq_norm))
        self.step += 1
        lr = self.train_cfg.lr_at(self.step, total_steps)
        coef = clip_coefficient(grad_norm, self.train_cfg.max_grad_norm)
        self.optimizer.start_step(self.step, lr, coef)   # runs while the next step's forward streams
        elapsed = time.perf_counter() - start
        entry = {
            "step": self.step, "loss": float(loss_sum) / tokens, "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens, "time_s": elapsed,
            "tokens_per_s": sum(mb.targets.numel() for mb in mbs) / elapsed,
            "device_peak_bytes": self.pipeline.meter.peak,
            "host_peak_bytes": self.store.nbytes(),
            "host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if self.device.type == "cuda":   # everything on the GPU, the kernels' workspaces included
            entry["device_allocator_peak_bytes"] = torch.cuda.max_memory_allocated()
        if callback is not None:
            callback(entry)
        return entry

    # ---- inference (evaluation and the demo) ------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [B, S, V] of the current weights; layer by layer through slot 0, without the pipeline."""
        self.optimizer.wait_all()
        batch = {"input_ids": input_ids, "labels": torch.full_like(input_ids, IGNORE_INDEX)}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        mb = self.prepare(batch, where="logits")
        p, cfg = self.pipeline, self.model_cfg
        x = None
        for i in range(self.store.num_layers):
            stream_in(p, i, 0)
            self.device.sync(p.slot_ready[0])            # sync: evaluation is not pipelined
            w = bind(p, i, 0)
            if i == 0:
                x = lt.embed_forward(w, mb)
            elif i < p.head:
                x = lt.decoder_forward(self.ops, cfg, w, x, mb)
            else:
                xn, _ = self.ops.rmsnorm_forward(x, w["norm"], cfg.rms_norm_eps)
                x = (xn @ w["lm_head"].t()).float()
            p.slot_free[0] = self.device.record("compute")
        return x.view(*input_ids.shape, -1).cpu()

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, dtype: str | torch.dtype | None = None) -> None:
        """config.json + safetensors loadable by transformers.AutoModelForCausalLM.from_pretrained. Default dtype:
        fp32 (the master weights) if the model was loaded or built in fp32, else the source checkpoint's."""
        self.optimizer.wait_all()
        if dtype is None:
            dtype = self.model_cfg.torch_dtype
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} not supported for saving; choose from {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        save_weights(self.store, out_dir, dtype)

    def close(self) -> None:
        self.optimizer.wait_all()
        self.device.close()
        self.store.close()
