"""The generic family's weights: each layer's parameters in the host store's order with their transformers names
(``layer_layouts``, from the model's modules on the meta device: skeleton.py), and where a checkpoint on
disk keeps them under other names or split (``checkpoint_sources``: transformers 5 fuses the experts of MoE
checkpoints, which the hub stores one tensor per expert, when it loads them; we do the same, tensor by tensor).
Saved weights keep the in-memory names, which transformers 5 loads as they are. LoRA's adapters sit on the decoder
layers' nn.Linear modules that peft's target_modules rule picks and on the MoE experts' weights its
target_parameters pick (``adapter_layouts``). Imports models.layout, skeleton and experts; ``cfg`` is a
GenericConfig."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..layout import LayerLayout, layout_of
from .experts import ADAPTABLE, is_experts_module
from .skeleton import layer_buffers, skeleton

def layer_layouts(cfg) -> list[LayerLayout]:
    """[embed, layers.0 … layers.{L-1}, head], each decoder layer with every parameter and buffer of its module
    (keys: the names inside the layer, e.g. "self_attn.q_proj.weight"; buffers: skeleton.layer_buffers)."""
    sk = skeleton(cfg)
    H, V, pre = cfg.hidden_size, cfg.vocab_size, sk.prefix
    layouts = [layout_of("embed", [("embed", pre + "embed_tokens.weight", (V, H))])]
    for i, layer in enumerate(sk.layers):
        state = [(name, tuple(p.shape)) for name, p in layer.named_parameters()] + layer_buffers(layer, f"layer {i}")
        specs = [(name, f"{pre}layers.{i}.{name}", shape) for name, shape in state]
        layouts.append(layout_of(f"layers.{i}", specs))
    head = [("norm", pre + "norm.weight", (H,))]
    if not cfg.tie_word_embeddings:
        head.append(("lm_head", "lm_head.weight", (V, H)))
    layouts.append(layout_of("head", head))
    return layouts


# ---------------------------------------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------------------------------------
def _matches(name: str, target: str) -> bool:
    """peft's rule for a target_modules list: the module's full name is the target or ends with "." + target."""
    return name == target or name.endswith("." + target)


def _linear_modules(cfg) -> list[str]:
    """The names inside a decoder layer of the nn.Linear modules LoRA may adapt, over every layer, in module order
    (what an error lists)."""
    names = []
    for layer in skeleton(cfg).layers:
        names += [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n not in names]
    return names


def _refuse_targets(cfg, targets) -> None:
    """A target must name decoder layers' nn.Linear modules only (as peft would adapt it, and all of what peft
    would adapt): not a module outside the layers (the head, the embedding: frozen here), not another kind of
    module (a router holding its own weight, a fused-experts module) nor a parameter of one (the experts' 3-D
    gate_up_proj / down_proj, which peft's target_modules does not reach and its target_parameters handles
    differently across versions)."""
    sk = skeleton(cfg)
    in_layers = f"{sk.prefix}layers."
    available = _linear_modules(cfg)
    for target in targets:
        linear, other, outside = [], [], []
        for name, module in sk.lm.named_modules():
            if not _matches(name, target):
                continue
            if not name.startswith(in_layers):
                outside.append(name)
            else:
                (linear if isinstance(module, torch.nn.Linear) else other).append(f"{name} ({type(module).__name__})")
        stored = [f"{name} {tuple(p.shape)}" for name, p in sk.lm.named_parameters()
                  if name.startswith(in_layers) and p.dim() > 2 and _matches(name, target)]
        if outside:
            raise ValueError(f"lora_targets: {target!r} names {outside[:2]}, outside the decoder layers (frozen "
                             f"here); give names among the layers' linear projections {available}")
        if stored or other:
            raise ValueError(f"lora_targets: {target!r} names {(stored + other)[:2]}, which is not an nn.Linear: "
                             "fused MoE experts stored as 3-D parameters take lora_target_parameters (peft's "
                             "target_parameters, e.g. mlp.experts.gate_up_proj); routers and other modules holding "
                             "their own weights are not covered by LoRA here; give names among the layers' linear "
                             f"projections {available}")
        if not linear:
            raise ValueError(f"lora_targets: {target!r} matches no module of model type {cfg.model_type!r}; give "
                             f"names among the decoder layers' linear projections {available}")


def adapter_layouts(cfg, spec) -> list[LayerLayout]:
    """LoRA (``spec``: a lora.LoraSpec): one layout per store layer ([embed, decoders, head]): in each decoder
    layer, for every nn.Linear a target matches (peft's target_modules rule), A [r, in] and B [out, r] under keys
    "<module>.lora_A" / "<module>.lora_B" (e.g. "self_attn.q_proj.lora_A") and peft's saved names
    (base_model.model.<module's full name>.lora_A.weight); for every MoE experts weight a target parameter matches
    (peft's target_parameters), A [r·E, in] and B [out, r·E] under "<module>.<weight>.lora_A" / ".lora_B", as
    peft's ParamWrapper holds them (``experts_adapters``); nothing for the embed and head."""
    if spec.targets:
        _refuse_targets(cfg, spec.targets)
    _refuse_target_parameters(cfg, spec.target_parameters)
    sk = skeleton(cfg)
    layouts = [layout_of("embed", [])]
    for i, layer in enumerate(sk.layers):
        specs = []
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and any(_matches(f"{sk.prefix}layers.{i}.{name}", t)
                                                           for t in spec.targets):
                pre = f"base_model.model.{sk.prefix}layers.{i}.{name}"
                specs += [(f"{name}.lora_A", f"{pre}.lora_A.weight", (spec.rank, module.in_features)),
                          (f"{name}.lora_B", f"{pre}.lora_B.weight", (module.out_features, spec.rank))]
            specs += experts_adapters(f"{sk.prefix}layers.{i}.", name, module, spec)
        layouts.append(layout_of(f"layers.{i}", specs))
    layouts.append(layout_of("head", []))
    return layouts


def _experts_weights(module) -> list[str]:
    """The 3-D weights of a transformers fused experts module LoRA may adapt (those the experts compute with:
    experts.ADAPTABLE, [E, ., .]), in the module's order; none for any other module."""
    if not is_experts_module(module):
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and n in ADAPTABLE]


def experts_adapters(layer_prefix: str, name: str, module, spec) -> list[tuple]:
    """Layout specs of the adapters of experts module ``name`` (inside a layer whose full name starts with
    layer_prefix): for each of its 3-D weights W[E, out, in] ([E, in, out] where the module stores them transposed)
    that spec.target_parameters matches, A [r·E, in] and B [out, r·E] (peft's ParamWrapper: A_e = A[e·r:(e+1)·r],
    B_e = B viewed [out, r, E] at e). peft nests one wrapper per adapted weight, the module's first weight
    innermost: its names carry one "base_layer." per weight adapted after it."""
    chosen = [w for w in _experts_weights(module)
              if any(_matches(f"{layer_prefix}{name}.{w}", t) for t in spec.target_parameters)]
    specs = []
    for depth, weight in enumerate(chosen):
        E, d1, d2 = getattr(module, weight).shape
        (n_in, n_out) = (d1, d2) if module.is_transposed else (d2, d1)
        pre = f"base_model.model.{layer_prefix}{name}." + "base_layer." * (len(chosen) - 1 - depth)
        specs += [(f"{name}.{weight}.lora_A", f"{pre}lora_A.weight", (spec.rank * E, n_in)),
                  (f"{name}.{weight}.lora_B", f"{pre}lora_B.weight", (n_out, spec.rank * E),
                   bool(module.is_transposed))]
    return specs


def _refuse_target_parameters(cfg, targets) -> None:
    """Each target parameter must name MoE experts' 3-D weights inside the decoder layers (peft's
    target_parameters, matched as its target_modules are)."""
    sk = skeleton(cfg)
    available = []
    for i, layer in enumerate(sk.layers):
        for name, module in layer.named_modules():
            available += [f"{name}.{w}" for w in _experts_weights(module) if f"{name}.{w}" not in available]
    for target in targets:
        if not any(_matches(f"{sk.prefix}layers.{i}.{w}", target) for i in range(len(sk.layers)) for w in available):
            raise ValueError(f"lora_target_parameters: {target!r} matches no MoE experts weight of model type "
                             f"{cfg.model_type!r}; give names among {available or 'none: it has no fused experts'}")


# ---------------------------------------------------------------------------------------------------------
# checkpoint names on disk
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sources:
    """A parameter stored on disk as groups of tensors: each group stacked on dim 0 (one tensor per expert), the
    stacked groups concatenated on ``concat_dim`` (gate and up)."""
    groups: tuple[tuple[str, ...], ...]
    concat_dim: int | None

    def names(self) -> list[str]:
        return [name for group in self.groups for name in group]

    def assemble(self, read) -> torch.Tensor:
        stacked = [torch.stack([read(name) for name in group]) for group in self.groups]
        return stacked[0] if self.concat_dim is None else torch.cat(stacked, dim=self.concat_dim)


def _conversions(model_type: str) -> list:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:          # a transformers without checkpoint conversions: names on disk are the module's
        return []
    return list(get_checkpoint_conversion_mapping(model_type) or [])


def _renamer(transforms) -> callable:
    """in-memory name -> its name on disk, undoing transformers' renamings (plain substrings and prefix changes)."""
    rules = []
    for t in transforms:
        kind = type(t).__name__
        if kind not in ("WeightRenaming", "PrefixChange"):
            continue
        for source, target in zip(t.source_patterns, t.target_patterns):
            if kind == "WeightRenaming" and re.escape(source).replace("\\.", ".") == source.replace("\\.", "."):
                rules.append((re.compile(re.escape(target)), source.replace("\\.", ".")))
            elif kind == "PrefixChange" and source.startswith("^") and "(.+)" in source:
                disk = source[1:].replace("(.+)", r"\1").replace("\\.", ".")
                rules.append((re.compile("^" + re.escape(target).replace(r"\\1", "(.+)")), disk))

    def to_disk(name: str) -> str:
        for pattern, repl in rules:
            name = pattern.sub(repl, name)
        return name
    return to_disk


def checkpoint_sources(cfg) -> dict[str, list]:
    """in-memory name -> the ways a checkpoint may hold it, in the order tried: [the name itself, its renamed
    name, or Sources (split experts)]."""
    transforms = _conversions(cfg.model_type)
    to_disk = _renamer(transforms)
    merges = []
    for t in transforms:
        ops = [type(op).__name__ for op in getattr(t, "operations", [])]
        if type(t).__name__ != "WeightConverter" or not ops or ops[0] != "MergeModulelist" \
                or getattr(t.operations[0], "dim", 0) != 0 or len(t.target_patterns) != 1:
            continue
        concat = None
        if ops[1:] == ["Concatenate"]:
            concat = t.operations[1].dim
        elif ops[1:]:
            continue
        merges.append((t.target_patterns[0].strip("."), [p.strip(".") for p in t.source_patterns], concat))
    out = {}
    for layout in layer_layouts(cfg):
        for p in layout.params:
            ways = [p.hf_name]
            if to_disk(p.hf_name) != p.hf_name:
                ways.append(to_disk(p.hf_name))
            for target, patterns, concat in merges:
                if p.hf_name.endswith("." + target):
                    stem = p.hf_name[:-len(target)]
                    names = [[stem + pattern.replace("*", str(e)) for e in range(p.shape[0])] for pattern in patterns]
                    # split experts under the in-memory prefix (a text model saved alone) or the renamed one (its
                    # multimodal checkpoint)
                    for rename in (str, to_disk):
                        groups = tuple(tuple(rename(n) for n in group) for group in names)
                        if Sources(groups, concat) not in ways:
                            ways.append(Sources(groups, concat))
            out[p.hf_name] = ways
    return out
