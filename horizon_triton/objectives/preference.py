"""Preference tuning (DPO, Rafailov et al. 2023, as TRL's DPOTrainer computes it): the losses and their gradients in
closed form, and the head's per-token weights; the pair layout of a micro-batch is found when it is prepared
(data/pairs.py).

Layout. A micro-batch holds whole pairs: its sequences (the documents of its rows, in row-major order: a row
is one document, or several packed ones whose position_ids restart) alternate chosen, rejected, chosen, ...
So a chosen and its rejected sit in rows 2k and 2k+1, or one after the other in one packed row (what
``data.prepare(..., preference=True)`` writes). The labels mark the response tokens; the batch carries
``ref_logps`` [B, S], the reference model's log-probability of each labelled token (0 elsewhere), which
``Engine.reference_logps`` computes once, before training, from the frozen starting weights.

Maths. For pair i, π = Σ log p_θ(y_t | y_<t) over a sequence's response tokens and ρ the same under the
reference; the head gets log p_t = target_logit_t − lse_t from the cross-entropy's first pass (the logits never
exist whole). With d = (π_c − ρ_c) − (π_r − ρ_r) and σ the logistic function:

    sigmoid   ℓ = −(1−ε)·log σ(βd) − ε·log σ(−βd)            ∂ℓ/∂d = −β·[(1−ε)·σ(−βd) − ε·σ(βd)]
    robust    ℓ = (−(1−ε)·log σ(βd) + ε·log σ(−βd)) / (1−2ε)  ∂ℓ/∂d = −β·[(1−ε)·σ(−βd) + ε·σ(βd)] / (1−2ε)
    hinge     ℓ = max(0, 1 − βd)                               ∂ℓ/∂d = −β·[βd < 1]
    ipo       q = (π_c−ρ_c)/n_c − (π_r−ρ_r)/n_r, ℓ = (q − 1/(2β))²   (n: the sequence's response tokens)
              ∂ℓ/∂π_c = 2(q − 1/(2β))/n_c,  ∂ℓ/∂π_r = −2(q − 1/(2β))/n_r

(ε = label_smoothing: for sigmoid the conservative DPO of TRL's releases before 1.0, ε = 0 being TRL 1.x's
"sigmoid"; "robust", "hinge" and "ipo" are TRL 1.x's.) For the other three ∂ℓ/∂π_c = ∂ℓ/∂d = −∂ℓ/∂π_r. The
step's loss is L = (1/P)·Σ_i ℓ_i over its P pairs (all micro-batches of the accumulation), and since a token's
cross-entropy is −log p_t, the gradient flows through the head's hand-written backward with the per-token weight
s_t = −(1/P)·∂ℓ/∂π of the token's sequence in place of the mean loss's 1/tokens. Rewards are β·(π − ρ), as TRL
logs them.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from horizon_triton.kernels.reference import IGNORE_INDEX

from ..devices.distributed import shard_loader

LOSSES = ("sigmoid", "robust", "hinge", "ipo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


# ------------------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------------------
def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor, beta: float,
             label_smoothing: float, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ per pair [P], ∂ℓ/∂π per sequence [2P]) from summed log-probs π (policy) and ρ (reference) [2P] of
    interleaved chosen/rejected sequences; see the module docstring for the formulas."""
    ratios = policy - reference
    rc, rr = ratios[0::2], ratios[1::2]
    grad = torch.empty_like(policy)
    if loss_type == "ipo":
        q = rc / lengths[0::2] - rr / lengths[1::2]
        gap = q - 1.0 / (2 * beta)
        grad[0::2], grad[1::2] = 2 * gap / lengths[0::2], -2 * gap / lengths[1::2]
        return gap.square(), grad
    z = beta * (rc - rr)
    eps = label_smoothing
    if loss_type == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        d = -beta * ((1 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z))
    elif loss_type == "robust":
        loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        d = -beta * ((1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.relu(1 - z)
        d = -beta * (z < 1).float()
    else:
        raise ValueError(f"dpo_loss {loss_type!r}: choose one of {', '.join(LOSSES)}")
    grad[0::2], grad[1::2] = d, -d
    return loss, grad


class DPOHead:
    """The head's part of DPO in one optimizer step (run_step's ``preference``): per micro-batch, from the first
    pass's statistics, each sequence's summed log-prob, the pair losses and every token's weight for the second
    pass; device sums of the metrics, read once after the step's sync."""

    def __init__(self, train_cfg, pairs: int):
        """pairs: P, the step's pairs over all its micro-batches (data parallel: over every rank's)."""
        self.beta, self.eps, self.loss_type = train_cfg.dpo_beta, train_cfg.dpo_label_smoothing, train_cfg.dpo_loss
        self.pairs = pairs
        self.sums = None              # device fp32 [len(METRICS)]: sums over the step's (this rank's) pairs

    def token_weights(self, mb, lse: torch.Tensor, target_logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute stream: (Σ ℓ over the micro-batch's pairs, weights fp32 [T]) from lse and the target logits [T]."""
        pref = mb.preference
        valid = mb.targets != IGNORE_INDEX
        token_logps = torch.where(valid, target_logit - lse, 0.0)                          # [T]
        n = 2 * pref.num_pairs
        policy = torch.zeros(n + 1, dtype=torch.float32, device=lse.device)
        policy.index_add_(0, pref.seq_index, token_logps)
        policy = policy[:n]                                                                # [2P]
        loss, grad = dpo_loss(policy, pref.ref_logps, pref.lengths, self.beta, self.eps, self.loss_type)
        per_sequence = torch.cat((-grad / self.pairs, grad.new_zeros(1)))                  # [2P + 1]
        weights = per_sequence[pref.seq_index]                                             # [T]
        self._add(policy, pref.ref_logps)
        return loss.sum(), weights

    def _add(self, policy: torch.Tensor, reference: torch.Tensor) -> None:
        rewards = self.beta * (policy - reference)
        chosen, rejected = rewards[0::2], rewards[1::2]
        sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                            (chosen - rejected).sum(), policy[0::2].sum(), policy[1::2].sum()])
        self.sums = sums if self.sums is None else self.sums + sums

    def metrics(self) -> dict:
        """Host, after the step's sync: TRL's names, means over the step's pairs."""
        return dict(zip(METRICS, (self.sums / self.pairs).tolist()))


# ------------------------------------------------------------------------------------------------------------
# the reference pass
# ------------------------------------------------------------------------------------------------------------
def add_reference(engine, rows, batch_size: int, path=None, on_batch=None):
    """DPO's reference, computed once before training with the engine's current (starting) weights: each row's
    per-token log-probs (Engine.reference_logps) in row order, ``batch_size`` rows a forward-only pass. ``rows``:
    a list of row dicts, each given a "ref_logps" tensor, or a data.PackedRows, whose reference file (``path``,
    default beside its row file) is written and attached. ``on_batch(rows_done)`` follows the progress. Returns
    the rows. Data parallel: every rank calls it with the same rows; each computes every world-th batch and
    every rank gets all of them (the file: each rank writes a private sibling, then renames it into place, so
    ranks sharing a path leave one whole file)."""
    from ..data.packing import PackedRows, RowLoader
    loader = RowLoader(rows, batch_size, epochs=1, shuffle=False)
    guard = engine.dist.guard() if engine.dist is not None else contextlib.nullcontext()
    if engine.dist is not None:
        engine.dist.begin("preference.add_reference", "with the same rows")
    if not isinstance(rows, PackedRows):
        done = 0
        with guard:
            for logps in _every_rank_reference(engine, loader):
                for row, values in zip(rows[done:done + len(logps)], logps):
                    row["ref_logps"] = values
                done += len(logps)
                if on_batch is not None:
                    on_batch(done)
        return rows
    path = Path(rows.path.with_suffix(".ref") if path is None else path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    done = 0
    try:
        with guard, open(partial, "wb") as f:
            for logps in _every_rank_reference(engine, loader):
                f.write(logps.numpy().astype("float32").tobytes())
                done += len(logps)
                if on_batch is not None:
                    on_batch(done)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    rows.attach_reference(path)
    return rows


def _every_rank_reference(engine, loader):
    """Engine.reference_logps of every batch of ``loader``, in order. Data parallel: rank r computes batches r,
    r + W, ...; each round's W results are gathered (host, the control group), so every rank yields them all."""
    ctx = engine.dist
    if ctx is None:
        yield from engine.reference_logps(loader)
        return
    mine = engine.reference_logps(shard_loader(loader, ctx, drop_remainder=False))
    for first in range(0, len(loader), ctx.world):
        logps = next(mine) if first + ctx.rank < len(loader) else None
        for theirs in ctx.gather_objects(logps):
            if theirs is not None:
                yield theirs
    mine.close()
