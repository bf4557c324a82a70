"""What a loader may yield, made into one ``MicroBatch`` on the compute device: ``prepare`` (Engine.prepare asks it,
once a batch) collates, checks, finds positions, documents, shifted targets, rotary tables and DPO's pairs
(pairs.py), and copies the result to the device.

A batch is a mapping (a dict, a transformers ``BatchEncoding``) with "input_ids" and "labels", optionally
"attention_mask" and "position_ids"; other keys (token_type_ids, ...) are ignored. Each value may be
- a [B, S] tensor or nested list: used as it is;
- a 1-D tensor or list (one example, as a ``datasets`` row gives it): a batch of one row;
- a list of rows of different lengths (a batched ``datasets`` slice): collated, see below.
A list of such single examples (what a DataLoader with ``collate_fn=list`` yields) is collated the same way.

Collation right-pads every row to the longest: input_ids with the pad id (0 without one), labels with -100,
position_ids with 0, and an attention_mask that is 0 on the padding (combined with the rows' own masks).

attention_mask and position_ids become attention documents for the kernels' doc-id masking (doc_ids_of): a
masked token is a document of its own, so it attends only to itself and nothing attends to it, while the kept
tokens see each other as in transformers (whose masked keys are hidden from every query).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from horizon_triton.kernels.reference import IGNORE_INDEX

from ..models.dense.layer import MicroBatch
from .pairs import PreferenceBatch, pair_layout, reference_sums

KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "ref_logps")   # ref_logps: DPO (pairs.py)


def batch_tensors(batch, where: str, pad_id: int | None) -> dict[str, torch.Tensor]:
    """The batch's KEYS present, as tensors of shape [B, S] (integer dtypes as given or int64)."""
    if isinstance(batch, Sequence) and batch and all(isinstance(x, Mapping) for x in batch):
        batch = _examples_to_columns(batch, where)
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"{where}: expected a dict (or BatchEncoding, or a list of examples) with 'input_ids' and "
                         f"'labels', got {type(batch).__name__}")
    columns = {key: batch[key] for key in KEYS if key in batch and batch[key] is not None}
    if _is_ragged(columns["input_ids"]):
        return _collate(columns, where, pad_id)
    out = {}
    for key, value in columns.items():
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        out[key] = t.unsqueeze(0) if t.dim() == 1 else t           # one example: a batch of one row
    return out


def _examples_to_columns(examples: Sequence[Mapping], where: str) -> dict[str, list]:
    keys = [key for key in KEYS if key in examples[0]]
    for index, example in enumerate(examples):
        if [key for key in KEYS if key in example] != keys:
            raise ValueError(f"{where}: example {index} has keys {sorted(example)}, example 0 has "
                             f"{sorted(examples[0])}")
    return {key: [torch.as_tensor(example[key]) for example in examples] for key in keys}


def _is_ragged(ids) -> bool:
    """A list of rows (lists or 1-D tensors), as opposed to one row or an already rectangular tensor."""
    if isinstance(ids, torch.Tensor) or not isinstance(ids, Sequence) or not ids:
        return False
    first = ids[0]
    return isinstance(first, torch.Tensor) and first.dim() == 1 or isinstance(first, Sequence)


def _collate(columns: dict, where: str, pad_id: int | None) -> dict[str, torch.Tensor]:
    rows = {key: [torch.as_tensor(r) for r in value] for key, value in columns.items()}
    lengths = [len(r) for r in rows["input_ids"]]
    for key, value in rows.items():
        if len(value) != len(lengths):
            raise ValueError(f"{where}: {len(value)} rows of {key} for {len(lengths)} rows of input_ids")
        for index, (row, n) in enumerate(zip(value, lengths)):
            if row.dim() != 1 or len(row) != n:
                raise ValueError(f"{where}: row {index} of {key} has shape {tuple(row.shape)}, its input_ids "
                                 f"have {n} tokens")
    fill = {"input_ids": 0 if pad_id is None else pad_id, "labels": IGNORE_INDEX, "attention_mask": 0,
            "position_ids": 0, "ref_logps": 0.0}
    S = max(lengths)
    out = {}
    for key, value in rows.items():
        t = torch.full((len(lengths), S), fill[key], dtype=value[0].dtype)
        for index, row in enumerate(value):
            t[index, :len(row)] = row
        out[key] = t
    real = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    out["attention_mask"] = real & out["attention_mask"].bool() if "attention_mask" in out else real
    return out


def kept_tokens(mask: torch.Tensor | None, where: str) -> torch.Tensor | None:
    """bool [B, S] of the tokens kept, or None when every token is (no mask, or one of ones)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{where}: attention_mask must hold 0 (padding) and 1 (token), got values "
                             f"{mask.unique().tolist()[:5]}")
        mask = mask != 0
    return None if mask.all() else mask


def doc_ids_of(pos: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
    """int32 [B, S] attention documents, None when each row is one: a kept token whose position does not grow
    past the previous kept token's starts a new document (packed sequences), and every masked token is a
    document of its own (it sees only itself, no other token sees it), numbered after all real ones."""
    B, S = pos.shape
    if keep is None:
        restart = torch.zeros_like(pos, dtype=torch.bool)
        restart[:, 1:] = pos[:, 1:] <= pos[:, :-1]
        return restart.cumsum(1).to(torch.int32) if restart.any() else None
    index = torch.arange(S).expand(B, S)
    last_kept = torch.where(keep, index, -1).cummax(1).values          # index of the latest kept token so far
    prev = torch.full_like(last_kept, -1)
    prev[:, 1:] = last_kept[:, :-1]
    prev_pos = pos.gather(1, prev.clamp(min=0))
    restart = keep & (prev >= 0) & (pos <= prev_pos)
    return torch.where(keep, restart.cumsum(1), S + index).to(torch.int32)


def prepare(batch, model_cfg, device, inv_freq: torch.Tensor, dpo: bool, where: str = "batch") -> MicroBatch:
    """Checks one loader batch and moves it to ``device`` (a device object) with its rotary tables (``inv_freq``:
    the model's, on the device; None for a generic model: its positions and padding mask instead) and doc ids;
    with ``dpo``, its pairs and their reference sums."""
    cols = batch_tensors(batch, where, model_cfg.pad_row)
    ids = cols["input_ids"]
    labels = cols.get("labels")
    if labels is None:
        raise ValueError(f"{where}: no 'labels' (labels=input_ids trains on every token the attention_mask "
                         "keeps; -100 where no loss is wanted)")
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{where}: input_ids must be an integer tensor [batch, seq], got {tuple(ids.shape)} "
                         f"{ids.dtype}")
    for key in ("labels", "attention_mask", "position_ids", "ref_logps"):
        if key in cols and cols[key].shape != ids.shape:
            raise ValueError(f"{where}: {key} shape {tuple(cols[key].shape)} differs from input_ids shape "
                             f"{tuple(ids.shape)}")
    V = model_cfg.vocab_size
    if ids.numel() and (ids.min() < 0 or ids.max() >= V):
        bad = ids[(ids < 0) | (ids >= V)][0].item()
        raise ValueError(f"{where}: token id {bad} is outside the vocabulary [0, {V})")
    bad_labels = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bad_labels.any():
        raise ValueError(f"{where}: label {labels[bad_labels][0].item()} is neither -100 nor in [0, {V})")
    B, S = ids.shape
    keep = kept_tokens(cols.get("attention_mask"), where)    # [B, S] bool or None
    pos = cols.get("position_ids")
    if pos is not None:
        pos = pos.long()
        if pos.numel() and pos.min() < 0:
            raise ValueError(f"{where}: position_ids must be ≥ 0, got {pos.min().item()}")
    else:
        pos = torch.arange(S).expand(B, S)           # as transformers: attention_mask does not shift positions
    check_positions(pos if keep is None else pos[keep], model_cfg, where)
    doc_ids = doc_ids_of(pos, keep)
    targets = torch.full_like(labels, IGNORE_INDEX, dtype=torch.int64)
    targets[:, :-1] = labels[:, 1:]                  # the transformers convention: shift inside the loss
    if keep is not None:                             # a masked token neither predicts nor is predicted
        targets[:, :-1].masked_fill_(~(keep[:, :-1] & keep[:, 1:]), IGNORE_INDEX)
    pad = model_cfg.pad_row
    embed_grad_mask = None if pad is None or not (ids == pad).any() else (ids != pad).reshape(-1)
    cos = sin = None
    if inv_freq is not None:                         # the dense template's rotary tables (a generic model's
        freqs = to_device(device, pos.reshape(-1, 1)).float() * inv_freq[None, :]    # own code makes its own)
        emb = torch.cat((freqs, freqs), dim=-1)      # [T, D]
        cos, sin = emb.cos(), emb.sin()
    pairs = None
    if dpo:
        pairs = preference_pairs(targets, doc_ids, keep, cols.get("ref_logps"), device, where)
    return MicroBatch(input_ids=to_device(device, ids.long()), host_ids=ids.long().reshape(-1),
                      targets=to_device(device, targets.reshape(-1)),
                      cos=cos, sin=sin,
                      doc_ids=None if doc_ids is None else to_device(device, doc_ids),
                      position_ids=to_device(device, pos.contiguous()) if inv_freq is None else None,
                      attention_mask=None if keep is None or inv_freq is not None else to_device(device, keep),
                      num_targets=int((targets != IGNORE_INDEX).sum()),
                      embed_grad_mask=None if embed_grad_mask is None else to_device(device, embed_grad_mask),
                      preference=pairs,
                      host_layout=(pos, doc_ids, keep) if inv_freq is None and device.type == "meta" else None)


def preference_pairs(targets, doc_ids, keep, ref_logps, device, where: str) -> PreferenceBatch:
    """DPO: the micro-batch's pairs (pairs.pair_layout) and, when the batch has them, the reference's summed
    log-probs of its sequences."""
    index, num_pairs, lengths = pair_layout(targets, doc_ids, keep, where)
    ref = None if ref_logps is None else reference_sums(ref_logps, index, num_pairs, where)
    return PreferenceBatch(seq_index=to_device(device, index), num_pairs=num_pairs,
                           lengths=to_device(device, lengths),
                           ref_logps=None if ref is None else to_device(device, ref))


def check_positions(pos: torch.Tensor, model_cfg, where: str) -> None:
    limit = model_cfg.max_positions
    if pos.numel() and pos.max() >= limit:
        scaled = ", stretched by its rope scaling" if limit != model_cfg.max_position_embeddings else ""
        raise ValueError(f"{where}: position {pos.max().item()} is beyond the {limit} positions of this model "
                         f"(max_position_embeddings{scaled}); cut sequences to at most {limit} tokens")


def to_device(device, t: torch.Tensor) -> torch.Tensor:
    """On CUDA: through pinned memory, without blocking the host (the copy is queued on the compute stream
    behind the running step; the pinned buffer is kept until the copy ran by torch's host allocator)."""
    if not device.pin_memory or device.type == "meta":    # the dry run's batch: nothing to pin
        return t.to(device.torch_device)
    return t.pin_memory().to(device.torch_device, non_blocking=True)
