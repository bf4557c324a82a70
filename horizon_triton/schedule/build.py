"""The host store and the pipeline a step runs on, built from the configs: the Engine's for training, and the dry
run's (planning/dryrun.py) the same on the meta device, so that what the dry run counts is what the engine
builds. Imports host, objectives.lora, state.checkpoint and schedule.pipeline."""
from __future__ import annotations

from ..config import ModelConfig, TrainConfig
from ..host.store import HostStore
from ..objectives.lora import spec_of
from ..state.checkpoint import DTYPES
from .pipeline import Pipeline, build_pipeline


def build_store(model_cfg: ModelConfig, train_cfg: TrainConfig, device, shared=None) -> HostStore:
    """The host store of ``train_cfg``'s layout for ``device`` (a device object: pinned where it pins; on the
    meta device, sizes without memory); ``shared``: a NodeShare, one store for the node's ranks."""
    return HostStore(model_cfg, DTYPES[train_cfg.compute_dtype], pin=device.pin_memory,
                     device="meta" if device.type == "meta" else "cpu", optimizer_states=train_cfg.optimizer_states,
                     lora=spec_of(train_cfg), shared=shared)


def build_step_pipeline(model_cfg: ModelConfig, train_cfg: TrainConfig, store: HostStore, ops, device, optimizer,
                        tracer=None) -> Pipeline:
    """build_pipeline with train_cfg's slots, checkpoint budget, head chunk and MoE micro-batch merging."""
    return build_pipeline(model_cfg, store, ops, device, optimizer, train_cfg.num_slots, tracer,
                          train_cfg.checkpoint_budget_bytes, train_cfg.head_chunk_rows,
                          train_cfg.moe_merge_microbatches)
