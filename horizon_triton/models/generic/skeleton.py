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


def layer_buffers(layer: torch.nn.Module, where: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a decoder layer's buffers: values of the checkpoint the layer computes with but does not
    train (Gemma 4's ``layer_scalar``). They travel in the layer's flat buffer beside its parameters (loaded and
    saved with them) and the template binds them without a gradient, so AdamW leaves them as loaded (a zero
    gradient moves nothing, and only matrices decay: hence 0-D and 1-D ones only). A buffer the checkpoint does
    not hold (non-persistent: computed from the config when the module is built) has no value on the meta
    device, and is refused."""
    persistent = layer.state_dict(keep_vars=True)
    out = []
    for name, buffer in layer.named_buffers():
        if name not in persistent:
            raise ValueError(f"{where} holds buffer {name!r}, computed when the module is built and not stored in "
                             "checkpoints: the layer template, built on the meta device, has no value for it")
        if buffer.dim() > 1:
            raise ValueError(f"{where} holds buffer {name!r} of shape {tuple(buffer.shape)}: only 0-D and 1-D "
                             "buffers are bound (they are kept with the weights and must not take weight decay)")
        out.append((name, tuple(buffer.shape)))
    return out


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
    for i, layer in enumerate(text_model.layers):
        layer_buffers(layer, f"model type {cfg.model_type!r}: layer {i}")          # refuses what it cannot bind
    shared = getattr(hf, "num_kv_shared_layers", 0) or 0
    if shared:
        raise ValueError(f"model type {cfg.model_type!r}: its last {shared} decoder layers reuse the keys and values "
                         "of earlier layers (num_kv_shared_layers), which the layer template, running one layer at "
                         "a time, cannot pass between layers; a config with num_kv_shared_layers=0 trains")
    norm_params = [(n, tuple(p.shape)) for n, p in text_model.norm.named_parameters()]
    if norm_params != [("weight", (cfg.hidden_size,))]:
        raise ValueError(f"model type {cfg.model_type!r}: final norm parameters {norm_params}; the head supports one "
                         f"weight of hidden size {cfg.hidden_size}")
    return Skeleton(lm, text_model, prefix)
