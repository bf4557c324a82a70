"""What a loader may yield, made into one micro-batch's [B, S] tensors (checked and moved by Engine.prepare).

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

KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "ref_logps")   # ref_logps: DPO (preference.py)


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
