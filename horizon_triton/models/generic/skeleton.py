"""transformers' causal LM of a GenericConfig built on the meta device: the module code and shapes of the model,
no memory. The weights, the template and the config's checks read it. Imports nothing of the package; ``cfg`` is a
GenericConfig."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

MODEL_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")     # what the text model may hold (of its own)


@dataclass
class Skeleton:
    """The causal LM on the meta device: its text model, where the decoder layers sit, its name prefix."""
    lm: torch.nn.Module
    text_model: torch.nn.Module
    prefix: str                      # "model." : text model parameters' prefix in the causal LM's names

    @property
    def layers(self):
        return self.text_model.layers


def layer_constants(layer: torch.nn.Module) -> list[str]:
    """The layer's saved vector buffers (DeepSeek V3's and GLM-4.5's router score-correction bias): held and loaded
    like its parameters; no gradient reaches them and, as vectors, they take no weight decay, so the optimizer
    leaves them as loaded, as transformers' training does."""
    saved = layer.state_dict(keep_vars=True)
    return [name for name, buffer in layer.named_buffers() if name in saved and buffer.dim() == 1]


@functools.lru_cache(maxsize=4)
def skeleton(cfg) -> Skeleton:
    """transformers' causal LM of this config, on the meta device (no memory; shapes and module code only)."""
    import transformers
    hf = cfg.hf
    try:
        with torch.device("meta"):
            lm = transformers.AutoModelForCausalLM.from_config(hf)
    except ValueError as e:
        raise ValueError(f"model type {cfg.model_type!r}: transformers {transformers.__version__} has no causal LM "
                         f"class for it ({e})") from e
    prefix, text_model = None, None
    for name, module in lm.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == cfg.num_layers:
            prefix, text_model = (name + "." if name else ""), module
            break
    if text_model is None:
        raise ValueError(f"model type {cfg.model_type!r}: no decoder layer list of {cfg.num_layers} layers found in "
                         f"{type(lm).__name__}")
    extra = [n for n, _ in text_model.named_children() if n not in MODEL_PARTS]
    extra_params = [n for n, _ in lm.named_parameters() if not n.startswith(prefix)
                    and n != "lm_head.weight"]
    if extra or extra_params:
        raise ValueError(f"model type {cfg.model_type!r}: model-level parts {extra + extra_params} (e.g. per-layer "
                         "input embeddings) are not supported yet: the engine streams decoder layers between an "
                         "embedding, a final norm and the head")
    unbound = [f"layers.{i}.{n}" for i, layer in enumerate(text_model.layers)
               for n, _ in layer.named_buffers() if n not in layer_constants(layer)]
    if unbound:
        raise ValueError(f"model type {cfg.model_type!r}: decoder layers hold buffers {unbound[:3]} that are not "
                         "saved with the model or not vectors, which the stateless layer template cannot bind yet")
    norm_params = [(n, tuple(p.shape)) for n, p in text_model.norm.named_parameters()]
    if norm_params != [("weight", (cfg.hidden_size,))]:
        raise ValueError(f"model type {cfg.model_type!r}: final norm parameters {norm_params}; the head supports one "
                         f"weight of hidden size {cfg.hidden_size}")
    return Skeleton(lm, text_model, prefix)
