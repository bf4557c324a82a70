"""Op dispatch: which backend a run uses, and the engine trained through the Triton kernels (interpreter)
matching the torch path."""
import subprocess
import sys

import pytest
import torch

import horizon_triton as ht
from hf_reference import random_batches


def _run(backend, monkeypatch, compute_dtype="float32"):
    if backend is None:
        monkeypatch.delenv("HORIZON_KERNELS", raising=False)
    else:
        monkeypatch.setenv("HORIZON_KERNELS", backend)
    cfg = ht.preset("tiny", qk_norm=True, attention_bias=True, tie_word_embeddings=True, pad_token_id=5)
    batches = random_batches(2, vocab=64, seq=16)
    batches[1]["position_ids"] = torch.cat((torch.arange(6), torch.arange(10))).expand(2, 16)  # packed docs
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :4] = 0                 # row 0 left-padded, row 1 right-padded; the pad id also among real tokens
    mask[1, 12:] = 0
    batches[1]["input_ids"][mask == 0] = 5
    batches[1]["input_ids"][:, 8] = 5
    batches[1]["attention_mask"] = mask
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", compute_dtype=compute_dtype, lr=1e-3))
    history = engine.fit(batches)
    return engine.kernel_backend, [h["loss"] for h in history], torch.cat(engine.store.master)


def test_engine_through_triton_kernels_matches_torch_path(monkeypatch):
    name, losses, weights = _run("interpret", monkeypatch)
    ref_name, ref_losses, ref_weights = _run(None, monkeypatch)
    assert (name, ref_name) == ("triton-interpret", "torch")
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    # Adam divides by sqrt(v): where a gradient is ~0 a rounding difference moves a weight by up to ~lr/10
    torch.testing.assert_close(weights, ref_weights, atol=1e-4, rtol=0)


def test_backend_choice_errors(monkeypatch):
    monkeypatch.setenv("HORIZON_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="torch, triton, interpret"):
        ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu"))
    monkeypatch.setenv("HORIZON_KERNELS", "triton")
    with pytest.raises(ValueError, match="interpret"):
        ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_autotune_says_it_needs_a_gpu():
    result = subprocess.run([sys.executable, "-m", "horizon_triton.kernels.autotune", "attention"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr
