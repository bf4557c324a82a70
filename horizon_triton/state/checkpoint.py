"""Hugging Face checkpoints in and out of the host store, tensor by tensor (never a whole-model copy)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import durable
from ..host.store import HostStore
from ..models.family import is_generic
from ..models.generic.weights import checkpoint_sources

SHARD_BYTES = 5 * 1000**3  # transformers' default shard size: above it, shards plus an index
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tensor_files(path: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from the index when the checkpoint is sharded."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        absent = sorted({file for file in weight_map.values() if not (path / file).is_file()})
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) missing from {path}: {', '.join(absent)}")
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path} (PyTorch .bin checkpoints are not supported)")
    names = {}
    for file in files:
        with _open(file) as f:
            names.update({name: file for name in f.keys()})
    return names


def _open(file: Path):
    if not file.is_file():
        raise FileNotFoundError(f"safetensors file {file} is missing")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt headers
        raise ValueError(f"cannot read {file}: {e} (truncated or corrupt file?)") from e


LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")
IGNORED_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")     # a buffer older checkpoints saved, as transformers


def _unexpected_layer_tensors(path: Path, files: dict, wanted: set, cfg) -> None:
    """Refuses decoder-layer tensors the config does not account for: a config.json with fewer layers than the
    weights (which would train a truncated model), or layer parts of another architecture."""
    extra = sorted((name for name in files if LAYER_TENSOR.match(name) and name not in wanted
                    and not IGNORED_TENSORS.search(name)), key=lambda n: (int(LAYER_TENSOR.match(n)[1]), n))
    if not extra:
        return
    layers = 1 + max(int(LAYER_TENSOR.match(name)[1]) for name in files if LAYER_TENSOR.match(name))
    if layers > cfg.num_layers:
        raise ValueError(f"checkpoint {path} holds {layers} decoder layers, its config.json says "
                         f"num_hidden_layers {cfg.num_layers}: the config does not describe these weights (fix "
                         "config.json, or cut the weights too)")
    raise ValueError(f"checkpoint {path} holds {len(extra)} layer tensor(s) its config.json does not describe, e.g. "
                     f"{extra[:3]} (another architecture, or a config of another model?)")


def refuse_non_finite(name: str, tensor: torch.Tensor, where) -> None:
    """A model is never written with NaN or infinite weights."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} has non-finite values (NaN or inf): not saving {where} (the training diverged)")


def load_weights(store: HostStore, path: str | Path) -> None:
    """Fills the store's master weights (both halves, exactly, in bf16 mode) from a HF checkpoint directory,
    one tensor at a time."""
    path = Path(path)
    files = _tensor_files(path)
    wanted = list(store.named_params())
    ways = checkpoint_sources(store.cfg) if is_generic(store.cfg) else {}
    found, missing = {}, []
    for name, _, _ in wanted:       # the name itself, or (generic models) a renamed name or split experts
        way = next((w for w in ways.get(name, [name]) if all(n in files for n in _source_names(w))), None)
        if way is None:
            missing.append(name)
        found[name] = way
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    _unexpected_layer_tensors(path, files, {n for way in found.values() for n in _source_names(way)}, store.cfg)
    by_file: dict[Path, list] = {}
    for name, layer, param in wanted:
        by_file.setdefault(files[_source_names(found[name])[0]], []).append((name, layer, param))
    for file, items in by_file.items():
        with _open(file) as f:
            for name, layer, param in items:
                way = found[name]
                tensor = (_read(f, file, way) if isinstance(way, str)
                          else way.assemble(lambda n: _read_any(files, n)))
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"tensor {name} in {file} has shape {tuple(tensor.shape)}, the config implies "
                                     f"{tuple(param.shape)}")
                store.set_master(layer, tensor, param.offset)


def _source_names(way) -> list[str]:
    return [way] if isinstance(way, str) else way.names()


def _read(f, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise ValueError(f"cannot read tensor {name} from {file}: {e} (truncated file?)") from e


def _read_any(files: dict, name: str) -> torch.Tensor:
    with _open(files[name]) as f:
        return _read(f, files[name], name)


def is_model_file(name: str) -> bool:
    """The files of a saved model (weights, config, or LoRA adapters): a new save replaces all of them."""
    return name in ("config.json", "model.safetensors.index.json", "adapter_config.json",
                    "adapter_model.safetensors") or (name.startswith("model") and name.endswith(".safetensors"))


def save_weights(store: HostStore, out_dir: str | Path, dtype: torch.dtype, add_files=None, tensor_of=None) -> None:
    """Writes config.json + model.safetensors (or shards + index) from the fp32 master weights (in bf16 mode the
    exact master reconstructed from its halves, so dtype="float32" saves what the optimizer holds), and whatever
    ``add_files(tmp_dir)`` adds (a tokenizer, metrics).

    Everything goes to a temporary sibling of out_dir, fsynced and swapped in as one unit (durable.replace_dir),
    so a kill at any instant leaves the old directory or the new one, never a mixture. The old directory's
    other entries (files the user put there, a run's checkpoints) that the new one lacks are moved into it; its
    model files go. Temporaries a killed save left are cleaned up by the next save. ``tensor_of(layer, param)``,
    if given, gives each parameter's fp32 value instead of the master (a LoRA merge, lora.merged_values)."""
    out_dir = Path(out_dir)
    with durable.assembled(out_dir, keep=lambda name: not is_model_file(name)) as tmp:
        dtype_name = str(dtype).replace("torch.", "")
        store.cfg.to_hf_config(dtype_name).save_pretrained(tmp)
        named = list(store.named_params())
        shards, current, size = [], [], 0
        for name, layer, param in named:
            nbytes = param.numel * dtype.itemsize
            if current and size + nbytes > SHARD_BYTES:
                shards.append(current)
                current, size = [], 0
            current.append((name, layer, param))
            size += nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            # one shard converted at a time: the copy is bounded by the shard size, not the model; the fp32
            # master is read (in bf16 mode reconstructed from its halves) one parameter at a time
            value = tensor_of or (lambda layer, p: store.master_values(layer, p.offset, p.offset + p.numel)
                                  .view(p.shape))
            tensors = {name: value(layer, p).to(dtype, copy=True) for name, layer, p in shard}
            for name, tensor in tensors.items():
                refuse_non_finite(name, tensor, out_dir)
            with durable.naming(tmp / file):
                save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
            weight_map.update({name: file for name, _, _ in shard})
        if len(shards) > 1:
            total = sum(p.numel * dtype.itemsize for _, _, p in named)
            with durable.naming(tmp / "model.safetensors.index.json"):
                (tmp / "model.safetensors.index.json").write_text(
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if add_files is not None:
            with durable.naming(tmp):
                add_files(tmp)
