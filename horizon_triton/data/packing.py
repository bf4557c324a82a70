"""Packing documents into rows, streamed from a JSONL file of any size, and the loaders that batch the rows.

A row is seq_len tokens: documents one after another, then padding. Its dict of LongTensors [seq_len]:
    input_ids     token ids
    labels        the ids where trained, -100 elsewhere: prompts, padding, each document's first token
    position_ids  0, 1, 2, ... restarting at each document, so that attention does not cross documents (the engine
                  starts a new document wherever a position does not grow); padding keeps counting, so it is no
                  document of its own and no real token attends to it (attention is causal)

Documents are packed greedily in order; one that does not fit in the rest of a row starts the next row. A document
longer than seq_len is never split (a response is never trained without its prompt): ``too_long="drop"`` skips it,
``"truncate"`` keeps its first seq_len tokens, ``"error"`` refuses it; either way it is counted. A document left with
no trained token is skipped and counted too.

Preference pairs (``preference=True``): the chosen and the rejected sequence of a pair are two documents packed one
after the other in the same row, so that a micro-batch of whole rows holds whole pairs in the order DPO reads them
(objectives/preference.py). A pair longer than seq_len (chosen + rejected) is dropped, refused, or truncated:
each sequence keeps its start, the chosen max(seq_len // 2, seq_len − rejected) tokens at most, the rejected the
rest. A row file of pairs may get a column of reference log-probs per token (``PackedRows.attach_reference``).

``prepare`` streams: lines are read in chunks, encoded by worker processes (a bounded number of chunks in flight),
packed as they come back in file order and written to a row file (int32 ids then uint8 flags a row) that
``PackedRows`` reads one row at a time. Memory stays that of a few chunks and one row, whatever the file size.
With ``out_dir=TEMPORARY`` the row files are unnamed temporary files in $TMPDIR: they vanish when closed or when
the process ends, however it ends (a SIGKILL too). The workers die with the process that started them. A record
far longer than seq_len is found too long on a prefix of its text (encode.exceeds), without tokenizing it whole.
"""
from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import random
import signal
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from horizon_triton.kernels.reference import IGNORE_INDEX

from .chat_shapes import ConversationShapes
from .encode import encode_preference, encode_record, encode_records, exceeds, preference_records
from .records import iter_lines, parse_line

TOO_LONG = ("drop", "truncate", "error")
TEMPORARY = "<temporary>"  # prepare(out_dir=TEMPORARY): unnamed row files, gone with the process
CHUNK_LINES = 256          # lines a worker encodes at a time
CHUNK_BYTES = 1 << 20      # ... or fewer, when the lines are long
_TRAINED, _DOC_START = 1, 2


# ------------------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------------------
@dataclass
class DataStats:
    """What a data file became. ``trained_tokens`` counts what the loss counts (no document's first token)."""
    records: int = 0
    tokens: int = 0              # tokens of the documents packed
    trained_tokens: int = 0
    too_long: int = 0            # documents longer than seq_len (dropped or truncated, as too_long says)
    untrained: int = 0           # documents skipped with no trained token
    rows: int = 0
    longest: int = 0             # tokens of the longest document before any cut
    max_id: int = -1             # the largest token id seen (checked against the model's vocab_size)
    slow_path: int = 0           # records whose assistant turns were found by rendering prefixes (chat_shapes)

    def summary(self, seq_len: int, too_long: str) -> str:
        cut = {"drop": "dropped", "truncate": "truncated"}.get(too_long, "refused")
        return (f"{self.records:,} records -> {self.rows:,} rows of {seq_len} tokens: {self.tokens:,} tokens, "
                f"{self.trained_tokens:,} trained ({self.trained_tokens / max(1, self.rows * seq_len):.0%} of the "
                f"rows); {self.too_long:,} longer than {seq_len} ({cut}; longest {self.longest:,}), "
                f"{self.untrained:,} with nothing to train skipped"
                + (f"; {self.slow_path:,} rendered once more an assistant turn (the chat template writes a turn "
                   "differently by its place or its content)" if self.slow_path else ""))


class Packer:
    """Greedy in-order packing of (ids, labels) documents into rows; ``add`` and ``flush`` return finished rows as
    (ids, labels, positions) int64 arrays [seq_len]."""

    def __init__(self, seq_len: int, pad_id: int, too_long: str = "drop", stats: DataStats | None = None):
        if seq_len < 2:
            raise ValueError(f"seq_len must be ≥ 2, got {seq_len}")
        if too_long not in TOO_LONG:
            raise ValueError(f"too_long {too_long!r}: choose one of {', '.join(TOO_LONG)}")
        self.seq_len, self.pad_id, self.too_long = seq_len, pad_id, too_long
        self.stats = stats if stats is not None else DataStats()
        self._new_row()

    def _new_row(self) -> None:
        self.ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        self.labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        self.positions = np.arange(self.seq_len, dtype=np.int64)
        self.at = 0

    def add(self, ids, labels, where: str = "a document") -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        ids, labels = np.asarray(ids, dtype=np.int64), np.array(labels, dtype=np.int64)
        n = len(ids)
        self.stats.longest = max(self.stats.longest, n)
        if n:
            self.stats.max_id = max(self.stats.max_id, int(ids.max()))
        if n > self.seq_len:
            self.stats.too_long += 1
            if self.too_long == "error":
                raise ValueError(f"{where} has {n} tokens, more than --seq-len {self.seq_len}; raise --seq-len or "
                                 "choose --too-long drop or truncate")
            if self.too_long == "drop":
                return []
            ids, labels, n = ids[:self.seq_len], labels[:self.seq_len], self.seq_len
        return self._place([(ids, labels)])

    def add_pair(self, chosen, rejected, where: str = "a pair") -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """A preference pair: (ids, labels) of the chosen and of the rejected sequence, placed in one row."""
        docs = [(np.asarray(ids, dtype=np.int64), np.array(labels, dtype=np.int64)) for ids, labels in (chosen, rejected)]
        (n_c, n_r) = (len(d[0]) for d in docs)
        self.stats.longest = max(self.stats.longest, n_c + n_r)
        self.stats.max_id = max([self.stats.max_id] + [int(d[0].max()) for d in docs if len(d[0])])
        if n_c + n_r > self.seq_len:
            self.stats.too_long += 1
            if self.too_long == "error":
                raise ValueError(f"{where} has {n_c} + {n_r} tokens (chosen + rejected, which share a row), more "
                                 f"than --seq-len {self.seq_len}; raise --seq-len or choose --too-long drop or "
                                 "truncate")
            if self.too_long == "drop":
                return []
            keep_c = min(n_c, max(self.seq_len // 2, self.seq_len - n_r))
            docs = [(ids[:keep], labels[:keep]) for (ids, labels), keep in zip(docs, (keep_c, self.seq_len - keep_c))]
        return self._place(docs)

    def _place(self, docs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Documents that go in one row together (one, or a pair), each with something to train, else none."""
        for _, labels in docs:
            if len(labels):
                labels[0] = IGNORE_INDEX             # nothing of its own precedes a document's first token
        if any(not (labels != IGNORE_INDEX).any() for _, labels in docs):
            self.stats.untrained += 1
            return []
        n = sum(len(ids) for ids, _ in docs)
        self.stats.tokens += n
        self.stats.trained_tokens += sum(int((labels != IGNORE_INDEX).sum()) for _, labels in docs)
        done = self.flush() if self.at + n > self.seq_len else []
        for ids, labels in docs:
            end = self.at + len(ids)
            self.ids[self.at:end], self.labels[self.at:end] = ids, labels
            self.positions[self.at:end] = np.arange(len(ids))
            self.positions[end:] = np.arange(len(ids), len(ids) + self.seq_len - end)
            self.at = end
        return done

    def flush(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self.at == 0:
            return []
        row = (self.ids, self.labels, self.positions)
        self.stats.rows += 1
        self._new_row()
        return [row]


def _row_dict(ids, labels, positions) -> dict:
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions)}


def pack_documents(docs, seq_len: int, pad_id: int, too_long: str = "error") -> list[dict]:
    """In memory: rows (dicts of LongTensors [seq_len]) of a list of (input_ids, labels) documents."""
    packer = Packer(seq_len, pad_id, too_long)
    rows = []
    for n, (ids, labels) in enumerate(docs):
        rows += packer.add(ids, labels, where=f"document {n}")
    return [_row_dict(*row) for row in rows + packer.flush()]


def pack_pairs(pairs, seq_len: int, pad_id: int, too_long: str = "error") -> list[dict]:
    """In memory: rows of a list of preference pairs [(ids, labels) chosen, (ids, labels) rejected], each pair in
    one row (encode.encode_preference makes them)."""
    packer = Packer(seq_len, pad_id, too_long)
    rows = []
    for n, (chosen, rejected) in enumerate(pairs):
        rows += packer.add_pair(chosen, rejected, where=f"pair {n}")
    return [_row_dict(*row) for row in rows + packer.flush()]


# ------------------------------------------------------------------------------------------------------------
# the row file
# ------------------------------------------------------------------------------------------------------------
class RowWriter:
    """Appends rows to a file: int32 ids [seq_len], then uint8 flags [seq_len] (trained, document start).
    ``path=None``: an unnamed temporary file in $TMPDIR (``file``), which PackedRows then reads."""

    def __init__(self, path: Path | None, seq_len: int):
        self.path, self.seq_len = None if path is None else Path(path), seq_len
        self.file = tempfile.TemporaryFile() if path is None else None
        self._file = self.file if path is None else self.path.open("wb")

    def write(self, ids: np.ndarray, labels: np.ndarray, positions: np.ndarray) -> None:
        trained = labels != IGNORE_INDEX
        if (labels[trained] != ids[trained]).any():
            raise ValueError("a row file stores labels as a trained flag: a label must be its token id or -100")
        flags = trained.astype(np.uint8) * _TRAINED | (positions == 0).astype(np.uint8) * _DOC_START
        self._file.write(ids.astype(np.int32).tobytes())
        self._file.write(flags.tobytes())

    def close(self) -> None:
        if self.file is not None:          # unnamed: kept open, PackedRows reads it
            self._file.flush()
            return
        self._file.close()


class PackedRows:
    """The rows of a row file, read one at a time (os.pread: nothing of the file stays in this process's memory);
    with a reference file attached, each row also has "ref_logps" (fp32 [seq_len]) from it."""

    def __init__(self, path, seq_len: int, pad_id: int, num_rows: int):
        """``path``: the row file's path, or an open (unnamed) file, which close() closes."""
        self._owned = None if isinstance(path, (str, Path)) else path
        self.path = Path(path) if self._owned is None else None
        self.seq_len, self.pad_id, self.num_rows = seq_len, pad_id, num_rows
        self._row_bytes = 5 * seq_len
        self._fd = None if self._owned is None else self._owned.fileno()
        self.reference_path = None
        self._ref_fd = None

    def attach_reference(self, path) -> None:
        """A file of fp32 [rows, seq_len] (DPO's reference log-probs of each token, preference.add_reference)."""
        path = Path(path)
        if not path.is_file() or path.stat().st_size != 4 * self.seq_len * self.num_rows:
            raise ValueError(f"{path}: a reference file for these rows must hold {self.num_rows} x {self.seq_len} "
                             "fp32 values (was it written for other data or another --seq-len?)")
        self.reference_path = path

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} of {self.num_rows}")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, self._row_bytes, i * self._row_bytes)
        ids = np.frombuffer(raw, dtype=np.int32, count=self.seq_len).astype(np.int64)
        flags = np.frombuffer(raw, dtype=np.uint8, offset=4 * self.seq_len)
        labels = np.where(flags & _TRAINED, ids, IGNORE_INDEX)
        index = np.arange(self.seq_len)
        doc_start = np.maximum.accumulate(np.where(flags & _DOC_START, index, 0))
        row = _row_dict(ids, labels, index - doc_start)
        if self.reference_path is not None:
            if self._ref_fd is None:
                self._ref_fd = os.open(self.reference_path, os.O_RDONLY)
            raw = os.pread(self._ref_fd, 4 * self.seq_len, i * 4 * self.seq_len)
            row["ref_logps"] = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())
        return row

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = self._fd = None
        for name in ("_fd", "_ref_fd"):
            if getattr(self, name) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)


# ------------------------------------------------------------------------------------------------------------
# streaming a JSONL file through worker processes
# ------------------------------------------------------------------------------------------------------------
class ChunkEncoder:
    """Lines -> [(line number, ids int32, labels int32, slow path?)] in a worker (``preference``: lists [chosen,
    rejected] of ids and of labels); stops at the first bad line and returns it as (line number, None, the error
    text, False). The records are encoded together (encode.encode_records); where that fails (a record the
    template or tokenizer refuses), one by one with encode_record, which finds the line to name."""

    def __init__(self, path, tokenizer, train_on: str, preference: bool = False, token_limit: int | None = None):
        self.path, self.tokenizer, self.train_on, self.preference = str(path), tokenizer, train_on, preference
        self.shapes = ConversationShapes(tokenizer)
        self.token_limit = token_limit     # records certainly longer give (line number, None, tokens at least, False)

    def __call__(self, chunk: list[tuple[int, bytes]]) -> list[tuple]:
        numbers, items, bad, too_long = [], [], [], {}
        for number, raw in chunk:
            where = f"{self.path}:{number}"
            try:
                record = parse_line(raw, where, first=number == 1, preference=self.preference)   # names the line
                at_least = self._too_long(record) if record is not None else 0
            except ValueError as e:
                message = str(e)
                bad = [(number, None, message if message.startswith(where + ":") else f"{where}: {message}", False)]
                break
            if at_least:
                too_long[number] = at_least
                numbers.append(number)
            elif record is not None:
                numbers.append(number)
                items += preference_records(record) if self.preference else [(record, 0)]
        try:
            encoded = encode_records(items, self.tokenizer, self.train_on, self.shapes)
        except ValueError:
            return self.one_by_one(chunk)
        per_record = 2 if self.preference else 1
        out, i = [], 0
        for number in numbers:
            if number in too_long:
                out.append((number, None, too_long[number], False))
                continue
            docs = encoded[i * per_record:(i + 1) * per_record]
            i += 1
            ids, labels = ([d[k].astype(np.int32) for d in docs] for k in (0, 1))
            slow = any(d[2] for d in docs)
            out.append((number, ids, labels, slow) if self.preference else (number, ids[0], labels[0], slow))
        return out + bad

    def _too_long(self, record: dict) -> int:
        if self.token_limit is None:
            return 0
        if not self.preference:
            return exceeds(record, self.tokenizer, self.token_limit)
        # a pair shares a row: one sequence beyond the limit is enough
        return max(exceeds(sequence, self.tokenizer, self.token_limit) for sequence, _ in preference_records(record))

    def one_by_one(self, chunk: list[tuple[int, bytes]]) -> list[tuple]:
        out = []
        for number, raw in chunk:
            where = f"{self.path}:{number}"
            try:
                record = parse_line(raw, where, first=number == 1, preference=self.preference)   # names the line
                if record is None:
                    continue
                at_least = self._too_long(record)
                if at_least:
                    out.append((number, None, at_least, False))
                    continue
                if self.preference:
                    docs = encode_preference(record, self.tokenizer)
                else:
                    docs = [encode_record(record, self.tokenizer, self.train_on)]
            except ValueError as e:
                message = str(e)
                out.append((number, None, message if message.startswith(where + ":") else f"{where}: {message}",
                            False))
                break
            ids, labels = ([np.array(d[k], dtype=np.int32) for d in docs] for k in (0, 1))
            out.append((number, ids, labels, True) if self.preference else (number, ids[0], labels[0], True))
        return out


_worker_encoder: ChunkEncoder | None = None


def _init_worker(encoder: ChunkEncoder, parent: int) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # the processes are the parallelism
    _die_with(parent)
    _worker_encoder = encoder


def _die_with(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent ends, however it ends (no orphaned worker)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)       # PR_SET_PDEATHSIG
    except (OSError, AttributeError):                     # not Linux: the pool's own shutdown stands
        return
    if os.getppid() != parent:                            # the parent ended before the call
        os._exit(1)


def _encode_in_worker(chunk):
    return _worker_encoder(chunk)


def _chunks(lines):
    chunk, size = [], 0
    for number, raw in lines:
        chunk.append((number, raw))
        size += len(raw)
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encoded_documents(path, tokenizer, train_on: str = "assistant", workers: int = 0, preference: bool = False,
                      token_limit: int | None = None):
    """(line number, ids, labels, slow path?) of every record of a JSONL file in file order (``preference``: of
    every pair, with ids and labels lists [chosen, rejected]), encoded by ``workers`` processes (0: in this process,
    the tokenizer's batches threaded in Rust) with at most 2 chunks a worker in flight; slow path: the record's
    assistant turns were found by rendering its prefixes (chat_shapes). The first bad line raises its error. With
    ``token_limit``, a record found longer without encoding it whole (encode.exceeds) gives (line number, None, a
    lower bound on its tokens, False)."""
    encoder = ChunkEncoder(path, tokenizer, train_on, preference, token_limit)
    chunks = _chunks(iter_lines(path))

    def results():
        if workers == 0:
            for chunk in chunks:
                yield encoder(chunk)
            return
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with context.Pool(workers, initializer=_init_worker, initargs=(encoder, os.getpid())) as pool:
            pending = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

    for result in results():
        for number, ids, labels, slow in result:
            if ids is None and isinstance(labels, str):
                raise ValueError(labels)
            yield number, ids, labels, slow


def in_eval_split(index: int, fraction: float, seed: int) -> bool:
    """Whether record ``index`` is held out: a Weyl sequence, so any run of records splits to within one record
    of ``fraction``, the same way every time for a seed."""
    return ((index + seed * 7919) * 0.6180339887498949) % 1.0 < fraction


@dataclass
class Prepared:
    """What ``prepare`` made: row files (None when only counting) and their statistics."""
    seq_len: int
    train: PackedRows | None
    eval: PackedRows | None
    stats: dict = field(default_factory=dict)         # "train" (and "eval") -> DataStats
    examples: list = field(default_factory=list)      # (line number, ids, labels) of the first records

    def close(self) -> None:
        for rows in (self.train, self.eval):
            if rows is not None:
                rows.close()


def prepare(path, tokenizer, seq_len: int, pad_id: int, out_dir=None, *, train_on: str = "assistant",
            too_long: str = "drop", workers: int = 0, eval_fraction: float = 0.0, seed: int = 0,
            keep_examples: int = 0, preference: bool = False) -> Prepared:
    """Streams a JSONL file into packed rows: row files in ``out_dir`` (train.rows, eval.rows), unnamed temporary
    files with ``out_dir=TEMPORARY``, or only the statistics when out_dir is None. ``eval_fraction`` of the
    records go to the eval rows. ``preference``: the records are preference pairs (records.normalize_preference),
    each packed in one row (Packer.add_pair)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"the eval split must be a fraction in [0, 1), got {eval_fraction}")
    splits = ["train", "eval"] if eval_fraction > 0 else ["train"]
    stats = {name: DataStats() for name in splits}
    packers = {name: Packer(seq_len, pad_id, too_long, stats[name]) for name in splits}
    writers = ({name: RowWriter(None if out_dir == TEMPORARY else Path(out_dir) / f"{name}.rows", seq_len)
                for name in splits} if out_dir else {})
    try:
        return _pack_file(path, tokenizer, seq_len, writers, packers, stats, splits, train_on=train_on,
                          too_long=too_long, workers=workers, eval_fraction=eval_fraction, seed=seed,
                          keep_examples=keep_examples, preference=preference, pad_id=pad_id)
    except BaseException:
        for writer in writers.values():
            if writer.file is not None:      # unnamed temporaries go now, not when collected
                writer.file.close()
        raise


def _pack_file(path, tokenizer, seq_len, writers, packers, stats, splits, *, train_on, too_long, workers,
               eval_fraction, seed, keep_examples, preference, pad_id) -> Prepared:
    examples = []
    try:
        index = 0
        limit = None if too_long == "truncate" else seq_len    # truncating needs the tokens
        for number, ids, labels, slow in encoded_documents(path, tokenizer, train_on, workers, preference, limit):
            name = "eval" if eval_fraction and in_eval_split(index, eval_fraction, seed) else "train"
            index += 1
            stats[name].records += 1
            if ids is None:        # found too long on a prefix: labels is a lower bound on its tokens
                stats[name].too_long += 1
                stats[name].longest = max(stats[name].longest, labels)
                if too_long == "error":
                    raise ValueError(f"{path}:{number} has more than {labels} tokens, more than --seq-len "
                                     f"{seq_len}; raise --seq-len or choose --too-long drop or truncate")
                continue
            stats[name].slow_path += slow
            if len(examples) < keep_examples:
                examples.append((number, ids, labels))
            where = f"{path}:{number}"
            rows = (packers[name].add_pair(*zip(ids, labels), where=where) if preference
                    else packers[name].add(ids, labels, where=where))
            for row in rows:
                if writers:
                    writers[name].write(*row)
        for name in splits:
            for row in packers[name].flush():
                if writers:
                    writers[name].write(*row)
    finally:
        for writer in writers.values():
            writer.close()
    if index == 0:
        raise ValueError(f"data file {path} holds no records (it is empty or all its lines are blank)")
    for name in splits:
        if stats[name].rows == 0:
            what = "no record" if stats[name].records == 0 else f"no trainable record of {stats[name].records}"
            raise ValueError(f"{path}: the {name} split has {what} (too long for --seq-len {seq_len}, or nothing "
                             "to train in them?)")
    rows = {name: PackedRows(writers[name].path or writers[name].file, seq_len, pad_id, stats[name].rows)
            if writers else None for name in splits}
    return Prepared(seq_len, rows["train"], rows.get("eval"), stats, examples)


# ------------------------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------------------------
class RowLoader:
    """Batches of rows: ``epochs`` passes over the data (the last batch of a pass may be smaller), or ``steps``
    optimizer steps of ``grad_accum`` batches, reshuffled (seeded) at each pass; ``shuffle=False`` keeps the
    order (evaluation). ``rows``: a list of row dicts or a PackedRows."""

    def __init__(self, rows, batch_size: int, steps: int | None = None, grad_accum: int = 1, seed: int = 0,
                 epochs: int | None = None, shuffle: bool = True):
        if len(rows) == 0:
            raise ValueError("no row has a token to train on (every label is masked: are all responses empty?)")
        if (steps is None) == (epochs is None):
            raise ValueError("RowLoader needs steps or epochs, not both")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.batches_per_epoch = math.ceil(len(rows) / batch_size)
        self.num_batches = steps * grad_accum if steps is not None else epochs * self.batches_per_epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = random.Random(self.seed)
        done = 0
        while done < self.num_batches:
            order = list(range(len(self.rows)))
            if self.shuffle:
                rng.shuffle(order)
            for start in range(0, len(order), self.batch_size):
                if done == self.num_batches:
                    return
                batch = [self.rows[i] for i in order[start:start + self.batch_size]]
                yield {key: torch.stack([r[key] for r in batch]) for key in batch[0]}
                done += 1


def steps_per_epoch(num_rows: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(num_rows / batch_size) / grad_accum))
