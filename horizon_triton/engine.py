"""Engine: the public entry point. ``Engine(model_cfg, train_cfg).fit(loader)``."""
from __future__ import annotations

import base64
import dataclasses
import logging
import math
import resource
import signal
import time
from pathlib import Path

import torch

from horizon_triton.kernels.cpu_adam import implementation as adam_implementation
from horizon_triton.kernels.reference import IGNORE_INDEX

from .config import ModelConfig, TrainConfig
from .data.batch import prepare as prepare_batch
from .devices import canary, distributed
from .devices.device import device_kind, make_device
from .host.node_store import NodeShare
from .host.optimizer import OptimizerDriver, clip_coefficient
from .models.dense import layer as lt
from .models.family import has_moe_experts, is_generic
from .models.ops import CPU_LIBRARY_OPS, TORCH_ONLY, load_ops, select_backend
from .objectives import lora, preference
from .planning import preflight
from .schedule.activations import forward_budget, forward_group_full
from .schedule.build import build_step_pipeline, build_store
from .schedule.scheduler import run_forward, run_step
from .schedule.trace import Tracer
from .state import interrupts, training_state
from .state.checkpoint import DTYPES, load_weights, save_weights

log = logging.getLogger("horizon_triton")

# TrainConfig fields that change the numbers, or when the ranks meet: the same on every data-parallel rank
SAME_ON_EVERY_RANK = ("lr", "weight_decay", "betas", "eps", "max_grad_norm", "grad_accum_steps", "warmup_steps",
                      "lr_schedule", "compute_dtype", "seed", "head_chunk_rows", "optimizer_states",
                      "checkpoint_dir", "save_every_steps", "save_every_minutes", "keep_last", "share_host_store",
                      "objective", "dpo_beta", "dpo_label_smoothing", "dpo_loss", "lora_rank", "lora_alpha",
                      "lora_targets", "use_rslora")


def _model_fields(cfg: ModelConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.compare}


class Diverged(ValueError):
    """A step's loss or gradient norm is not finite: training stops before that step's update is applied, so the
    weights (and every checkpoint) stay those of the step before."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint):
        saved_step, saved = last_checkpoint
        where = (f"; the newest training checkpoint is {saved} (step {saved_step})" if saved is not None else "")
        super().__init__(f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm} (not finite). "
                         f"The update was not applied: the weights are those after step {step - 1}{where}. Lower "
                         "the learning rate, add warm-up or gradient clipping, or check the data")
        self.step, self.loss, self.grad_norm, self.checkpoint = step, loss, grad_norm, saved


class Engine:
    """Trains a Llama-family model whose parameters live in host RAM, streaming one layer at a time through
    the compute device. Losses and weights match transformers + torch.optim.AdamW."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None, *, init_weights: bool = True):
        """init_weights=False leaves the host store unfilled (from_checkpoint fills it)."""
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg = train_cfg or TrainConfig()
        # data parallel when torch.distributed is initialized or torchrun's environment is set
        self.dist = distributed.context(device_kind(train_cfg.device))
        if self.dist is None:
            self._build(model_cfg, train_cfg, init_weights)
            return
        self.dist.begin("Engine(...)", "the same configs on every rank")
        with self.dist.guard():        # a rank that fails here ends the job on every rank
            # first: the ranks of a node build one shared store, of one layout
            self.dist.same_everywhere("the model config", _model_fields(model_cfg))
            self.dist.same_everywhere("the train config", {k: getattr(train_cfg, k) for k in SAME_ON_EVERY_RANK}
                                      | {"device": device_kind(train_cfg.device)})
            self._build(model_cfg, train_cfg, init_weights)

    def _build(self, model_cfg: ModelConfig, train_cfg: TrainConfig, init_weights: bool) -> None:
        index = self.dist.local_rank if self.dist is not None else 0
        self.device = make_device(train_cfg.device, train_cfg.seed, index)
        self.compute_dtype = DTYPES[train_cfg.compute_dtype]
        if train_cfg.preflight:
            preflight.check_engine(model_cfg, train_cfg, self.device)   # before anything is allocated
        share = None
        if self.dist is not None and self.dist.local_world > 1 and train_cfg.share_host_store:
            share = NodeShare(self.dist.node_store_name, self.dist.local_rank, self.dist.local_world,
                              self.dist.node_barrier)            # one store per node, each rank updates a shard
        self.store = build_store(model_cfg, train_cfg, self.device, share)    # the dry run builds the same
        fill_base = init_weights or self.store.lora is not None   # a LoRA checkpoint holds no frozen base
        if fill_base and model_cfg.source_path is not None:
            self.store.fill_shared(lambda: load_weights(self.store, model_cfg.source_path))
        elif fill_base:
            self.store.fill_shared(lambda: self.store.init_random(train_cfg.seed))
        if init_weights and self.store.lora is not None:
            self.store.fill_shared(lambda: lora.init_adapters(self.store, train_cfg.seed))
        self.kernel_backend = select_backend(self.device.type)
        self.ops = load_ops(self.kernel_backend, self.device.type)
        # what runs each op: "triton", "library (why)" where the canary replaced a Triton family, or the path
        self.kernel_report = dict.fromkeys(vars(self.ops), self.kernel_backend)
        if self.kernel_backend == "torch":
            self.kernel_report = {name: "library" if self.device.type == "cuda" or name in CPU_LIBRARY_OPS
                                  else "reference" for name in vars(self.ops)}
        if self.kernel_backend == "triton":
            self.kernel_report.update(dict.fromkeys(TORCH_ONLY, "library"))
            self.ops, report = canary.run(self.ops, load_ops("torch", "cuda"), self.device.torch_device,
                                          self.compute_dtype, model_cfg.head_dim, model_cfg.sliding_window,
                                          moe=has_moe_experts(model_cfg))
            self.kernel_report.update(report)
        self.optimizer = OptimizerDriver(self.store, train_cfg,
                                         shard=None if share is None else (share.local_rank, share.local_world))
        self.tracer = Tracer() if train_cfg.trace_path else None
        self.optimizer.tracer = self.tracer
        self.pipeline = build_step_pipeline(model_cfg, train_cfg, self.store, self.ops, self.device, self.optimizer,
                                            self.tracer)
        self.pipeline.dist = self.dist
        self.step = 0                     # optimizer steps taken
        self.micro_batches = 0            # loader batches those steps consumed: the data position
        self.total_steps = None           # the lr schedule's length, fixed by the first fit that knows it
        self.extra_state: dict = {}       # the caller's JSON, saved with every checkpoint (the CLI's options)
        self._last_checkpoint = (None, None)      # (step, path) of the latest save or load
        self._saves: dict = {}            # data parallel: (call, step) -> saves made (rank 0's are waited for)
        self._last_save_time = time.monotonic()
        self._inv_freq = None if is_generic(model_cfg) else model_cfg.inv_freq().to(self.device.torch_device)
        self._checked_steps = set()       # micro-batch shapes whose step the preflight has dry-run
        log.info("horizon-triton: %s parameters, host store %.2f GB (%s moments), kernels=%s, device=%s, "
                 "cpu adamw=%s, optimizer_threads=%d", f"{self.store.num_parameters():,}",
                 self.store.nbytes() / 1e9, train_cfg.optimizer_states, self.kernel_backend, train_cfg.device,
                 adam_implementation(), self.optimizer.num_threads)
        if self.store.lora is not None:
            spec = self.store.lora
            log.info("LoRA: rank %d, scale %.4g on %s, %s adapter parameters; the base frozen", spec.rank,
                     spec.scale, ",".join(spec.targets),
                     f"{sum(layout.numel for layout in self.store.adapter_layouts):,}")

    # ---- data -------------------------------------------------------------------------------------------
    def prepare(self, batch, where: str = "batch") -> lt.MicroBatch:
        """One loader batch as a MicroBatch on the compute device (data/batch.py: the shapes accepted, the
        checks, the tensors made)."""
        return prepare_batch(batch, self.model_cfg, self.device, self._inv_freq,
                             dpo=self.train_cfg.objective == "dpo", where=where)

    # ---- training ---------------------------------------------------------------------------------------
    def fit(self, loader, max_steps: int | None = None, callback=None) -> list[dict]:
        """Trains on ``loader`` (an iterable of batches, one micro-batch each) until it is exhausted or
        ``max_steps`` optimizer steps were taken. Returns one dict per optimizer step.

        The lr schedule's length is fixed by the first fit that knows it (max_steps, else the loader's length in
        steps) and kept: a fit after from_checkpoint, or a second fit, continues the same schedule.
        With train_cfg.checkpoint_dir set, a checkpoint is saved every save_every_steps steps and/or
        save_every_minutes. A SIGINT or SIGTERM lets the current optimizer step finish, saves a checkpoint (with
        checkpoint_dir set), then raises interrupts.Interrupted (a KeyboardInterrupt) or interrupts.Terminated
        (a SystemExit(143)); a second signal stops at once."""
        with interrupts.deferred_signals():
            if self.dist is None:
                return self._fit(loader, max_steps, callback)
            self.dist.begin("fit", "each rank with its own batches, e.g. distributed.shard_loader(loader, "
                                   "engine.dist)")
            with self.dist.guard():
                return self._fit(loader, max_steps, callback)

    def _fit(self, loader, max_steps: int | None, callback) -> list[dict]:
        accum = self.train_cfg.grad_accum_steps
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
            raise ValueError(f"max_steps must be an int ≥ 0 (or None: until the loader ends), got {max_steps!r}")
        if self.dist is not None:    # every rank's loader must make the same steps
            self.dist.same_everywhere("the loader", {"micro-batches (len(loader))": len(loader) if hasattr(
                loader, "__len__") else None, "max_steps": max_steps})
        if max_steps == 0:
            return []
        if hasattr(loader, "__len__") and len(loader) == 0:
            raise ValueError("the loader yielded no batches")
        total_steps = self.total_steps
        if total_steps is None:      # fixed below, once a step is taken: a fit that takes none fixes nothing
            total_steps = max_steps
            if total_steps is None and hasattr(loader, "__len__"):
                total_steps = math.ceil(len(loader) / accum)
        if self.train_cfg.lr_schedule == "cosine" and total_steps is None:
            self.train_cfg.lr_at(self.train_cfg.warmup_steps + 1, None)  # raises the explanatory error
        history, group, seen = [], [], 0
        self._last_save_time = time.monotonic()
        exhausted = True
        for index, batch in enumerate(loader):
            group.append(self.prepare(batch, where=f"batch {index}"))
            if self.train_cfg.objective == "dpo" and group[-1].preference.ref_logps is None:
                raise ValueError(f"batch {index}: no 'ref_logps' (the reference model's log-probability of each "
                                 "labelled token), which DPO needs; compute them once before training with "
                                 "engine.reference_logps(batches) or preference.add_reference(engine, rows)")
            seen += 1
            if self.total_steps is None:
                self.total_steps = total_steps
            if len(group) == accum:
                history.append(self._optimizer_step(group, total_steps, callback))
                group = []
                self._checkpoint_if_due()
                if max_steps is not None and len(history) >= max_steps:
                    exhausted = False
                    break
        if group:  # a last, partial accumulation group still makes a step of its own
            history.append(self._optimizer_step(group, total_steps, callback))
        self._checkpoint_if_due()
        if self.dist is not None and exhausted:    # no rank may have batches left when this one has none
            self.dist.step_counts(self.step + 1, 0, 0, 0, 0)
        if seen == 0:
            raise ValueError("the loader yielded no batches")
        self.optimizer.wait_all()
        if self.tracer is not None and distributed.is_main_process():
            self.tracer.write(self.train_cfg.trace_path)
            summary = self.tracer.summary()
            log.info("trace %s: compute stream busy %.0f%%, copy time hidden under compute %.0f%%",
                     self.train_cfg.trace_path, 100 * summary.get("compute_busy", 0),
                     100 * summary.get("copy_hidden", 0))
        return history

    def _optimizer_step(self, mbs: list[lt.MicroBatch], total_steps: int | None, callback) -> dict:
        tokens = sum(mb.num_targets for mb in mbs)
        positions = sum(mb.targets.numel() for mb in mbs)
        dpo = self.train_cfg.objective == "dpo"
        pairs = sum(mb.preference.num_pairs for mb in mbs) if dpo else 0
        if self.dist is not None:       # the step's loss and gradient are over every rank's tokens (pairs)
            tokens, positions, pairs = self.dist.step_counts(self.step + 1, len(mbs), tokens, positions, pairs)
        if tokens == 0:
            raise ValueError(f"optimizer step {self.step + 1} has no label tokens (every label is -100)")
        shapes = tuple(mb.shape for mb in mbs)
        if self.train_cfg.preflight and self.device.type == "cuda" and shapes not in self._checked_steps:
            preflight.check_step(self, mbs)          # a dry run of this step: refuse what would run out of memory
            self._checked_steps.add(shapes)
        start = time.perf_counter()
        meter = self.pipeline.meter
        meter.reset_peak()
        h2d, d2h, reduced = meter.h2d_bytes, meter.d2h_bytes, meter.reduced_bytes
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        dpo = preference.DPOHead(self.train_cfg, pairs) if dpo else None
        loss_sum, sq_norm = run_step(self.pipeline, mbs, grad_scale=1.0 / tokens, preference=dpo)
        balance = self.pipeline.template.router_balance      # the MoE router's auxiliary loss, if the model has it
        aux = None if balance is None else float(balance.step_aux)
        if self.dist is not None:       # every rank's loss (DPO metrics, aux loss) sums; the reduced gradient's norm
            sums = dpo.sums.tolist() if dpo is not None else [aux] if aux is not None else []
            loss_sum, sq_norm, sums = self.dist.step_totals(float(loss_sum), float(sq_norm), self.pipeline.sharded,
                                                            sums)
            if dpo is not None:
                dpo.sums = torch.tensor(sums, dtype=torch.float64)
            elif aux is not None:
                aux = sums[0]
        grad_norm = math.sqrt(float(sq_norm))
        loss = float(loss_sum) / (dpo.pairs if dpo is not None else tokens)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise Diverged(self.step + 1, loss, grad_norm, self._last_checkpoint)
        self.step += 1
        self.micro_batches += len(mbs)
        lr = self.train_cfg.lr_at(self.step, total_steps)
        coef = clip_coefficient(grad_norm, self.train_cfg.max_grad_norm)
        self.optimizer.start_step(self.step, lr, coef)   # runs while the next step's forward streams
        elapsed = time.perf_counter() - start
        entry = {
            "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens, "time_s": elapsed,
            "tokens_per_s": positions / elapsed,
            "device_peak_bytes": self.pipeline.meter.peak,
            "host_peak_bytes": self.store.nbytes(),
            "host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "h2d_bytes": meter.h2d_bytes - h2d, "d2h_bytes": meter.d2h_bytes - d2h,
        }
        if self.dist is not None:       # this rank's share of the collectives: the tensors it reduced
            entry["world_size"] = self.dist.world
            entry["allreduce_bytes"] = meter.reduced_bytes - reduced
        if self.device.type == "cuda":   # everything on the GPU, the kernels' workspaces included
            entry["device_allocator_peak_bytes"] = torch.cuda.max_memory_allocated()
        if aux is not None:              # the loss holds coef·aux_loss (models/generic/router_balance)
            entry["aux_loss"] = aux
        if dpo is not None:              # the loss is the mean over the step's pairs; TRL's metrics beside it
            entry.update(pairs=dpo.pairs, **dpo.metrics())
        if callback is not None:
            callback(entry)
        return entry

    @property
    def last_checkpoint(self) -> tuple:
        """(step, path) of the newest training checkpoint this engine saved or loaded; (None, None) if none."""
        return self._last_checkpoint

    def stop_if_signalled(self) -> None:
        """Outside fit, where stopping is safe (after an evaluation, after the final save): if a SIGINT or SIGTERM
        was received inside interrupts.deferred_signals() (on any rank), saves a checkpoint of this step (with
        checkpoint_dir set, unless one exists) and raises interrupts.Interrupted / Terminated. Every rank calls
        it."""
        if self.dist is not None:
            self.dist.begin("stop_if_signalled", "after the same evaluation or save")
        self._checkpoint_if_due(periodic_saves=False)

    def _checkpoint_if_due(self, periodic_saves: bool = True) -> None:
        """After an optimizer step: the periodic save, and the stop a signal asked for (after saving)."""
        c, signum = self.train_cfg, interrupts.received()
        periodic = periodic_saves and (c.save_every_steps is not None and self.step % c.save_every_steps == 0
                                       or c.save_every_minutes is not None
                                       and time.monotonic() - self._last_save_time >= 60 * c.save_every_minutes)
        if self.dist is not None:       # every rank saves and stops after the same step (a signal to any rank)
            stop, periodic = self.dist.any_rank([signum is not None, periodic])
            signum = signum if signum is not None or not stop else signal.SIGTERM
        if c.checkpoint_dir is not None and self.step > 0 and self._last_checkpoint[0] != self.step and (
                signum is not None or periodic):
            self.save_checkpoint(c.checkpoint_dir, keep_last=c.keep_last)
        if signum is not None:
            step, path = self._last_checkpoint
            raise interrupts.stop_error(signum, path if step == self.step else None)

    # ---- inference (evaluation and the demo) ------------------------------------------------------------
    # Forward-only passes run like the step's forward (scheduler.run_forward): layer-major over a group of
    # micro-batches, so the weights cross the bus once per group, not once per batch. A group is
    # grad_accum_steps × num_layers micro-batches (their hidden states, one each, are what one step's
    # checkpoints of grad_accum_steps such micro-batches hold), or more while they fit the device's checkpoint
    # budget; beyond that budget they wait in host memory (activations.forward_group_full).
    def _forward_groups(self, loader, where: str, check=None):
        """Yields (micro-batches, device budget) of ``loader``'s batches, a group at a time, in order; ``check(
        index, mb)`` before a batch joins its group."""
        H, b = self.model_cfg.hidden_size, self.compute_dtype.itemsize
        min_mbs = self.train_cfg.grad_accum_steps * self.model_cfg.num_layers
        group, nbytes, budget = [], 0, None
        for index, batch in enumerate(loader):
            mb = self.prepare(batch, where=f"{where} {index}")
            if check is not None:
                check(index, mb)
            size = mb.host_ids.numel() * H * b
            if not group:
                budget = forward_budget(self.pipeline, mb.shape)
            elif forward_group_full(len(group), nbytes, size, min_mbs, budget):
                yield group, budget
                group, nbytes, budget = [], 0, forward_budget(self.pipeline, mb.shape)
            group.append(mb)
            nbytes += size
        if group:
            yield group, budget

    def _head_statistics(self, loader, where: str, check=None):
        """Yields (micro-batch, its loss sum, lse, target logit: fp32 [T]), device, for each batch of ``loader``
        through a forward-only pass; the head's logits exist one chunk of tokens and vocabulary at a time (the
        training head's first pass)."""
        dev = self.device.torch_device
        for mbs, budget in self._forward_groups(loader, where, check):
            stats = [(torch.full((mb.targets.numel(),), float("-inf"), device=dev),
                      torch.zeros(mb.targets.numel(), device=dev), torch.zeros(mb.targets.numel(), device=dev))
                     for mb in mbs]                        # running max, sum of exp, target logit
            results = [None] * len(mbs)

            def head_chunk(m, xn, w, u, mbs=mbs, stats=stats):       # the template's: a model's logit transform
                self.pipeline.template.head_chunk_stats(self.ops, w, xn, mbs[m], u.start, stats[m])

            def finish(m, mbs=mbs, stats=stats, results=results):
                results[m] = self.ops.cross_entropy_chunk_loss(*stats[m], mbs[m].targets)
            run_forward(self.pipeline, mbs, budget, head_chunk, finish)
            for mb, (loss, lse), (_, _, target_logit) in zip(mbs, results, stats):
                yield mb, loss, lse, target_logit

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [B, S, V] of the current weights (a forward-only pass of one micro-batch).
        Where attention_mask is 0 the logits mean nothing (those tokens see only themselves)."""
        self.optimizer.wait_all()
        batch = {"input_ids": input_ids, "labels": torch.full_like(input_ids, IGNORE_INDEX)}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        mb = self.prepare(batch, where="logits")
        logits = torch.empty(mb.targets.numel(), self.model_cfg.vocab_size, dtype=torch.float32,
                             device=self.device.torch_device)

        def head_chunk(m, xn, w, u):
            logits[:, u.start:u.stop] = self.pipeline.template.head_chunk_logits(w, xn)
        run_forward(self.pipeline, [mb], forward_budget(self.pipeline, mb.shape), head_chunk)
        return logits.view(*input_ids.shape, -1).cpu()

    @torch.no_grad()
    def evaluate(self, loader) -> float:
        """Mean loss over the counted label tokens of every batch of ``loader`` (dicts as ``fit`` takes) with the
        current weights: a forward-only pass, layer-major over groups of batches (the weights cross once per
        group); the head's logits exist one chunk of tokens and vocabulary at a time (the training head's first
        pass). With objective "dpo": the mean DPO loss over the loader's pairs (evaluate_preferences has the
        metrics). Data parallel: every rank calls it with its own batches, and gets the mean over all of them."""
        if self.train_cfg.objective == "dpo":
            return self.evaluate_preferences(loader)["loss"]
        if self.dist is not None:    # a rank that calls it alone is told so once its peers are gone
            self.dist.begin("evaluate", "each rank with its own batches, e.g. distributed.shard_loader(loader, "
                                        "engine.dist, drop_remainder=False): every rank gets the mean over all")
        self.optimizer.wait_all()
        loss_sum, tokens = 0.0, 0
        for mb, loss, _, _ in self._head_statistics(loader, "eval batch"):
            loss_sum += float(loss)                      # one scalar a batch, in batch order
            tokens += mb.num_targets
        if self.dist is not None:                        # every rank's eval batches
            with self.dist.guard():
                loss_sum, tokens = self.dist.gather_rows([loss_sum, tokens]).sum(dim=0).tolist()
        if tokens == 0:
            raise ValueError("evaluate: the loader yielded no label tokens (every label is -100, or no batches)")
        return loss_sum / tokens

    @torch.no_grad()
    def reference_logps(self, loader):
        """Yields, for each batch of ``loader``, fp32 [B, S] (host) the log-probability the current weights give
        each labelled token, aligned with the labels (0 where they are -100): DPO's ``ref_logps``, computed once
        from the starting weights before training. A forward-only pass as ``evaluate``'s (the batches of a group
        are yielded once the group has run). With objective "dpo" each batch's pair layout is checked as training
        will check it."""
        self.optimizer.wait_all()
        for mb, _, lse, target_logit in self._head_statistics(loader, "reference batch"):
            token_logps = torch.where(mb.targets != IGNORE_INDEX, target_logit - lse, 0.0)
            B, S = mb.shape
            by_label = torch.zeros(B, S, dtype=torch.float32)
            by_label[:, 1:] = token_logps.view(B, S)[:, :-1].cpu()      # target t scores token t + 1
            yield by_label

    @torch.no_grad()
    def evaluate_preferences(self, loader) -> dict:
        """objective "dpo": the DPO loss and TRL's metrics (rewards/chosen, rewards/accuracies, ...) with the
        current weights, means over every pair of ``loader`` (batches with ref_logps, as fit takes them); data
        parallel, over every rank's batches."""
        self.optimizer.wait_all()

        def check(index, mb):
            if mb.preference is None or mb.preference.ref_logps is None:
                raise ValueError(f"eval batch {index}: evaluate_preferences needs objective 'dpo' and batches "
                                 "with 'ref_logps' (engine.reference_logps)")
        if self.dist is not None:
            self.dist.begin("evaluate_preferences", "each rank with its own batches: every rank gets the means over "
                                                    "all of them")
        loss, sums, pairs = 0.0, None, 0
        for mb, _, lse, target_logit in self._head_statistics(loader, "eval batch", check):
            head = preference.DPOHead(self.train_cfg, mb.preference.num_pairs)
            loss_m, _ = head.token_weights(mb, lse, target_logit)
            loss += float(loss_m)                        # one scalar a batch, in batch order
            sums = head.sums if sums is None else sums + head.sums
            pairs += head.pairs
        if sums is None:
            sums = torch.zeros(len(preference.METRICS))
        if self.dist is not None:                        # every rank's eval batches
            with self.dist.guard():
                loss, pairs, *sums = self.dist.gather_rows([loss, pairs, *sums.tolist()]).sum(dim=0).tolist()
            sums = torch.tensor(sums, dtype=torch.float64)
        if pairs == 0:
            raise ValueError("evaluate_preferences: the loader yielded no batches")
        return {"loss": loss / pairs, "pairs": pairs,
                **dict(zip(preference.METRICS, (sums / pairs).tolist()))}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, dtype: str | torch.dtype | None = None, add_files=None,
                        merge: bool = False) -> None:
        """config.json + safetensors loadable by transformers.AutoModelForCausalLM.from_pretrained. Default dtype:
        fp32 (the master weights) if the model was loaded or built in fp32, else the source checkpoint's.
        A LoRA run saves its adapters in peft's format instead (adapter_config.json + adapter_model.safetensors,
        fp32, for peft.PeftModel.from_pretrained on the base), or with merge=True the full model with the
        adapters merged into the base weights (W + s·B A, in dtype).

        The directory is assembled beside out_dir and swapped in whole (``add_files(tmp_dir)`` writes more files
        into it first: a tokenizer, metrics); a SIGINT or SIGTERM during the save is acted on once it is done."""
        self.optimizer.wait_all()
        if merge and self.store.lora is None:
            raise ValueError("merge=True merges LoRA adapters into the base; this run trains the full model "
                             "(TrainConfig(lora_rank=...) makes a LoRA run)")
        if self.store.lora is not None and not merge:
            with interrupts.deferred_signals():
                self._on_rank_0(lambda: lora.save_adapter(self.store, out_dir, add_files), "save_pretrained")
            return
        if dtype is None:
            dtype = self.model_cfg.torch_dtype
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} not supported for saving; choose from {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        with interrupts.deferred_signals():
            self._on_rank_0(lambda: save_weights(self.store, out_dir, dtype, add_files,
                                                 tensor_of=lora.merged_values(self.store) if merge else None),
                            "save_pretrained")

    def save_checkpoint(self, path: str | Path, keep_last: int | None = None) -> Path:
        """The whole training state (every host-store buffer but the gradient, step, lr schedule, RNG, data
        position, configs) into PATH/step-N for N = self.step, atomically and durably; returns that directory.
        keep_last=K then deletes all but the K newest checkpoints in PATH."""
        self.optimizer.wait_all()      # the worker may still be updating the last step's layers
        with interrupts.deferred_signals():
            saved = training_state.step_dir(Path(path), self.step)
            self._on_rank_0(lambda: training_state.save(self.store, Path(path), self._trainer_state(), keep_last),
                            "save_checkpoint")
        self._last_checkpoint, self._last_save_time = (self.step, saved), time.monotonic()
        log.info("checkpoint of step %d saved in %s", self.step, saved)
        return saved

    @classmethod
    def from_checkpoint(cls, path: str | Path, train_cfg: TrainConfig | None = None) -> "Engine":
        """An engine in the state a save_checkpoint recorded: PATH is a checkpoint, or a directory of them (the
        newest complete one is taken). train_cfg: the saved one by default; another one may change how the run
        executes (device, slots, checkpoint cadence), while changing optimizer settings changes the result.
        fit(rest_of_loader) then continues: engine.step counts on, engine.micro_batches says how many loader
        batches the run had consumed. Also restores torch's global RNG to its state at the save."""
        ckpt = training_state.find(path)
        _, state = training_state.read(ckpt)
        engine = cls(training_state.model_config(state), train_cfg or training_state.train_config(state),
                     init_weights=False)
        engine.load_checkpoint(ckpt)
        return engine

    def load_checkpoint(self, path: str | Path) -> Path:
        """Loads a training checkpoint (or the newest under PATH) into this engine after checking that it was
        saved from this model with this store layout; returns the checkpoint's directory. Nothing is
        overwritten unless every file is present, whole and of the right layout."""
        ckpt = training_state.find(path)
        manifest, state = training_state.read(ckpt)
        differences = training_state.config_differences(training_state.model_config(state), self.model_cfg)
        saved_dtype = state["train_config"].get("compute_dtype")
        if saved_dtype != self.train_cfg.compute_dtype:
            differences.append(f"compute_dtype: checkpoint {saved_dtype!r}, this engine "
                               f"{self.train_cfg.compute_dtype!r}")
        saved_lora = lora.spec_of(training_state.train_config(state))
        if saved_lora != self.store.lora:
            differences.append(f"LoRA adapters: checkpoint {saved_lora}, this engine {self.store.lora}")
        if differences:
            raise training_state.CheckpointError(f"{ckpt} was saved from another model or setup: "
                                                 + "; ".join(differences))
        self.optimizer.wait_all()
        training_state.load_into(self.store, ckpt, manifest)
        self.step, self.micro_batches = state["step"], state["micro_batches"]
        self.total_steps = state["schedule"]["total_steps"]
        self.extra_state = state.get("extra", {})
        self._set_rng_state(state["rng"])
        self._last_checkpoint = (self.step, ckpt)
        return ckpt

    def _on_rank_0(self, write, call: str) -> None:
        """``write()`` (``call``'s files) on rank 0 alone, with no collective: data parallel, rank 0 holds
        every weight once its optimizer has waited for the last update (its own store is a whole replica; a
        node-shared one is mapped whole in every local rank, and its wait covers every local rank's shard), so
        it may save alone after fit, the other ranks gone (the usual ``if rank == 0:`` idiom). The other ranks
        that call it wait for rank 0's call of the same kind and count at this step (their arguments are not
        used): the files exist when it returns, on any rank."""
        if self.dist is None:
            write()
            return
        count = self._saves[(call, self.step)] = self._saves.get((call, self.step), 0) + 1
        what = f"{call} #{count} at step {self.step}"
        if self.dist.rank == 0:
            with self.dist.guard():
                write()
            self.dist.saved(what)
        else:
            self.dist.wait_for_save(what, call)

    def _trainer_state(self) -> dict:
        c = self.train_cfg
        known = c.lr_schedule == "constant" or self.total_steps is not None
        next_lr = c.lr_at(self.step + 1, self.total_steps) if known else None
        return {"step": self.step, "micro_batches": self.micro_batches,
                "schedule": {"kind": c.lr_schedule, "warmup_steps": c.warmup_steps, "total_steps": self.total_steps,
                             "next_lr": next_lr},
                "rng": self._rng_state(), "model_config": dataclasses.asdict(self.model_cfg),
                "train_config": dataclasses.asdict(c), "extra": self.extra_state}

    def _rng_state(self) -> dict:
        def encode(t):
            return base64.b64encode(t.numpy().tobytes()).decode()
        state = {"torch": encode(torch.get_rng_state())}
        if self.device.type == "cuda":
            state["cuda"] = encode(torch.cuda.get_rng_state(self.device.torch_device))
        if hasattr(self.device, "rng_state"):
            state["device"] = self.device.rng_state()
        return state

    def _set_rng_state(self, state: dict) -> None:
        def decode(text):
            return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
        torch.set_rng_state(decode(state["torch"]))
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(decode(state["cuda"]), self.device.torch_device)
        if hasattr(self.device, "set_rng_state") and "device" in state:
            self.device.set_rng_state(state["device"])

    def close(self) -> None:
        self.optimizer.wait_all()
        self.device.close()
        self.store.close()
