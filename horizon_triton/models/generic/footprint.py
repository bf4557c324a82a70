"""What one decoder layer of a generic model holds on the device through its recompute + backward, measured on
the meta device (``backward_bytes``): the activation-checkpoint budget and the dry run read it. Imports the
template."""
from __future__ import annotations

import concurrent.futures
import functools
import weakref
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from horizon_triton.kernels import reference

from .config import GenericConfig
from .experts import Experts, experts_on
from .skeleton import layer_buffers
from .template import GenericTemplate


class _LiveBytes(TorchDispatchMode):
    """The bytes of the storages made under it that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self._seen:
                storage = t.untyped_storage()
                self._seen.add(storage._cdata)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage._cdata, storage.nbytes())
        return out


@functools.lru_cache(maxsize=2)
def _meta_template(cfg: GenericConfig, dtype: torch.dtype) -> GenericTemplate:
    return GenericTemplate(cfg, torch.device("meta"), dtype)


@functools.lru_cache(maxsize=64)
def backward_bytes(cfg: GenericConfig, dtype: torch.dtype, rows: int, seq: int) -> int:
    """Device bytes one decoder layer's recompute + backward holds at its peak for a micro-batch of rows × seq
    tokens, beyond its input, its output's gradient, its weights and the template's layer inputs: the most over
    the model's kinds of layer. Measured: on the meta device, decoder_backward of the first layer of each
    kind (its class, its entry of the config's layer_types, its parameters' shapes) for a micro-batch of one
    document a row, every storage made during the call counted from its allocation until it dies, the peak
    taken (the recompute's saved tensors, the backward's gradients, the weights' gradients before they are
    added to the accumulator; MoE experts add theirs into it directly). Attention runs as CUDA's fused kernels
    would (fused_attention_on). Measured in a thread of its own: dispatch modes are per thread, so a caller's
    (the dry run's op counter) sees none of it."""
    def measure() -> int:
        tpl = _meta_template(cfg, dtype)
        meta = torch.device("meta")
        mb = SimpleNamespace(shape=(rows, seq), doc_ids=None, model_inputs=None,
                             host_layout=(torch.arange(seq).expand(rows, seq), None, None))
        tpl.layer_inputs(mb)
        kinds = getattr(cfg.hf, "layer_types", None) or [None] * cfg.num_layers
        seen, peak = set(), 0
        for i, layer in enumerate(tpl.layers):
            params = dict(layer.named_parameters())
            kind = (type(layer), kinds[i], tuple((n, tuple(p.shape)) for n, p in params.items()))
            if kind in seen:
                continue
            seen.add(kind)
            w = {n: torch.empty(p.shape, dtype=dtype, device=meta) for n, p in params.items()}
            w.update({n: torch.empty(shape, dtype=dtype, device=meta)       # saved buffers (router biases)
                      for n, shape in layer_buffers(layer, f"layer {i}")})
            g = {n: torch.empty(p.shape, dtype=torch.float32, device=meta) for n, p in params.items()}
            x, d_out = (torch.empty(rows * seq, cfg.hidden_size, dtype=dtype, device=meta) for _ in range(2))
            # no ops: attention as transformers' (sdpa runs as CUDA's fused kernels); MoE experts on the torch
            # references, which allocate what the engine's experts allocate and compute nothing on meta
            with _LiveBytes() as live, experts_on(Experts(reference, tpl.experts_fallback, tpl.expert_gates)):
                tpl.decoder_backward(None, cfg, w, g, x, mb, d_out, i + 1)
            peak = max(peak, live.peak)
        return peak

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(measure).result()

