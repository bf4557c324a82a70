"""The demo's task: addition, one character a token.

"123+45=168" plus an end-of-sequence token (vocabulary of 14: digits, '+', '=', pad, eos; it fits the demo
preset's vocab_size 16). The loss counts the answer digits and the eos. The demo writes sums at a fixed width,
"123+045=0168" (see AdditionTask: a small model learns that form many times faster). The held-out problems are
drawn first from their own seed and never appear in training.

Batches are dicts of LongTensors [batch, seq]: input_ids, and labels that are the token ids again with -100
where no loss is wanted (the prompt, the padding); the engine shifts labels left by one inside the loss.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from horizon_triton.kernels.reference import IGNORE_INDEX


class CharTokenizer:
    """Characters '0'-'9', '+', '=' plus pad and eos: ids 0..13."""
    chars = "0123456789+="
    pad_id = len(chars)          # 12
    eos_id = len(chars) + 1      # 13
    vocab_size = len(chars) + 2  # 14

    def encode(self, text: str) -> list[int]:
        try:
            return [self.chars.index(c) for c in text]
        except ValueError:
            bad = next(c for c in text if c not in self.chars)
            raise ValueError(f"character {bad!r} in {text!r} is not in the addition vocabulary "
                             f"{self.chars!r}") from None

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(self.chars[i] if i < len(self.chars) else "?")   # ids 14, 15 of the demo model
        return "".join(out)


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


class AdditionTask:
    """Sums of two numbers of min_digits..max_digits digits each (the digit count is drawn uniformly, then the
    number). ``heldout`` problems come from their own seed; training never draws one of them.

    How a problem is written for the model: ``pad`` writes both operands and the answer with leading zeros at
    a fixed width ("007+045=0052"), so every digit sits at the same offset from '+' and '='; ``reverse`` writes
    the answer lowest digit first ("7+45=25"), so each answer digit is produced after the digits its carry comes
    from. Both make the task far easier for a small model; ``show`` writes a problem the human way whatever the
    model sees."""

    def __init__(self, min_digits: int = 1, max_digits: int = 3, num_heldout: int = 256, seed: int = 0,
                 pad: bool = False, reverse: bool = False):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 ≤ min_digits ≤ max_digits, got {min_digits}, {max_digits}")
        self.min_digits, self.max_digits = min_digits, max_digits
        self.pad, self.reverse = pad, reverse
        self.tokenizer = CharTokenizer()
        self.seq_len = 2 * max_digits + 2 + (max_digits + 1) + 1     # a + b = answer eos
        self.seed = seed
        rng = random.Random(seed * 1_000_003 + 1)
        heldout: dict[Problem, None] = {}
        while len(heldout) < num_heldout:
            heldout[self.draw(rng)] = None
        self.heldout = list(heldout)
        self._heldout_set = set(self.heldout)

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10 ** digits - 1)

    def draw(self, rng: random.Random) -> Problem:
        return Problem(self._number(rng), self._number(rng))

    # ---- text the model sees ----------------------------------------------------------------------------
    def prompt(self, problem: Problem) -> str:
        width = self.max_digits if self.pad else 0
        return f"{problem.a:0{width}d}+{problem.b:0{width}d}="

    def target(self, problem: Problem) -> str:
        """The answer as the model must write it (before its eos)."""
        answer = f"{problem.a + problem.b:0{self.max_digits + 1 if self.pad else 0}d}"
        return answer[::-1] if self.reverse else answer

    def read_answer(self, text: str) -> str:
        """A model's answer text the human way (un-reversed, no leading zeros); garbage stays as it is."""
        text = text[::-1] if self.reverse else text
        return text.lstrip("0") or ("0" if text else "")

    def show(self, problem: Problem) -> str:
        return f"{problem.a}+{problem.b}="

    def encode(self, problem: Problem) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one problem, unpadded: labels are -100 on the prompt."""
        tok = self.tokenizer
        prompt, answer = tok.encode(self.prompt(problem)), tok.encode(self.target(problem)) + [tok.eos_id]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    def preference_pair(self, problem: Problem, rng: random.Random) -> list[tuple[list[int], list[int]]]:
        """[(input_ids, labels) of the right answer, those of a wrong one]: one answer digit changed (a synthetic
        preference set for DPO: the model should come to prefer the correct sum)."""
        wrong = list(self.target(problem))
        at = rng.randrange(len(wrong))
        wrong[at] = str((int(wrong[at]) + rng.randint(1, 9)) % 10)
        tok = self.tokenizer
        prompt = tok.encode(self.prompt(problem))
        return [(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)
                for answer in (tok.encode(self.target(problem)) + [tok.eos_id], tok.encode("".join(wrong)) + [tok.eos_id])]

    def batches(self, batch_size: int, seed: int | None = None):
        """Endless training batches [batch_size, seq_len] of fresh problems (none held out), right-padded."""
        rng = random.Random(self.seed if seed is None else seed)
        while True:
            rows = []
            while len(rows) < batch_size:
                problem = self.draw(rng)
                if problem not in self._heldout_set:
                    rows.append(self.encode(problem))
            yield pad_rows(rows, self.seq_len, self.tokenizer.pad_id)


def pad_rows(rows: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict:
    """Right-pads (input_ids, labels) rows to seq_len: pad tokens with label -100."""
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        if len(row_ids) > seq_len:
            raise ValueError(f"row {r} has {len(row_ids)} tokens, more than seq_len {seq_len}")
        ids[r, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        labels[r, :len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
    return {"input_ids": ids, "labels": labels}


@torch.no_grad()
def greedy_answers(logits_fn, task: AdditionTask, problems: list[Problem]) -> list[str]:
    """Greedy decoding with ``logits_fn(input_ids [B, S]) -> [B, S, V]``: each problem's answer text as the model
    writes it, up to its eos. Problems are grouped by prompt length so that no row needs padding (no KV cache:
    each new token reruns the prefix)."""
    tok = task.tokenizer
    max_new = task.max_digits + 2                     # the longest answer and its eos
    by_length: dict[int, list[int]] = {}
    for n, p in enumerate(problems):
        by_length.setdefault(len(task.prompt(p)), []).append(n)
    answers = [""] * len(problems)
    for length, members in sorted(by_length.items()):
        ids = torch.tensor([tok.encode(task.prompt(problems[n])) for n in members])            # [B, length]
        for _ in range(max_new):
            next_ids = logits_fn(ids)[:, -1].argmax(-1)                                         # [B]
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if (ids[:, length:] == tok.eos_id).any(1).all():
                break
        for row, n in enumerate(members):
            answers[n] = tok.decode(ids[row, length:])
    return answers


def exact_match(logits_fn, task: AdditionTask, problems: list[Problem] | None = None) -> float:
    """Fraction of problems (default: the held-out ones) whose greedy answer is exactly right."""
    problems = task.heldout if problems is None else problems
    answers = greedy_answers(logits_fn, task, problems)
    return sum(a == task.target(p) for a, p in zip(answers, problems)) / len(problems)
