"""Op dispatch: which backend a run uses, and the engine trained through the Triton kernels (interpreter)
matching the torch path."""
import subprocess
import sys

import pytest
import torch

import horizon_triton as ht
from hf_reference import random_batches


def _run(backend, monkeypatch, compute_dtype="float32", head_chunk_rows=None):
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
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", compute_dtype=compute_dtype, lr=1e-3,
                                           head_chunk_rows=head_chunk_rows))
    history = engine.fit(batches)
    if backend is None:      # the torch path on CPU: the references, and PyTorch's CPU flash attention
        assert engine.kernel_report == {name: "library" if name.startswith("attention") else "reference"
                                        for name in engine.kernel_report}
    else:
        assert set(engine.kernel_report.values()) == {"triton-interpret"}
    return engine.kernel_backend, [h["loss"] for h in history], torch.cat(engine.store.master)


@pytest.mark.parametrize("head_chunk_rows", [None, 24])   # the fused head, or 3 vocabulary chunks (two passes)
def test_engine_through_triton_kernels_matches_torch_path(monkeypatch, head_chunk_rows):
    name, losses, weights = _run("interpret", monkeypatch, head_chunk_rows=head_chunk_rows)
    ref_name, ref_losses, ref_weights = _run(None, monkeypatch, head_chunk_rows=head_chunk_rows)
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


def _kernel_ops(dev):
    """The Triton kernels where the ``dev`` fixture runs them: the interpreter on CPU (this suite's default) or
    compiled on the GPU (TRITON_INTERPRET=0, as the GPU check runs it), with that device's library path."""
    from horizon_triton.models.ops import load_ops
    if dev.type == "cuda":
        return load_ops("triton", "cuda"), load_ops("torch", "cuda")
    return load_ops("triton-interpret"), load_ops("torch")


def test_canary_replaces_a_failing_family_with_one_warning_each(dev):
    """The canary against the reference, with two families planted wrong (swiglu's backward, the MoE down GEMM
    1% off) and one raising (rope, as a kernel that does not compile); the others pass."""
    from types import SimpleNamespace

    from horizon_triton.devices import canary
    from horizon_triton.models.ops import KERNEL_FAMILY

    triton_ops, fallback = _kernel_ops(dev)
    planted = SimpleNamespace(**vars(triton_ops))
    planted.swiglu_backward = lambda dh, gate_up: triton_ops.swiglu_backward(dh, gate_up) * 1.01
    planted.moe_down_forward = lambda *args: triton_ops.moe_down_forward(*args) * 1.01

    def no_compile(*args):
        raise RuntimeError("out of resource: shared memory")
    planted.rope_forward_ = no_compile
    with pytest.warns(RuntimeWarning) as warned:
        ops, report = canary.run(planted, fallback, dev, torch.float32, head_dim=32, sliding_window=5, moe=True)
    messages = "\n".join(str(w.message) for w in warned)
    assert len(warned) == 3
    assert all(f"the Triton {family} kernels" in messages for family in ("swiglu", "rope", "moe_experts"))
    assert report["swiglu_forward"] == report["swiglu_backward"]
    assert report["swiglu_backward"].startswith("library (Mismatch: output 1")
    assert report["rope_forward_"].startswith("library (RuntimeError: out of resource")
    assert ops.swiglu_backward is fallback.swiglu_backward and ops.rope_backward_ is fallback.rope_backward_
    assert report["moe_gate_up_backward"].startswith("library (Mismatch: output 1")      # moe_down_forward's
    healthy = [n for n, f in KERNEL_FAMILY.items() if f not in ("swiglu", "rope", "moe_experts")]
    assert all(report[n] == "triton" and getattr(ops, n) is getattr(triton_ops, n) for n in healthy)


def test_torch_backend_on_cuda_is_the_library_path():
    from horizon_triton.kernels import library
    from horizon_triton.models.ops import load_ops
    ops = load_ops("torch", "cuda")
    assert ops.attention_forward is library.attention_forward
    assert ops.linear_cross_entropy is library.linear_cross_entropy
    assert ops.rope_forward_ is library.rope_forward_          # the small ops are the references


def test_torch_backend_on_cpu_takes_the_library_attention():
    """On CPU the torch backend is the references but for the attention: aten's CPU flash attention through the
    library path (the reference's scores are S × S in time and memory)."""
    from horizon_triton.kernels import library, reference
    from horizon_triton.models.ops import load_ops
    ops = load_ops("torch", "cpu")
    assert ops.attention_forward is library.attention_forward
    assert ops.attention_backward is library.attention_backward
    assert ops.linear_cross_entropy is reference.linear_cross_entropy and ops.rope_forward_ is reference.rope_forward_


def test_canary_keeps_a_kernel_it_cannot_judge(dev):
    """Where the library path itself fails (e.g. no flash attention on this GPU) the Triton family stays, with a
    warning that says it went unchecked."""
    from types import SimpleNamespace

    from horizon_triton.devices import canary

    triton_ops, library = _kernel_ops(dev)
    fallback = SimpleNamespace(**vars(library))

    def unavailable(*args):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")
    fallback.swiglu_forward = unavailable
    with pytest.warns(RuntimeWarning, match="swiglu kernels could not be checked"):
        ops, report = canary.run(triton_ops, fallback, dev, torch.float32, head_dim=32, sliding_window=None)
    assert report["swiglu_backward"].startswith("triton (unchecked: the library path raised RuntimeError")
    assert ops.swiglu_forward is triton_ops.swiglu_forward
    assert report["moe_gate_up_forward"] == "triton (unchecked: no MoE layer)"     # a dense model's start-up
