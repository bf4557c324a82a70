"""The engine on a GPU: the CUDA device (real streams, events, pinned host store) with the compiled Triton
kernels must train like the CPU torch path. Runs only where the kernels compile:
    TRITON_INTERPRET=0 python -m pytest tests/test_engine_cuda.py
Without a GPU it skips (the same scheduler code is raced on CPU by tests/test_scheduler.py)."""
import pytest
import torch

import horizon_triton as ht
from hf_reference import make_hf_model, random_batches


@pytest.fixture
def gpu(dev):
    if dev.type != "cuda":
        pytest.skip("needs a GPU and TRITON_INTERPRET=0")
    return dev


def _train(path, device, compute_dtype, batches, **train):
    engine = ht.Engine(ht.ModelConfig.from_pretrained(path),
                       ht.TrainConfig(device=device, compute_dtype=compute_dtype, lr=3e-3, weight_decay=0.1,
                                      grad_accum_steps=2, **train))
    history = engine.fit(batches)
    return engine, [h["loss"] for h in history], torch.cat(engine.store.master)


@pytest.mark.parametrize("family", ["llama_tied_bias", "qwen3", "mistral"])
@pytest.mark.parametrize("compute_dtype, rel", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_cuda_engine_trains_like_the_cpu_path(gpu, tmp_path, family, compute_dtype, rel):
    make_hf_model(family, tmp_path, head_dim=32, hidden_size=128, pad_token_id=0)
    batches = random_batches(6, vocab=96, seq=40)
    batches[3]["position_ids"] = torch.cat((torch.arange(15), torch.arange(25))).expand(2, 40)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :9], mask[1, 30:] = 0, 0        # left and right padding, through the kernels' doc-id masking
    batches[4].update(attention_mask=mask, input_ids=batches[4]["input_ids"].masked_fill(mask == 0, 0))
    engine, losses, weights = _train(tmp_path, "cuda", compute_dtype, batches, checkpoint_budget_bytes=0)
    assert engine.kernel_backend == "triton" and engine.store.pinned
    _, ref_losses, ref_weights = _train(tmp_path, "cpu", compute_dtype, batches)
    assert losses == pytest.approx(ref_losses, rel=rel)
    if compute_dtype == "float32":   # in bf16 the two paths round differently; the losses are the check there
        torch.testing.assert_close(weights, ref_weights, atol=1e-4, rtol=0)


@pytest.mark.parametrize("compute_dtype, rel", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_cuda_lora_trains_like_the_cpu_path(gpu, tmp_path, compute_dtype, rel):
    """LoRA on CUDA: the adapters stream after their layer's base (pinned), fp32 gradients copy out unrounded,
    the frozen head runs without its dW GEMM (here in vocabulary chunks)."""
    make_hf_model("qwen3", tmp_path, head_dim=32, hidden_size=128)
    batches = random_batches(4, vocab=96, seq=40)
    lora = dict(lora_rank=8, lora_alpha=16, head_chunk_rows=32,
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    engine, losses, _ = _train(tmp_path, "cuda", compute_dtype, batches, checkpoint_budget_bytes=0, **lora)
    cpu, ref_losses, _ = _train(tmp_path, "cpu", compute_dtype, batches, **lora)
    assert losses == pytest.approx(ref_losses, rel=rel)

    def adapters(e):
        return torch.cat([e.store.master_values(i, adapters=True) for i, layout in
                          enumerate(e.store.adapter_layouts) if layout.numel])
    if compute_dtype == "float32":
        torch.testing.assert_close(adapters(engine), adapters(cpu), atol=1e-4, rtol=0)


@pytest.mark.parametrize("budget", [0, None])
def test_cuda_forward_passes_match_the_cpu_path(gpu, tmp_path, budget):
    """Forward-only passes on CUDA (real streams, pinned host states): every hidden state waiting on the host
    (budget 0), or the default budget from the free memory; the head in chunks. Against the CPU path."""
    make_hf_model("qwen3", tmp_path, head_dim=32, hidden_size=128)
    batches = random_batches(8, vocab=96, seq=40)
    results = []
    for device in ("cuda", "cpu"):
        engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path),
                           ht.TrainConfig(device=device, compute_dtype="float32", head_chunk_rows=32,
                                          checkpoint_budget_bytes=budget if device == "cuda" else None))
        results.append((engine.evaluate(batches), list(engine.reference_logps(batches)),
                        engine.logits(batches[0]["input_ids"])))
        engine.close()
    (loss, logps, logits), (ref_loss, ref_logps, ref_logits) = results
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    for got, want in zip(logps, ref_logps):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_prepare_copies_through_pinned_memory_without_blocking(monkeypatch):
    """On a pinning device (CUDA) every tensor of a micro-batch goes host → pinned → device with non_blocking;
    runs on CPU with the pinning and the copy recorded instead of done."""
    engine = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu"))
    engine.device.pin_memory = True
    pinned, copies = [], []
    def recorded_pin(t):
        staged = t.clone()
        pinned.append(staged.data_ptr())
        return staged

    monkeypatch.setattr(torch.Tensor, "pin_memory", recorded_pin)
    to = torch.Tensor.to

    def recorded_to(t, *args, **kwargs):
        copies.append((t.data_ptr(), kwargs.get("non_blocking", False)))
        return to(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recorded_to)
    batch = random_batches(1, vocab=64, seq=12)[0]
    batch["position_ids"] = torch.cat((torch.arange(5), torch.arange(7))).expand(2, 12)
    mb = engine.prepare(batch)
    monkeypatch.undo()
    assert len(pinned) == 4                                    # positions, input_ids, targets, doc_ids
    assert [ptr for ptr, non_blocking in copies if non_blocking] == pinned
    assert mb.doc_ids is not None and mb.input_ids.shape == (2, 12)
    engine.close()


def test_cuda_events_block_instead_of_spinning(monkeypatch):
    """The events the engine waits for on the host (the step's end, a slot's copy) are blocking: a spinning
    cudaEventSynchronize would hold a core the CPU AdamW runs on. Runs on CPU with torch.cuda.Event recorded."""
    from horizon_triton.devices.device import CudaDevice

    made = []

    class RecordedEvent:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def record(self, stream):
            self.stream = stream

    monkeypatch.setattr(torch.cuda, "Event", RecordedEvent)
    device = CudaDevice.__new__(CudaDevice)                   # no GPU: only the streams' names matter here
    device._streams = {"compute": "compute stream", "copy_out": "copy-out stream"}
    event = device.record("copy_out")
    assert event.stream == "copy-out stream" and made == [{"blocking": True}]
