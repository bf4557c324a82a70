"""The scheduler's ordering, memory and trace, on the CPU devices.

The async test device runs every stream on its own thread after random delays: a missing wait lets a compute
read a half-filled slot or a copy read a half-written gradient, and the numbers change. Results must be
bit-identical to the synchronous device for every seed."""
import json
import math
import threading
import time
import weakref

import pytest
import torch

import horizon_triton as ht
from horizon_triton.devices import device as devices
from horizon_triton.schedule import activations
from horizon_triton.schedule import scheduler as sched
from horizon_triton.models.dense.weights import layer_layouts
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
    need = activations.default_checkpoint_budget(engine.pipeline, 10**9, [(1, 32)], 30)
    assert need == 10**9 - 10**9 // 20 - (32 * 64 * (3 * 2 + 4) + 32 * activations.backward_bytes_per_token(cfg, 2)
                                          + 32 * 64 * (2 + 8) + 30 * 64 * (2 + 4))
    cases = {10**12: kept, 0: offloaded}
    for free, want in cases.items():
        assert run(free=free)[1]["device_peak_bytes"] == want["device_peak_bytes"]
    # room for exactly two checkpoints: two stay, the others go
    free = 0
    while activations.default_checkpoint_budget(engine.pipeline, free, [(1, 32)], 30) < 2 * one:
        free += 1024
    two = run(free=free)[1]
    assert offloaded["device_peak_bytes"] < two["device_peak_bytes"] < kept["device_peak_bytes"]
    assert kept["loss"] == offloaded["loss"] == two["loss"]


def test_compute_is_submitted_before_the_stream_in_that_waits_for_the_optimizer(monkeypatch):
    """Step 2's forward: layer i's compute is submitted before the host blocks on the optimizer for layer i+S-1
    (with a slow CPU AdamW, compute i would otherwise wait for layer i+1's update)."""
    from horizon_triton.host import optimizer as opt
    from horizon_triton.schedule import scheduler
    log, lock = [], threading.Lock()
    update, submit = opt.OptimizerDriver.update_layer, scheduler.compute

    def slow_update(self, i, *args):
        time.sleep(0.05)
        update(self, i, *args)
        with lock:
            log.append(("updated", self.store.layouts[i].name))

    def logged_compute(p, i, slot, work, name):
        with lock:
            log.append(("compute", name))
        submit(p, i, slot, work, name)

    monkeypatch.setattr(opt.OptimizerDriver, "update_layer", slow_update)
    monkeypatch.setattr(scheduler, "compute", logged_compute)
    cfg = ht.preset("tiny", num_layers=4)
    for slots in (2, 3):
        log.clear()
        engine = ht.Engine(cfg, ht.TrainConfig(device="cpu-async", num_slots=slots))
        engine.fit(random_batches(2, vocab=64, seq=8))
        engine.close()
        second = log[log.index(("compute", "backward embed")) + 1:]           # from step 2's forward on
        names = [layout.name for layout in engine.store.layouts]
        for pos, name in enumerate(names[:-(slots - 1)]):
            ahead = names[pos + slots - 1]
            assert second.index(("compute", f"forward {name}")) < second.index(("updated", ahead)), (slots, name)


def test_tracer_keeps_a_bounded_window_of_spans(tmp_path):
    from horizon_triton.schedule.trace import Tracer
    tracer = Tracer(max_spans=10)
    for n in range(25):
        tracer.wrap(f"work {n}", "compute" if n % 2 else "copy_in", lambda: None)()
    names = [name for name, *_ in tracer.spans()]
    assert names == [f"work {n}" for n in range(15, 25)] and tracer.dropped == 15
    tracer.write(str(tmp_path / "t.json"))
    trace = json.loads((tmp_path / "t.json").read_text())
    assert len([e for e in trace["traceEvents"] if e["ph"] == "X"]) == 10
    assert trace["otherData"]["dropped_spans"] == 15


def test_decoder_recompute_keeps_no_fused_qkv():
    """The backward reads q, k, v (copied out of the fused projection), never the fused qkv itself."""
    from horizon_triton.models.dense import layer as lt
    from horizon_triton.models.ops import load_ops
    cfg = ht.preset("tiny", attention_bias=True)
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu"))
    w = engine.store.layouts[1].views(engine.store.working[1])
    mb = engine.prepare(random_batches(1, vocab=cfg.vocab_size, seq=12)[0])
    x = torch.randn(mb.input_ids.numel(), cfg.hidden_size, dtype=torch.bfloat16)
    ops, outputs = load_ops("torch"), []
    fused = ops.rmsnorm_matmul_forward

    def recorded(*args):
        y, rstd = fused(*args)
        outputs.append(weakref.ref(y))
        return y, rstd

    ops.rmsnorm_matmul_forward = recorded
    saved = lt._decoder_recompute(ops, cfg, w, x, mb)
    assert outputs[0]() is None               # the fused qkv projection: gone while the saved tensors live
    assert outputs[1]() is saved["gate_up"]
    engine.close()


def test_grad_norm_is_the_float64_norm_of_the_gradients():
    """Layers of ~4.2M parameters: one fp32 reduction over such a layer is off by ~1e-4 relative on CPU (the norm
    was 14.8267 for 14.8307); the reported norm must be the float64 norm of the very gradients the engine wrote
    to the host store (its fp32 partial sums of 1024 elements leave ~3e-9)."""
    cfg = ht.ModelConfig(vocab_size=256, hidden_size=512, intermediate_size=2048, num_layers=2, num_heads=8,
                         num_kv_heads=8)
    assert min(layout.numel for layout in layer_layouts(cfg)[1:-1]) > 4e6
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", compute_dtype="float32", lr=0.0))
    reported = engine.fit(random_batches(1, vocab=256, seq=16))[0]["grad_norm"]
    exact = sum(g.double().square().sum() for g in engine.store.grad).sqrt().item()
    assert reported == pytest.approx(exact, rel=2e-8)
