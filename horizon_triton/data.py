"""Data for the CLI: the built-in addition task of the demo, and JSONL fine-tuning data.

Every batch is a dict of LongTensors [batch, seq] the engine takes as is:
    input_ids     token ids
    labels        the token ids again, -100 where no loss is wanted (prompt tokens, padding, document starts)
    position_ids  only for packed rows: 0, 1, 2, ... restarting at each document, so that attention does not
                  cross documents (the engine starts a new document wherever a position does not grow)

The label at position t is the token the model must predict from positions < t (the transformers convention:
the engine shifts labels left by one inside the loss).

Addition task: "123+45=168" plus an end-of-sequence token, one character a token (vocabulary of 14: digits,
'+', '=', pad, eos; it fits the demo preset's vocab_size 16). The loss counts the answer digits and the eos.
The demo writes sums at a fixed width, "123+045=0168" (see AdditionTask: a small model learns that form many
times faster). The held-out problems are drawn first from their own seed and never appear in training.

JSONL: each line {"text": ...} (every token trained) or {"prompt": ..., "response": ...} (prompt tokens masked).
Known gaps: the whole file is tokenized up front (fine for the small files a one-GPU fine-tune reads); a
document longer than --seq-len is cut into seq-len pieces, each trained as a document of its own.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from horizon_triton.kernels.reference import IGNORE_INDEX


# ------------------------------------------------------------------------------------------------------------
# the addition task
# ------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------
# JSONL fine-tuning data
# ------------------------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file, each checked: {"text": str} or {"prompt": str, "response": str}. Blank lines are
    skipped. Errors name the file and the 1-based line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")    # a byte-order mark may open it
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if "text" in record:
                keys = ("text",)
            elif "prompt" in record or "response" in record:
                keys = ("prompt", "response")
            else:
                raise ValueError(f'{where}: expected a "text" key or "prompt" and "response" keys, got '
                                 f"{sorted(record) or 'an empty object'}")
            for key in keys:
                if key not in record:
                    raise ValueError(f'{where}: "{key}" is missing (a line with "prompt" needs "response" too)')
                if not isinstance(record[key], str):
                    raise ValueError(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}')
            records.append({key: record[key] for key in keys})
    if not records:
        raise ValueError(f"data file {path} holds no records (it is empty or all its lines are blank)")
    return records


def tokenize_records(records: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each record. The tokenizer's special tokens (e.g. BOS) are added in front, and its
    eos token, when it has one, at the end (so a packed row shows where each document ended). Prompt tokens get
    label -100; text records are trained on every token."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    docs = []
    for record in records:
        if "text" in record:
            ids = tokenizer(record["text"])["input_ids"] + eos
            docs.append((ids, list(ids)))
        else:
            prompt = tokenizer(record["prompt"])["input_ids"]
            response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + eos
            docs.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return docs


def pack_documents(docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> list[dict]:
    """Packs documents greedily, in order, into rows of seq_len tokens. Returns one dict per row with
    input_ids / labels / position_ids LongTensors [seq_len]. A document that does not fit in the rest of a row
    starts a new row; one longer than seq_len is cut into seq_len pieces. Each document's first label is -100
    (nothing of its own precedes it), and padding at a row's end has label -100 and positions that keep
    growing, so it is no document of its own and no real token attends to it (attention is causal)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2, got {seq_len}")
    pieces = []
    for ids, labels in docs:
        for start in range(0, len(ids), seq_len):
            piece_labels = list(labels[start:start + seq_len])
            piece_labels[0] = IGNORE_INDEX
            pieces.append((ids[start:start + seq_len], piece_labels))
    rows, current = [], []
    for piece in pieces:
        if sum(len(p[0]) for p in current) + len(piece[0]) > seq_len:
            rows.append(current)
            current = []
        current.append(piece)
    if current:
        rows.append(current)
    packed = []
    for row in rows:
        ids = torch.full((seq_len,), pad_id, dtype=torch.long)
        labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
        positions = torch.empty(seq_len, dtype=torch.long)
        at = 0
        for piece_ids, piece_labels in row:
            n = len(piece_ids)
            ids[at:at + n] = torch.tensor(piece_ids, dtype=torch.long)
            labels[at:at + n] = torch.tensor(piece_labels, dtype=torch.long)
            positions[at:at + n] = torch.arange(n)
            at += n
        last = positions[at - 1].item() if at else -1
        positions[at:] = torch.arange(last + 1, last + 1 + seq_len - at)
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


class RowLoader:
    """Batches of packed rows for ``steps`` optimizer steps of ``grad_accum`` micro-batches, reshuffled (seeded)
    at each pass over the data. Rows whose labels are all -100 are dropped up front."""

    def __init__(self, rows: list[dict], batch_size: int, steps: int, grad_accum: int = 1, seed: int = 0):
        rows = [r for r in rows if (r["labels"][1:] != IGNORE_INDEX).any()]
        if not rows:
            raise ValueError("no row has a token to train on (every label is masked: are all responses empty?)")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.num_batches = steps * grad_accum

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = random.Random(self.seed)
        order: list[int] = []
        for _ in range(self.num_batches):
            batch = []
            while len(batch) < self.batch_size:
                if not order:
                    order = list(range(len(self.rows)))
                    rng.shuffle(order)
                batch.append(self.rows[order.pop()])
                if len(self.rows) < self.batch_size and not order:
                    break                             # a data set smaller than a batch: one batch of all rows
            yield {key: torch.stack([r[key] for r in batch]) for key in batch[0]}


def steps_per_epoch(num_rows: int, batch_size: int, grad_accum: int) -> int:
    return max(1, -(-num_rows // (batch_size * grad_accum)))


def load_tokenizer(model_dir: str | Path):
    """transformers.AutoTokenizer from local files only; a clear error if the directory has none."""
    import transformers
    model_dir = Path(model_dir)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((model_dir / name).is_file() for name in names):
        raise FileNotFoundError(f"{model_dir} has no tokenizer (none of {', '.join(names)}); save one there with "
                                "tokenizer.save_pretrained(dir)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the directory is what matters
        raise ValueError(f"could not load the tokenizer in {model_dir}: {e}") from e
    return tokenizer
