"""The mixture-of-experts facts of a plan: how much of the model (and of the host store) the experts are, how many
tokens each expert's GEMMs get per micro-batch when the routing is balanced, and how many they would need to hide
the bus traffic of their own weights.

Read from the skeleton (transformers' fused experts modules: gate_up_proj and down_proj of [E, ., .], biases
beside them in gpt-oss) and the config's num_experts_per_tok. The hiding figure is a roofline of one expert per
micro-batch: its weights cross in twice (forward, recompute) in the compute dtype and its gradient out once (not
when frozen: LoRA), while its GEMMs do 2 FLOPs per parameter per token in the forward, 2 in the recompute, 2 for
the input gradient and 2 for the weight gradient (not when frozen); copies in and out run on their own streams.
So a trained expert hides its weights' traffic at bf16 rate F and bus B from F·2·itemsize / (8·B) tokens on, the
same for every model: what differs is how many tokens a model's routing gives each expert.

Skewed routing (``skew``, default 2): the busiest expert of a layer gets skew × the balanced T·k/E tokens (at most
T: a token picks an expert once). Time model: a layer's experts run as one grouped GEMM whose time is set by its
busiest group, ∝ E × the busiest expert's tokens (the pessimistic bound: the other groups' tiles finish early and
their SMs wait; the optimistic bound, time ∝ Σ tokens, makes skew cost nothing). Under it the same useful FLOPs
take ``experts_time_factor`` = busiest / balanced times as long. The weights of all E experts cross the bus whatever
the routing, so that longer GEMM hides them from fewer tokens per micro-batch (balanced ÷ skew): skew does
not raise the tokens needed to hide the copies, it lowers the experts' useful rate by the factor. Imports
models.family and models.generic.experts."""
from __future__ import annotations

from ..models.family import layer_layouts
from ..models.generic.experts import is_experts_module
from ..models.generic.skeleton import skeleton

# FLOPs per expert parameter per routed token in a step: forward 2, recompute 2, input gradient 2, weight gradient 2
FLOPS_PER_PARAMETER = {"trained": 8, "frozen": 6}
WEIGHT_CROSSINGS_IN = 2          # forward and recompute
DEFAULT_SKEW = 2.0               # the busiest expert's tokens over the balanced T·k/E


def experts_layers(cfg) -> list[tuple[int, int, int]]:
    """(decoder layer index, experts E, experts' parameters) of each decoder layer holding a fused experts module."""
    out = []
    for i, layer in enumerate(skeleton(cfg).layers):
        modules = [m for m in layer.modules() if is_experts_module(m)]
        if not modules:
            continue
        if len(modules) > 1:
            raise ValueError(f"decoder layer {i} of {cfg.model_type!r} holds {len(modules)} experts modules; the MoE "
                             "plan reads one per layer")
        module = modules[0]
        out.append((i, module.gate_up_proj.shape[0], sum(p.numel() for p in module.parameters())))
    return out


def top_k(cfg) -> int:
    """Experts each token is routed to (the config's num_experts_per_tok, which every fused-experts family has)."""
    k = cfg.hf.num_experts_per_tok if hasattr(cfg.hf, "num_experts_per_tok") else None
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"model type {cfg.model_type!r} has experts modules but its config gives no "
                         f"num_experts_per_tok ({k!r}): the MoE plan needs the experts per token")
    return k


def moe_summary(cfg, dry, hw: dict, skew: float = DEFAULT_SKEW) -> dict | None:
    """The "moe" entry of plan() (``dry``: its DryRun, ``hw``: its hardware figures); None for a model without
    experts modules. Tokens are per micro-batch: the weights stream once per micro-batch, so what hides their
    traffic is the tokens each expert computes between two streams of it. ``skew``: the busiest expert's tokens
    over the balanced T·k/E (the module's docstring says what the skewed figures assume)."""
    if not skew >= 1:
        raise ValueError(f"moe skew {skew!r}: the busiest expert's tokens over the balanced T·k/E, so at least 1 "
                         "(1: balanced routing)")
    if not getattr(cfg, "generic", False):
        return None
    layers = experts_layers(cfg)
    if not layers:
        return None
    counts = {e for _, e, _ in layers}
    if len(counts) > 1:
        raise ValueError(f"{cfg.model_type!r}: experts per layer differ ({sorted(counts)}); the MoE plan reads one E")
    experts, k = counts.pop(), top_k(cfg)
    sizes = [layout.numel for layout in layer_layouts(cfg)]      # [embed, decoder layers, head]
    base = [a for a in dry.layer_allocations if not a.kind.startswith("lora_")]
    layer_bytes = {}
    for a in base:
        layer_bytes[a.layer] = layer_bytes.get(a.layer, 0) + a.reserved_bytes
    # each layer's store buffers hold its parameters in one flat buffer per kind: the experts' share of a layer's
    # bytes is their share of its parameters
    experts_bytes = sum(layer_bytes[i + 1] * n / sizes[i + 1] for i, _, n in layers)
    store_bytes = sum(n for _, _, n in dry.host_store)
    frozen = any(a.frozen for a in base)
    rows, seq = dry.micro_batches[0]
    tokens = rows * seq
    per_expert = tokens * k / experts
    itemsize = 4 if dry.train_cfg.compute_dtype == "float32" else 2
    bus_seconds_per_parameter = max(WEIGHT_CROSSINGS_IN * itemsize / (hw["h2d_gbps"] * 1e9),
                                    (0 if frozen else itemsize) / (hw["d2h_gbps"] * 1e9))
    rate = (hw["fp32_tflops"] if itemsize == 4 else hw["bf16_tflops"]) * 1e12
    needed = bus_seconds_per_parameter * rate / FLOPS_PER_PARAMETER["frozen" if frozen else "trained"]
    busiest = min(skew * per_expert, tokens)
    return {"experts_parameters": sum(n for _, _, n in layers), "experts_layers": len(layers),
            "experts_per_layer": experts, "top_k": k, "frozen": frozen,
            "experts_host_bytes": experts_bytes, "experts_share_of_host_store": experts_bytes / store_bytes,
            "tokens_per_micro_batch": tokens, "tokens_per_expert": per_expert,
            "tokens_per_expert_per_step": dry.tokens_per_step * k / experts,
            "tokens_per_expert_to_hide": needed, "hiding_ratio": per_expert / needed,
            "tokens_per_micro_batch_to_hide": needed * experts / k,
            "skew": skew, "tokens_per_expert_busiest": busiest, "experts_time_factor": busiest / per_expert,
            "hiding_ratio_skewed": busiest / needed,
            # the busiest expert reaches `needed` at T·k/E·skew = needed, or at T = needed where skew hits the cap
            "tokens_per_micro_batch_to_hide_skewed": max(needed * experts / k / skew, needed)}
