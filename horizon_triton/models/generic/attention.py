"""The attention implementation the generic template runs transformers' layers with, registered under ``NAME``
with transformers' attention and mask interfaces.

Masks: what transformers asks for each layer kind (causal, sliding window, chunked, padding), AND-ed with the
micro-batch's attention documents (``documents``: packed sequences, and each padding token a document of its
own, as the hand-written template masks them). The mask interface returns a ``LazyMask``: the [B, 1, S, S] mask
is built only when a layer falls back to transformers' attention; a layer on the kernel path only asks whether
the kernels' own masking (causal, documents, the layer's window) computes it, which is worked out once per
micro-batch and mask kind, a block of query rows at a time (O(B·S²) comparisons, nothing S×S kept).

Attention: the engine's kernels (``ops.attention_forward`` / ``attention_backward`` inside an autograd Function)
wherever they compute what the layer asks for; otherwise transformers' own function for the model, SDPA or the
model's eager attention (which alone handles sinks and soft-capped scores), fed the mask in the form it takes,
with the reason logged once per template. Imports nothing of the package."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading
from typing import Callable

import torch

NAME = "horizon"
ROW_BLOCK_ELEMENTS = 1 << 24     # (query, key) pairs compared at once when checking a mask against the kernels'
# what transformers' layers pass to the attention function that the kernel path can ignore: no value changes the
# result (position ids and sequence lengths describe what the documents and the mask already say)
IGNORED_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions", "past_key_values",
                            "past_key_value", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})

log = logging.getLogger("horizon_triton")
_state = threading.local()       # the micro-batch's documents, the mask form and the kernels, around the model's calls


@dataclasses.dataclass
class Kernels:
    """The kernel path of one template: the engine's ops, ``refusal(head_dim, dtype)`` -> why they cannot take
    that head dim and dtype (None: they can), and the fallback reasons already announced."""
    ops: object
    refusal: Callable[[int, torch.dtype], str | None]
    announced: set


@contextlib.contextmanager
def documents(doc_ids, eager: bool, kernels: Kernels | None = None):
    """Within: masks keep a query from keys of other documents (doc_ids int32 [B, S], None: one per row), in the
    form the model's attention takes (eager: additive float, else boolean); attention runs on ``kernels`` where
    they apply (None: always transformers' attention)."""
    old = getattr(_state, "value", None)
    _state.value = (doc_ids, eager, kernels)
    try:
        yield
    finally:
        _state.value = old


def _same_document(doc_ids):
    def fn(batch_idx, head_idx, q_idx, kv_idx):
        return doc_ids[batch_idx, q_idx] == doc_ids[batch_idx, kv_idx]
    return fn


class LazyMask:
    """transformers' mask for one layer kind of one micro-batch: its arguments, the tensor built on first use."""

    def __init__(self, doc_ids, eager: bool, args: tuple, kwargs: dict, convert=None):
        self.doc_ids, self.eager, self.args, self.kwargs = doc_ids, eager, args, kwargs
        self.convert = convert    # applied to the built tensor (the dry run's: a meta tensor of its shape)
        self._built = False
        self._tensor = None
        self._windows = None      # (smallest, largest) window the kernels compute this mask with, or a refusal

    def converted(self, convert) -> "LazyMask":
        """The same mask, its tensor passed through ``convert`` when it is built."""
        return LazyMask(self.doc_ids, self.eager, self.args, self.kwargs, convert)

    def tensor(self):
        """The mask as transformers' attention takes it (None: SDPA's own causal masking suffices)."""
        if not self._built:
            from transformers import masking_utils
            kwargs = dict(self.kwargs)
            if self.doc_ids is not None:
                kwargs["mask_function"] = masking_utils.and_masks(kwargs["mask_function"],
                                                                  _same_document(self.doc_ids))
                kwargs["allow_is_causal_skip"] = False
            build = masking_utils.eager_mask if self.eager else masking_utils.sdpa_mask
            tensor = build(*self.args, **kwargs)
            if tensor is not None and self.convert is not None:
                tensor = self.convert(tensor)
            self._tensor, self._built = tensor, True
        return self._tensor

    def __getitem__(self, index):
        """A slice of the built mask (a model's forward may cut it, e.g. Gemma 4 to the kept positions): a tensor
        from then on, which the layers' attention takes as transformers' own."""
        tensor = self.tensor()
        return None if tensor is None else tensor[index]

    def window_refusal(self, window: int | None) -> str | None:
        """Why the kernels' masking with ``window`` (None: unbounded) is not this mask on the micro-batch's real
        query rows (None: it is). A padding query sees nothing in transformers' mask and only itself in the
        kernels'; its output reaches no real token either way."""
        if self._windows is None:
            self._windows = self._kernel_windows()
        if isinstance(self._windows, str):
            return self._windows
        smallest, largest = self._windows
        w = float("inf") if window is None else window
        if smallest <= w <= largest:
            return None
        return f"the mask is causal with a window in [{smallest}, {largest}] tokens, the layer's window is {window}"

    def _kernel_windows(self):
        """(smallest, largest) window W with mask == causal ∧ same document ∧ (i − j < W) on every real query
        row (largest inf: no window needed), or why no W gives it."""
        kw = self.kwargs
        if self.args or "mask_function" not in kw:
            return "mask arguments in a form not known here"
        if kw.get("use_vmap"):
            return "a model-specific mask function (transformers builds it with vmap)"
        S = kw.get("kv_length")
        positions = kw.get("cache_position")
        if positions is None and "q_length" in kw:
            positions = torch.arange(kw["q_length"], device=kw.get("device", "cpu")) + kw.get("q_offset", 0)
        if S is None or positions is None or kw.get("kv_offset", 0) != 0 or positions.shape[0] != S \
                or not bool((positions == torch.arange(S, device=positions.device)).all()):
            return "queries offset from the keys (a cache)"
        B, device = kw["batch_size"], positions.device
        padding = kw.get("attention_mask")
        padding = None if padding is None else padding.to(device=device, dtype=torch.bool)
        docs = None if self.doc_ids is None else self.doc_ids.to(device)
        # the index tensors transformers broadcasts a mask function over: [B, 1, 1, 1], [1, 1, 1, 1], [1, 1, n, 1],
        # [1, 1, 1, S]; comparisons below are [B, n, S]
        b = torch.arange(B, device=device)[:, None, None, None]
        head = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        kv = torch.arange(S, device=device)
        smallest, largest = 1, float("inf")
        rows = max(1, ROW_BLOCK_ELEMENTS // max(1, B * S))
        for start in range(0, S, rows):
            q = torch.arange(start, min(S, start + rows), device=device)
            n = q.shape[0]
            given = kw["mask_function"](b, head, q[None, None, :, None], kv[None, None, None, :])
            given = given.to(torch.bool).expand(B, 1, n, S)[:, 0]
            q, kv_row = q[None, :, None], kv[None, None, :]
            allowed = kv_row <= q                                              # the kernels' mask, without window
            if docs is not None:
                same_document = docs[:, start:start + n, None] == docs[:, None, :]
                allowed, given = allowed & same_document, given & same_document
            if padding is not None:
                given = given & padding[:, None, :]
                real = padding[:, start:start + n, None]
                given, allowed = given & real, allowed & real
            allowed = allowed.expand(B, n, S)
            distance = (q - kv_row).expand(B, n, S)
            if bool((given & ~allowed).any()):
                return "a mask that is not causal-plus-documents"
            if bool(given.any()):
                smallest = max(smallest, int(distance[given].max()) + 1)
            excluded = allowed & ~given
            if bool(excluded.any()):
                largest = min(largest, int(distance[excluded].min()))
        if smallest > largest:
            return "a mask that is not causal-plus-documents (nor a sliding window)"
        return smallest, largest


def mask(*args, **kwargs):
    """The mask interface: a LazyMask of what transformers asks for, with the current documents and form."""
    doc_ids, eager, _ = getattr(_state, "value", None) or (None, False, None)
    return LazyMask(doc_ids, eager, args, kwargs)


class _KernelAttention(torch.autograd.Function):
    """o[B, S, Hq, D] = the engine's attention of q[B, S, Hq, D], k/v[B, S, Hkv, D]; backward by its kernel."""

    @staticmethod
    def forward(ctx, q, k, v, ops, doc_ids, scale: float, window: int | None):
        o, lse = ops.attention_forward(q, k, v, doc_ids, scale, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.ops, ctx.doc_ids, ctx.scale, ctx.window = ops, doc_ids, scale, window
        return o

    @staticmethod
    def backward(ctx, d_o):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.ops.attention_backward(d_o.contiguous(), q, k, v, o, lse, ctx.doc_ids, ctx.scale,
                                                ctx.window)
        return dq, dk, dv, None, None, None, None


def _kernel_refusal(kernels: Kernels, module, query, key, value, attention_mask, kwargs) -> str | None:
    """Why the kernels do not compute this call (None: they do)."""
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)"
    if kwargs.get("softcap") is not None:
        return "soft-capped attention scores (softcap)"
    if kwargs.get("dropout", 0.0):
        return "attention dropout"
    unknown = sorted(set(kwargs) - IGNORED_KWARGS - {"s_aux", "softcap", "dropout", "scaling", "sliding_window"})
    if unknown:
        return f"attention arguments not known here: {', '.join(unknown)}"
    if not getattr(module, "is_causal", True):
        return "non-causal attention"
    if not isinstance(attention_mask, LazyMask):
        return "a mask not built by the horizon mask interface"
    (B, Hq, S, D), (Hkv, D_v) = query.shape, (key.shape[1], value.shape[-1])
    if key.shape != value.shape or key.shape[0] != B or key.shape[2] != S or key.shape[3] != D or Hq % Hkv:
        return f"q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)} (value head dim {D_v})"
    if not query.dtype == key.dtype == value.dtype:
        return f"mixed dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    refused = kernels.refusal(D, query.dtype)
    if refused is not None:
        return refused
    return attention_mask.window_refusal(_window(module, kwargs))


def _window(module, kwargs) -> int | None:
    window = kwargs.get("sliding_window")
    return getattr(module, "sliding_window", None) if window is None else window


def attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention signature: [B, heads, S, D] tensors, the mask from ``mask``
    -> ([B, S, heads, D], no weights)."""
    doc_ids, eager, kernels = getattr(_state, "value", None) or (None, False, None)
    if kernels is not None:
        reason = _kernel_refusal(kernels, module, query, key, value, attention_mask, kwargs)
        if reason is None:
            scale = kwargs.get("scaling")
            scale = query.shape[-1] ** -0.5 if scale is None else scale
            q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
            return _KernelAttention.apply(q, k, v, kernels.ops, doc_ids, scale, _window(module, kwargs)), None
        if reason not in kernels.announced:
            kernels.announced.add(reason)
            log.info("horizon-triton: %s runs transformers' %s attention instead of the kernels: %s",
                     type(module).__name__, "eager" if eager else "SDPA", reason)
    if isinstance(attention_mask, LazyMask):
        attention_mask = attention_mask.tensor()
    if eager:
        return sys.modules[type(module).__module__].eager_attention_forward(module, query, key, value,
                                                                            attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as CUDA runs it: the flash kernel without a mask (grouped-query heads as they
    are), the memory-efficient one with the boolean mask turned into an additive bias of the query's dtype (what
    sdpa does with a mask), or without a mask where the values' head dim is not the queries' (MLA: flash needs
    one head dim)."""
    import torch
    if attn_mask is None and query.shape[-1] == value.shape[-1]:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    if enable_gqa and key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                attn_mask.logical_not(), float("-inf"))
        bias = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p,
                                                                  is_causal, scale=scale)[0]


def _function_mode():
    from torch.overrides import TorchFunctionMode
    return TorchFunctionMode


def fused_attention_on(device):
    """Within: sdpa on the meta device runs as CUDA's fused kernels would (FusedAttentionOnMeta); elsewhere as it
    is."""
    return FusedAttentionOnMeta() if device.type == "meta" else contextlib.nullcontext()


class FusedAttentionOnMeta(_function_mode()):
    """Within: F.scaled_dot_product_attention of meta tensors runs CUDA's fused kernels (``_fused_sdpa``), whose
    meta functions give their real outputs and saved tensors (logsumexp, no [S, S] matrix). Without it, the meta
    device takes sdpa's math path, which keeps each head's [S, S] scores: the dry run would count memory no GPU
    run uses."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import torch.nn.functional as F
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            return _fused_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
