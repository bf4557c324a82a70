"""DPO's pairs in a micro-batch, found when it is prepared (batch.prepare): which sequence each target belongs to,
each sequence's response tokens and reference log-prob sum, checked on the host with errors naming the batch.
The layout (chosen, rejected, chosen, ... in row-major order of the documents) is objectives/preference.py's."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from horizon_triton.kernels.reference import IGNORE_INDEX


@dataclass
class PreferenceBatch:
    """A micro-batch's pairs, on the compute device (MicroBatch.preference)."""
    seq_index: torch.Tensor           # [T] int64: each target's sequence 2i (chosen) or 2i+1 (rejected); 2P if none
    num_pairs: int                    # P, known on the host
    lengths: torch.Tensor             # [2P] fp32: response tokens of each sequence
    ref_logps: torch.Tensor | None    # [2P] fp32: the reference's summed log-probs (None: not computed yet)


def sequence_of_tokens(doc_ids: torch.Tensor | None, keep: torch.Tensor | None, shape) -> tuple[torch.Tensor, int]:
    """(sequence index [B, S] of every kept token, -1 on masked ones; number of sequences): the documents of the
    micro-batch numbered in row-major order (doc_ids as batch.doc_ids_of gives them, None: one a row)."""
    B, S = shape
    if doc_ids is None:
        return torch.arange(B)[:, None].expand(B, S).clone(), B
    local = doc_ids.long()
    kept = torch.ones(B, S, dtype=torch.bool) if keep is None else keep
    per_row = torch.where(kept, local + 1, 0).amax(1)                  # documents in each row
    offsets = torch.cumsum(per_row, 0) - per_row
    return torch.where(kept, local + offsets[:, None], -1), int(per_row.sum())


def pair_layout(targets: torch.Tensor, doc_ids, keep, where: str) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(seq_index [T] of every target, 2P for ignored ones; P; response tokens per sequence [2P]) of a micro-batch
    with targets [B, S] (labels shifted: target t predicts token t+1). Errors name the batch and the sequence."""
    B, S = targets.shape
    seq, count = sequence_of_tokens(doc_ids, keep, (B, S))
    valid = targets != IGNORE_INDEX
    crossing = valid[:, :-1] & (seq[:, :-1] != seq[:, 1:])
    if crossing.any():
        r, t = (int(i) for i in crossing.nonzero()[0])
        raise ValueError(f"{where}: row {r}, position {t + 1} is labelled but starts a packed sequence: nothing of "
                         "its own precedes it, so DPO cannot score it (set its label to -100)")
    if count % 2:
        raise ValueError(f"{where}: {count} sequences, an odd number: DPO needs every chosen sequence followed by "
                         "its rejected one in the same micro-batch (rows 2k and 2k+1, or one after the other in a "
                         "packed row); was a pair split across micro-batches?")
    index = torch.where(valid, seq, count).reshape(-1)
    lengths = torch.bincount(index, minlength=count + 1)[:count]
    if count == 0 or (lengths == 0).any():
        k = int((lengths == 0).nonzero()[0]) if count else 0
        what = f"sequence {k} ({'chosen' if k % 2 == 0 else 'rejected'} of pair {k // 2})" if count else "it"
        raise ValueError(f"{where}: {what} has no response tokens (every label is -100); DPO scores each chosen "
                         "and rejected response by the log-probability of its labelled tokens")
    return index, count // 2, lengths.float()


def reference_sums(ref_logps: torch.Tensor, index: torch.Tensor, num_pairs: int, where: str) -> torch.Tensor:
    """fp32 [2P]: the batch's per-token reference log-probs (label-aligned [B, S]) summed per sequence."""
    ref = ref_logps.float()
    if not torch.isfinite(ref).all():
        raise ValueError(f"{where}: ref_logps holds non-finite values")
    by_target = torch.zeros_like(ref)
    by_target[:, :-1] = ref[:, 1:]                   # aligned with the targets, as the labels are
    sums = torch.zeros(2 * num_pairs + 1, dtype=torch.float32)
    sums.index_add_(0, index, by_target.reshape(-1))
    return sums[:-1]
