"""Training checkpoint throughput: engine.save_checkpoint and load_checkpoint against a plain write and read of the
same number of bytes, side by side in each round (the disk is shared and noisy, so only the ratios travel).

    save: every state buffer streamed into safetensors shards, fsync of each file and the directory, rename
    plain write: one file written from one buffer in the same 64 MiB calls, then fsync
    load: headers checked against the manifest, bytes read straight into the store's buffers
    plain read: the plain file read into one buffer

Every file is dropped from the page cache before each timed operation (posix_fadvise), so the reads come from
the disk where the kernel honours that. GB/s = bytes / seconds (1 GB = 1e9 bytes).
"""
import os
import shutil
import statistics
import time

import pytest
import torch

import horizon_triton as ht
from horizon_triton.state import training_state

# 56M parameters: 0.79 GB of state in bfloat16 mode (master, working, two moments: 14 bytes a parameter)
MODEL = dict(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_layers=2, num_heads=8, num_kv_heads=4)


def _plain_write(path, data: torch.Tensor) -> None:
    view = memoryview(data.numpy())
    with open(path, "wb", buffering=0) as f:
        for start in range(0, len(view), training_state.WRITE_CHUNK):
            f.write(view[start:start + training_state.WRITE_CHUNK])
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _drop_from_page_cache(directory) -> None:
    """So that every read comes from the disk (where the kernel honours the advice)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def _plain_read(path, data: torch.Tensor) -> None:
    view = memoryview(data.numpy())
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            done += f.readinto(view[done:done + training_state.WRITE_CHUNK])


@pytest.mark.benchmark(group="checkpoint")
def test_checkpoint_save_and_load_throughput(benchmark, record, tmp_path):
    engine = ht.Engine(ht.ModelConfig(**MODEL), ht.TrainConfig(device="cpu"))
    nbytes = sum(t.numel() * t.element_size() for _, _, t in engine.store.state_buffers())
    plain = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    seconds = {"save": [], "plain_write": [], "load": [], "plain_read": []}

    def timed(name, fn):
        _drop_from_page_cache(tmp_path)
        start = time.perf_counter()
        fn()
        seconds[name].append(time.perf_counter() - start)

    rounds = iter(range(100))

    def one_round():
        shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)
        (tmp_path / "plain.bin").unlink(missing_ok=True)
        os.sync()                                   # the deletions' discards are not charged to the next write
        writes = [("plain_write", lambda: _plain_write(tmp_path / "plain.bin", plain)),
                  ("save", lambda: engine.save_checkpoint(tmp_path / "ckpt"))]
        reads = [("plain_read", lambda: _plain_read(tmp_path / "plain.bin", plain)),
                 ("load", lambda: engine.load_checkpoint(tmp_path / "ckpt"))]
        order = 1 if next(rounds) % 2 else -1       # alternate who goes first
        for name, fn in writes[::order] + reads[::order]:
            timed(name, fn)

    benchmark.pedantic(one_round, rounds=6, iterations=1, warmup_rounds=0)
    rate = {name: nbytes / statistics.median(s) / 1e9 for name, s in seconds.items()}
    record(state_GB=round(nbytes / 1e9, 3), parameters=engine.store.num_parameters(),
           **{f"{name}_GBps": round(r, 3) for name, r in rate.items()},
           save_vs_plain_write=round(rate["save"] / rate["plain_write"], 3),
           load_vs_plain_read=round(rate["load"] / rate["plain_read"], 3),
           seconds={name: [round(x, 3) for x in s] for name, s in seconds.items()})
