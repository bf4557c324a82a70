"""A training process for the checkpoint tests, run as ``python checkpoint_worker.py COMMAND DIR``:

    first DIR    each of CONFIGS trains K of N steps (an N-step schedule) and saves a checkpoint in DIR/<name>
    rest DIR     a new process: each resumes from DIR/<name>, trains the remaining steps, saves its final state in
                 DIR/<name>-final and its fp32 weights in DIR/<name>-model; histories go to DIR/<name>-*.json
    loop DIR     the kill -9 worker: resumes from DIR if it holds a checkpoint, then trains KILL_MODEL, saving a
                 checkpoint after every step, printing "resumed S", "saving S" and "saved S SECONDS" (after the save
                 returned), until step KILL_UNTIL (or the third argument) or until it is killed
"""
import json
import sys
import time
from pathlib import Path

import torch

import horizon_triton as ht
from horizon_triton.state import training_state

N, K, ACCUM = 6, 3, 2
BASE = dict(lr=2e-2, weight_decay=0.1, warmup_steps=4, lr_schedule="cosine", grad_accum_steps=ACCUM,
            max_grad_norm=0.05, seed=3)              # warm-up spans step K; the clip bites at every step
CONFIGS = {f"{dtype}-{device}": dict(BASE, compute_dtype=dtype, device=device)
           for dtype in ("bfloat16", "float32") for device in ("cpu", "cpu-async")}
KILL_MODEL = dict(vocab_size=16384, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=2,
                  num_kv_heads=1)      # 2.2M parameters, nearly all embedding and head (a fast step): 30 MB saved
KILL_TRAIN = dict(lr=1e-3, warmup_steps=5, max_grad_norm=1.0, device="cpu", compute_dtype="bfloat16")
KILL_UNTIL = 10**6


def batch(index: int, vocab: int, rows: int = 2, seq: int = 12) -> dict:
    """Batch ``index`` of a deterministic stream: the same tokens whichever process asks."""
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(1000 + index))
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def batches(vocab: int, start: int, stop: int):
    return (batch(i, vocab) for i in range(start, stop))


def history_json(history: list[dict]) -> list[dict]:
    return [{"step": h["step"], "loss": h["loss"], "grad_norm": h["grad_norm"], "lr": h["lr"]} for h in history]


def first(root: Path) -> None:
    cfg = ht.preset("tiny")
    for name, settings in CONFIGS.items():
        train = ht.TrainConfig(**settings, checkpoint_dir=str(root / name), save_every_steps=K)
        engine = ht.Engine(cfg, train)
        history = engine.fit(batches(cfg.vocab_size, 0, K * ACCUM), max_steps=N)   # the loader runs out at K
        (root / f"{name}-first.json").write_text(json.dumps(history_json(history)))
        engine.close()


def rest(root: Path) -> None:
    for name in CONFIGS:
        engine = ht.Engine.from_checkpoint(root / name)
        vocab = engine.model_cfg.vocab_size
        history = engine.fit(batches(vocab, engine.micro_batches, N * ACCUM))
        (root / f"{name}-rest.json").write_text(json.dumps(history_json(history)))
        engine.save_checkpoint(root / f"{name}-final")
        engine.save_pretrained(root / f"{name}-model", dtype="float32")
        engine.close()


def loop(root: Path) -> None:
    if training_state.checkpoints(root):
        engine = ht.Engine.from_checkpoint(root)          # the saved train config keeps saving every step
    else:
        engine = ht.Engine(ht.ModelConfig(**KILL_MODEL), ht.TrainConfig(**KILL_TRAIN, checkpoint_dir=str(root),
                                                                         save_every_steps=1, keep_last=2))
    print("resumed", engine.step, flush=True)
    save = engine.save_checkpoint

    def save_and_say(*args, **kwargs):
        print("saving", engine.step, flush=True)
        start = time.perf_counter()
        path = save(*args, **kwargs)
        print("saved", engine.step, time.perf_counter() - start, flush=True)
        return path
    engine.save_checkpoint = save_and_say
    until = int(sys.argv[3]) if len(sys.argv) > 3 else KILL_UNTIL
    engine.fit(batches(KILL_MODEL["vocab_size"], engine.micro_batches, until))
    print("done", engine.step, flush=True)


if __name__ == "__main__":
    {"first": first, "rest": rest, "loop": loop}[sys.argv[1]](Path(sys.argv[2]))
