"""The dense decoder family's weights: each layer's parameters with their Hugging Face names and shapes, in the
order of the host store's flat buffers (``layer_layouts``), and the projections LoRA may adapt, with their names
as peft spells them (``TARGETS``, ``adapter_layouts``). Imports models.layout only: ``cfg`` is a ModelConfig, passed in (config imports this module)."""
from __future__ import annotations

from ..layout import LayerLayout, layout_of

# peft's target name -> the parameter key in a decoder layer's layout (layer_layouts)
TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down"}
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def layer_layouts(cfg) -> list[LayerLayout]:
    """[embed, layers.0 … layers.{L-1}, head] for this model."""
    H, V, I, D = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.head_dim
    layouts = [layout_of("embed", [("embed", "model.embed_tokens.weight", (V, H))])]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        specs = [
            ("q", pre + "self_attn.q_proj.weight", (cfg.q_size, H)),
            ("k", pre + "self_attn.k_proj.weight", (cfg.kv_size, H)),
            ("v", pre + "self_attn.v_proj.weight", (cfg.kv_size, H)),
            ("o", pre + "self_attn.o_proj.weight", (H, cfg.q_size)),
            ("gate", pre + "mlp.gate_proj.weight", (I, H)),
            ("up", pre + "mlp.up_proj.weight", (I, H)),
            ("down", pre + "mlp.down_proj.weight", (H, I)),
            ("input_norm", pre + "input_layernorm.weight", (H,)),
            ("post_norm", pre + "post_attention_layernorm.weight", (H,)),
        ]
        if cfg.attention_bias:
            specs += [("q_bias", pre + "self_attn.q_proj.bias", (cfg.q_size,)),
                      ("k_bias", pre + "self_attn.k_proj.bias", (cfg.kv_size,)),
                      ("v_bias", pre + "self_attn.v_proj.bias", (cfg.kv_size,))]
        if cfg.attention_out_bias:
            specs.append(("o_bias", pre + "self_attn.o_proj.bias", (H,)))
        if cfg.qk_norm:
            specs += [("q_norm", pre + "self_attn.q_norm.weight", (D,)),
                      ("k_norm", pre + "self_attn.k_norm.weight", (D,))]
        layouts.append(layout_of(f"layers.{i}", specs))
    head = [("norm", "model.norm.weight", (H,))]
    if not cfg.tie_word_embeddings:
        head.append(("lm_head", "lm_head.weight", (V, H)))
    layouts.append(layout_of("head", head))
    return layouts


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out_features N, in_features K) of each projection of a decoder layer."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {"q": (cfg.q_size, H), "k": (cfg.kv_size, H), "v": (cfg.kv_size, H), "o": (H, cfg.q_size),
            "gate": (I, H), "up": (I, H), "down": (H, I)}


def adapter_layouts(cfg, spec) -> list[LayerLayout]:
    """LoRA (``spec``: a lora.LoraSpec): one layout per store layer ([embed, decoders, head], as layer_layouts):
    the decoder layers' A and B of each target (keys "q.lora_A", "q.lora_B", ...; names as peft saves them), nothing for the embed and head."""
    if spec.target_parameters:
        raise ValueError(f"lora_target_parameters {list(spec.target_parameters)}: this model ({cfg.model_type}, the "
                         "hand-written dense family) has no MoE experts; adapt its projections with lora_targets")
    unknown = [t for t in spec.targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"lora_targets {list(spec.targets)}: {unknown} unknown; this model's projections are "
                         f"{list(TARGETS)}")
    chosen = {TARGETS[t] for t in spec.targets}
    shapes = projection_shapes(cfg)
    layouts = [layout_of("embed", [])]
    for i in range(cfg.num_layers):
        specs = []
        for key in (key for key in MODULES if key in chosen):     # the layer's order: q, k, v, o, gate, up, down
            N, K = shapes[key]
            pre = f"base_model.model.model.layers.{i}.{MODULES[key]}"
            specs += [(f"{key}.lora_A", f"{pre}.lora_A.weight", (spec.rank, K)),
                      (f"{key}.lora_B", f"{pre}.lora_B.weight", (N, spec.rank))]
        layouts.append(layout_of(f"layers.{i}", specs))
    layouts.append(layout_of("head", []))
    return layouts
