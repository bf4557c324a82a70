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


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
