"""What a run shows and keeps as it goes: a progress bar on a terminal (one plain line a step otherwise) and
metrics.jsonl in the output directory."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ..devices import distributed
from . import rundir


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class Progress:
    """On a terminal, a progress bar with the step, its ETA and the latest loss (tqdm); otherwise one plain line a
    step. ``note`` prints a line of its own (an evaluation) without clobbering the bar."""

    def __init__(self, total: int | None, stream=None):
        self.total = total
        if not distributed.is_main_process():      # data parallel: rank 0 reports for every rank
            stream = open(os.devnull, "w")
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self._bar = None

    def _line(self, entry: dict) -> str:
        dpo = (f"accuracy {entry['rewards/accuracies']:.2f}  margin {entry['rewards/margins']:.3f}  "
               if "rewards/accuracies" in entry else "")
        return (f"loss {entry['loss']:.4f}  {dpo}{entry['tokens_per_s']:,.0f} tok/s  "
                f"rss {_mib(entry['host_rss_peak_bytes'])}  device peak {_mib(entry['device_peak_bytes'])}")

    def step(self, entry: dict) -> None:
        if self.tty:
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=self.total, file=self.stream, unit="step", dynamic_ncols=True,
                                 initial=entry["step"] - 1)
            self._bar.set_postfix_str(self._line(entry), refresh=False)
            self._bar.update(entry["step"] - self._bar.n)
            return
        total = f"/{self.total}" if self.total else ""
        self.stream.write(f"step {entry['step']}{total}  {self._line(entry)}\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Metrics:
    """metrics.jsonl in the output directory, one JSON object a line, flushed as it goes (so it can be followed
    with tail -f). engine.save_pretrained swaps in a new directory (holding a copy of this file), so ``save``
    reopens it. A resumed run (``resumed_step``) continues the file from its checkpoint's step. Data parallel:
    rank 0 alone writes it (the history is the global figures on every rank)."""

    def __init__(self, out_dir: Path, resumed_step: int | None = None):
        self.out_dir = out_dir
        self.path = out_dir / "metrics.jsonl"
        self._file = None
        if not distributed.is_main_process():
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None:
            rundir.continue_metrics(self.path, resumed_step)
        self._file = self.path.open("w" if resumed_step is None else "a", encoding="utf-8")

    def write(self, kind: str, entry: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, **entry}) + "\n")
        self._file.flush()

    def save(self, engine, tokenizer=None, source=None, merge: bool = False) -> None:
        """The final model into out_dir: weights, config, the tokenizer and generation_config.json of the
        ``source`` model, and this file, assembled beside out_dir and swapped in as one unit (the run's
        checkpoints move into the new directory). A LoRA run saves its adapters (peft's format), or with
        ``merge`` the base with the adapters merged in. Every rank calls it; rank 0 writes."""
        if self._file is not None:
            self._file.close()

        def add_files(tmp: Path) -> None:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if source is not None and (Path(source) / "generation_config.json").is_file():
                shutil.copy2(Path(source) / "generation_config.json", tmp / "generation_config.json")
            shutil.copy2(self.path, tmp / self.path.name)
            rundir.mark_run(tmp, [e.name for e in tmp.iterdir()])
        try:
            engine.save_pretrained(self.out_dir, add_files=add_files, merge=merge)
        finally:
            if self._file is not None:
                self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
