"""perf/zero3_compare.py on CPU: the skip line without deepspeed or a GPU, the DeepSpeed configuration (validated by
DeepSpeed itself where it is installed), and that both sides get the same model, the same weight-decay split and
the same tokens."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "perf"))
import zero3_compare as z3  # noqa: E402


def test_skips_with_a_reason_and_exit_status_0():
    reason = z3.why_not_runnable()
    if reason is None:
        pytest.skip("deepspeed and a GPU are both here: the comparison would run")
    run = subprocess.run([sys.executable, str(ROOT / "perf" / "zero3_compare.py"), "--layers", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == f"zero3_compare: skipped: {reason}"
    if not torch.cuda.is_available():
        assert "no CUDA GPU visible" in reason


def test_deepspeed_config_is_zero3_with_cpu_offload_and_our_optimizer():
    cfg = z3.deepspeed_config(micro_batch=4)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    for kind in ("offload_param", "offload_optimizer"):
        assert zero[kind] == {"device": "cpu", "pin_memory": True}
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == z3.HYPER["max_grad_norm"]
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW"
    assert opt["params"] == {"lr": z3.HYPER["lr"], "betas": list(z3.HYPER["betas"]), "eps": z3.HYPER["eps"],
                             "weight_decay": z3.HYPER["weight_decay"]}
    # the same hyper-parameters as the engine's side
    import horizon_triton as ht
    train = ht.TrainConfig(**z3.HYPER)
    assert (train.lr, train.betas, train.eps, train.weight_decay) == (
        opt["params"]["lr"], tuple(opt["params"]["betas"]), opt["params"]["eps"], opt["params"]["weight_decay"])


def test_deepspeed_accepts_the_config():
    config = pytest.importorskip("deepspeed.runtime.config", reason="deepspeed not installed")
    ds = config.DeepSpeedConfig(z3.deepspeed_config(micro_batch=2))
    assert ds.zero_optimization_stage == 3
    assert ds.zero_config.offload_param.device == "cpu" and ds.zero_config.offload_optimizer.device == "cpu"
    assert ds.zero_config.offload_param.pin_memory and ds.zero_config.offload_optimizer.pin_memory
    assert ds.optimizer_name == "adamw" and ds.optimizer_params["betas"] == [0.9, 0.95]
    assert ds.train_batch_size == 2 and ds.gradient_clipping == 1.0


def test_same_model_same_decay_split_same_tokens():
    from transformers import AutoModelForCausalLM

    import horizon_triton as ht
    from horizon_triton.models.dense.weights import layer_layouts
    assert z3.model_config("70b", layers=2) == ht.preset("llama-8b", hidden_size=8192, intermediate_size=28672,
                                                        num_heads=64, num_kv_heads=8, num_layers=2)
    cfg = ht.preset("llama-8b", num_layers=1, vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4,
                    num_kv_heads=2)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg.to_hf_config("bfloat16"))
    groups = z3.param_groups(hf)
    layouts = layer_layouts(cfg)
    assert sum(p.numel() for p in groups[0]["params"]) == sum(lay.decay_numel for lay in layouts)
    assert sum(p.numel() for p in groups[1]["params"]) == sum(lay.numel - lay.decay_numel for lay in layouts)
    assert [g["weight_decay"] for g in groups] == [z3.HYPER["weight_decay"], 0.0]
    first, again = z3.token_batches(512, 2, 16, 3), z3.token_batches(512, 2, 16, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], first[1])
    assert first[0].shape == (2, 16) and int(first[0].max()) < 512


@pytest.mark.slow
def test_both_sides_train_a_toy_model_on_cpu(tmp_path):
    """Where deepspeed is installed: the whole script on CPU (DeepSpeed's CPU accelerator), the same tokens."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    out = tmp_path / "z3.json"
    run = subprocess.run([sys.executable, str(ROOT / "perf" / "zero3_compare.py"), "--device", "cpu", "--model", "toy",
                          "--layers", "1", "--batch", "2", "--seq", "16", "--steps", "3", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    for side in ("deepspeed", "horizon"):
        assert len(result[side]["step_times_s"]) == 3
        assert all(abs(loss - math.log(512)) < 0.5 for loss in result[side]["losses"])   # random init: ln(vocab)
    assert result["ratio"] == pytest.approx(result["horizon"]["tokens_per_s"] / result["deepspeed"]["tokens_per_s"])
    assert "horizon / DeepSpeed ZeRO-3 offload = " in run.stdout
