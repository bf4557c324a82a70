"""The scheduler's ordering, memory and trace, on the CPU devices.

The async test device runs every stream on its own thread after random delays: a missing wait lets a compute
read a half-filled slot or a copy read a half-written gradient, and the numbers change. Results must be
bit-identical to the synchronous device for every seed."""
import json
import math

import pytest
import torch

import horizon_triton as ht
from horizon_triton import device as devices
from horizon_triton import scheduler as sched
from hf_reference import random_batches

TINY = ht.preset("tiny", num_layers=3, tie_word_embeddings=True)


def _train(cfg=TINY, steps=2, **train):
    settings = dict(device="cpu", compute_dtype="bfloat16", lr=1e-3, grad_accum_steps=2, seed=0)
    settings.update(train)
    engine = ht.Engine(cfg, ht.TrainConfig(**settings))
    history = engine.fit(random_batches(steps * settings["grad_accum_steps"], vocab=cfg.vocab_size, seq=10))
    weights = torch.cat([m.clone() for m in engine.store.master])
    engine.close()
    return [h["loss"] for h in history], [h["grad_norm"] for h in history], weights


@pytest.fixture(scope="module")
def sync_result():
    return _train()


@pytest.fixture(scope="module")
def sync_chunked_result():
    return _train(head_chunk_rows=10)


@pytest.mark.parametrize("seed", range(24))
def test_async_device_bit_identical_to_sync(sync_result, sync_chunked_result, seed, monkeypatch):
    # vary the delays, the slot count, where checkpoints live and whether the head streams in vocabulary chunks
    # (7 chunks of 10 rows, two passes); weights come from the same init seed
    monkeypatch.setattr(devices, "AsyncTestDevice",
                        lambda _seed, _cls=devices.AsyncTestDevice: _cls(seed=1000 + seed, max_delay_s=0.001))
    chunked = seed % 4 == 1
    result = _train(device="cpu-async", num_slots=2 + seed % 2, checkpoint_budget_bytes=None if seed % 3 else 0,
                    head_chunk_rows=10 if chunked else None)
    want = sync_chunked_result if chunked else sync_result
    assert result[0] == want[0]
    assert result[1] == want[1]
    assert torch.equal(result[2], want[2])


def test_async_device_exposes_a_missing_wait(sync_result, monkeypatch):
    """The judge itself: with stream waits switched off, the async device must produce different numbers."""
    monkeypatch.setattr(devices.AsyncTestDevice, "wait", lambda self, stream, event: None)
    differs = 0
    for seed in range(4):
        monkeypatch.setattr(devices, "AsyncTestDevice",
                            lambda _seed, _cls=devices.AsyncTestDevice, s=seed: _cls(seed=s, max_delay_s=0.003))
        try:
            result = _train(device="cpu-async")
        except Exception:   # reading a slot before it exists is also a detection
            differs += 1
            continue
        differs += result[0] != sync_result[0] or not torch.equal(result[2], sync_result[2])
    assert differs >= 1


def test_device_memory_flat_in_depth():
    """Slots, accumulators, checkpoints and activation grads on the device: the same for 4 and 16 layers when
    checkpoints are offloaded to the host."""
    peaks = []
    for depth in (4, 16):
        engine = ht.Engine(ht.preset("tiny", num_layers=depth), ht.TrainConfig(device="cpu", checkpoint_budget_bytes=0))
        history = engine.fit(random_batches(2, vocab=64, seq=16))
        peaks.append(history[-1]["device_peak_bytes"])
    assert peaks[0] == peaks[1] > 0


def test_checkpoints_within_budget_stay_on_device():
    cfg = ht.preset("tiny", num_layers=4)
    kept = ht.Engine(cfg, ht.TrainConfig(device="cpu")).fit(random_batches(1, vocab=64, seq=16))[0]
    offloaded = ht.Engine(cfg, ht.TrainConfig(device="cpu", checkpoint_budget_bytes=0)).fit(
        random_batches(1, vocab=64, seq=16))[0]
    one_layer_input = 2 * 16 * cfg.hidden_size * 2   # batch 2, seq 16, bf16
    assert kept["device_peak_bytes"] - offloaded["device_peak_bytes"] >= (cfg.num_layers - 1) * one_layer_input
    assert kept["loss"] == offloaded["loss"]


def test_trace_shows_every_primitive_and_weights_stream_twice_per_step(tmp_path):
    path = tmp_path / "trace.json"
    cfg = ht.preset("tiny", num_layers=3)
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu-async", grad_accum_steps=3, trace_path=str(path),
                                           checkpoint_budget_bytes=0))
    engine.fit(random_batches(6, vocab=64, seq=8))
    trace = json.loads(path.read_text())
    names = [e["name"] for e in trace["traceEvents"] if e["ph"] == "X"]
    for prefix in ("stream_in", "forward", "backward", "stream_out", "adamw", "offload checkpoint",
                   "prefetch checkpoint"):
        assert any(n.startswith(prefix) for n in names), prefix
    # layer-major micro-batching: two steps × (forward + backward), whatever grad_accum_steps is
    assert names.count("stream_in layers.1") == 4
    assert names.count("stream_out layers.1") == 2
    summary = trace["otherData"]
    assert 0 < summary["compute_busy"] <= 1 and 0 <= summary["copy_hidden"] <= 1


@pytest.mark.parametrize("tied", [False, True])
def test_device_memory_independent_of_vocabulary(tied):
    """The same decoder with a 1K and a 16K vocabulary: the embedding is gathered by rows and the head streams in
    slot-sized vocabulary chunks, so slots, accumulators and the measured device peak are the same (the whole
    head's fp32 gradient alone used to be 16K × 64 × 4 B)."""
    runs = []
    for vocab in (1024, 16384):
        cfg = ht.preset("tiny", vocab_size=vocab, tie_word_embeddings=tied)
        engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", grad_accum_steps=2))
        history = engine.fit(random_batches(4, vocab=1024, seq=16))   # the same token ids for both
        decoder = max(layout.numel for layout in engine.store.layouts[1:-1])
        assert all(slot.numel() == decoder for slot in engine.pipeline.slots)
        assert len(engine.pipeline.head_chunks()) == -(-vocab // ((decoder - 64) // 64)) > 1
        runs.append((history[-1]["device_peak_bytes"], [h["loss"] for h in history]))
    assert runs[0][0] == runs[1][0]
    assert runs[1][0] < 16384 * 64 * 4
    assert all(math.isfinite(x) for x in runs[0][1] + runs[1][1])


def test_default_checkpoint_budget_follows_free_device_memory(monkeypatch):
    """CPU devices keep every checkpoint; a device that reports its free memory keeps what
    default_checkpoint_budget allows and offloads the rest, with the same numbers."""
    cfg = ht.preset("tiny", num_layers=4)
    batches = random_batches(1, vocab=64, seq=16)

    def run(free=None, **train):
        engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", **train))
        if free is not None:
            monkeypatch.setattr(engine.device, "free_memory", lambda: free)
        return engine, engine.fit(batches)[0]

    _, kept = run()
    _, offloaded = run(checkpoint_budget_bytes=0)
    engine, _ = run(free=10**12)
    one = 2 * 16 * cfg.hidden_size * 2                     # one layer's input: batch 2, seq 16, bf16
    need = sched.default_checkpoint_budget(engine.pipeline, 10**9, [32], 30)
    assert need == 10**9 - 10**9 // 20 - (32 * 64 * (3 * 2 + 4) + 32 * sched.backward_bytes_per_token(cfg, 2)
                                          + 32 * 64 * (2 + 8) + 30 * 64 * (2 + 4))
    cases = {10**12: kept, 0: offloaded}
    for free, want in cases.items():
        assert run(free=free)[1]["device_peak_bytes"] == want["device_peak_bytes"]
    # room for exactly two checkpoints: two stay, the others go
    free = 0
    while sched.default_checkpoint_budget(engine.pipeline, free, [32], 30) < 2 * one:
        free += 1024
    two = run(free=free)[1]
    assert offloaded["device_peak_bytes"] < two["device_peak_bytes"] < kept["device_peak_bytes"]
    assert kept["loss"] == offloaded["loss"] == two["loss"]
