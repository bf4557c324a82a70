"""Which model family a configuration belongs to, and that family's parts: the hand-written dense decoder
(models/dense: Llama, Mistral, Qwen2, Qwen3, a ModelConfig) or transformers' own layer code for any other decoder
(models/generic, a GenericConfig). Imports both families."""
from __future__ import annotations

from .dense import layer as dense_layer
from .dense import weights as dense_weights
from .generic import weights as generic_weights
from .generic.experts import is_experts_module
from .generic.skeleton import skeleton
from .generic.template import GenericTemplate


def is_generic(cfg) -> bool:
    return getattr(cfg, "generic", False)


def has_moe_experts(cfg) -> bool:
    """Whether the model's layers hold experts the MoE kernels run (transformers' fused experts modules); the
    hand-written dense family has none."""
    return is_generic(cfg) and any(is_experts_module(m) for m in skeleton(cfg).layers.modules())


def layer_layouts(cfg):
    """[embed, decoder layers, head]: each layer's parameters in the host store's order."""
    return (generic_weights if is_generic(cfg) else dense_weights).layer_layouts(cfg)


def adapter_layouts(cfg, spec):
    """LoRA: [embed, decoder layers, head], each layer's adapters (``spec``: a lora.LoraSpec, whose target names
    are checked here against the model's projections)."""
    return (generic_weights if is_generic(cfg) else dense_weights).adapter_layouts(cfg, spec)


def layer_template(cfg, device, dtype):
    """What computes a layer: the dense template's functions, or a GenericTemplate for this model and device."""
    return GenericTemplate(cfg, device, dtype) if is_generic(cfg) else dense_layer
