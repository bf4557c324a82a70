"""The attention implementation the generic template runs transformers' layers with, registered under ``NAME``
with transformers' attention and mask interfaces.

Masks: what transformers builds for each layer kind (causal, sliding window, chunked, padding), AND-ed with the
micro-batch's attention documents (``documents``: packed sequences, and each padding token a document of its
own, as the hand-written template masks them). Attention: transformers' own function for the model, SDPA or the
model's eager attention (which alone handles sinks and soft-capped scores), fed the mask in the form it takes.
Imports nothing of the package."""
from __future__ import annotations

import contextlib
import sys
import threading

NAME = "horizon"

_state = threading.local()       # the micro-batch's documents and the mask form, set around the model's calls


@contextlib.contextmanager
def documents(doc_ids, eager: bool):
    """Within: masks keep a query from keys of other documents (doc_ids int32 [B, S], None: one per row), in the
    form the model's attention takes (eager: additive float, else boolean)."""
    old = getattr(_state, "value", None)
    _state.value = (doc_ids, eager)
    try:
        yield
    finally:
        _state.value = old


def _same_document(doc_ids):
    def fn(batch_idx, head_idx, q_idx, kv_idx):
        return doc_ids[batch_idx, q_idx] == doc_ids[batch_idx, kv_idx]
    return fn


def mask(*args, mask_function=None, **kwargs):
    from transformers import masking_utils
    doc_ids, eager = getattr(_state, "value", None) or (None, False)
    if doc_ids is not None:
        mask_function = masking_utils.and_masks(mask_function, _same_document(doc_ids))
        kwargs["allow_is_causal_skip"] = False
    build = masking_utils.eager_mask if eager else masking_utils.sdpa_mask
    return build(*args, mask_function=mask_function, **kwargs)


def attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention signature: [B, heads, S, D] tensors, the mask built by ``mask``."""
    _, eager = getattr(_state, "value", None) or (None, False)
    if eager:
        return sys.modules[type(module).__module__].eager_attention_forward(module, query, key, value,
                                                                            attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as CUDA runs it: the flash kernel without a mask (grouped-query heads as they
    are), the memory-efficient one with the boolean mask turned into an additive bias of the query's dtype (what
    sdpa does with a mask)."""
    import torch
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            attn_mask.logical_not(), float("-inf"))
    if enable_gqa and key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
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
