"""The prepared GPU check (perf/gpu_check.py) on a machine without a GPU: it runs end to end, skips the GPU parts
with their reasons, runs the CPU AdamW part for real, writes its markdown and JSON, and isolates parts that fail,
hang or skip. The engine part's code runs on a toy model on CPU, its figures checked against independent counts."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "perf"))
import gpu_check  # noqa: E402


@pytest.fixture
def log(tmp_path):
    with open(tmp_path / "log", "w") as f:
        yield f


def test_runs_end_to_end_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "perf" / "gpu_check.py"), str(out), "--quick",
                          "--parts", "a,attention,cpu_adam,engine_8b_triton"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    env = report["environment"]
    assert env["device"] == "no CUDA GPU visible" and env["commit"] and env["date_utc"]
    assert env["versions"]["torch"] == torch.__version__ and {"triton", "python", "numpy"} <= set(env["versions"])
    assert env["code_is_this_checkout"] and env["code_from"]["horizon_triton.kernels"] == str(ROOT / "kernels")
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == ["engine_8b_triton", "attention", "kernel_tests", "library_and_canary_tests",
                           "engine_cuda_tests", "moe_kernel_tests", "cpu_adam"]  # the run's order, not the request's
    assert report["not_run_yet"] == []
    for name, part in parts.items():
        if name != "cpu_adam":
            assert part["status"] == "skipped" and part["reason"].startswith("no CUDA GPU visible: "), part
    assert "interpreter" in parts["kernel_tests"]["reason"]
    assert "--device cpu" in parts["engine_8b_triton"]["reason"]
    assert parts["engine_8b_triton"]["env"] == {"HORIZON_KERNELS": "triton"}

    adam = parts["cpu_adam"]
    assert adam["status"] == "ok", adam
    f = adam["figures"]
    assert f["params"] == 2 ** 21 and f["implementation"]
    assert f["params_per_s"] == pytest.approx(f["params"] / (f["best_ms"] / 1e3), rel=0.01)
    assert f["effective_GBps"] == pytest.approx(f["params"] * 28 / (f["best_ms"] / 1e3) / 1e9, rel=0.01)

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("## GPU check: no CUDA GPU visible, ")
    assert "| part | what | status | s | result |" in md
    assert md.count("| skipped |") == len(parts) - 1 and "| cpu_adam | " in md
    assert "### cpu_adam: ok" in md and "### attention" not in md   # skipped parts have only their table row
    table = run.stdout.split("\n\npart ")[-1].splitlines()             # the summary table ends the output
    assert table[0].split() == ["status", "s", "result"] and table[len(parts)].startswith("cpu_adam ")
    assert [line.split()[1] for line in table[1:len(parts) + 1] if line.startswith("cpu_adam ")] == ["ok"]
    assert (out / "gpu_check.log").exists()


def test_a_pytest_part_reports_counts_and_failures(tmp_path, log):
    sample = tmp_path / "test_sample.py"
    sample.write_text("import pytest\n\n@pytest.mark.parametrize('shape', [(3, 4)], ids=str)\n"   # an id with a space
                      "def test_ok(shape):\n    pass\n\ndef test_bad():\n    assert 1 == 2\n\n"
                      "def test_skip():\n    pytest.skip('no')\n")
    part = gpu_check.Part("sample", "a", "a sample", 60, (sys.executable, "-m", "pytest", str(sample)),
                          needs_gpu=False, pytest=True)
    record = gpu_check.run_part(part, gpu=False, remaining_s=100, log=log)
    assert record["status"] == "failed" and record["reason"] == "pytest exit status 1"
    assert record["figures"]["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert [t.split("::")[-1] for t in record["figures"]["failed_tests"]] == ["test_bad"]
    assert "assert 1 == 2" in record["error_tail"]


def _python_part(code: str, budget_s: int = 60) -> gpu_check.Part:
    # the driver appends --result FILE: sys.argv[2] is FILE inside ``python -c``
    return gpu_check.Part("child", "d", "a child", budget_s, (sys.executable, "-c", code), needs_gpu=False)


def test_failing_hanging_and_skipping_children_are_isolated(log):
    crashed = gpu_check.run_part(_python_part("raise SystemExit('boom: out of memory')"), False, 100, log)
    assert crashed["status"] == "failed" and crashed["reason"] == "exit status 1"
    assert "boom: out of memory" in crashed["error_tail"]

    hung = gpu_check.run_part(_python_part("import time; print('started', flush=True); time.sleep(60)", 1),
                              False, 100, log)
    assert hung["status"] == "failed" and hung["reason"] == "timed out after 1 s" and hung["seconds"] < 10
    assert "started" in hung["error_tail"]

    skipped = gpu_check.run_part(_python_part(
        "import json, sys; json.dump({'status': 'skipped', 'reason': 'no deepspeed'}, open(sys.argv[2], 'w'))"),
        False, 100, log)
    assert skipped["status"] == "skipped" and skipped["reason"] == "no deepspeed"

    late = gpu_check.run_part(_python_part("pass"), False, remaining_s=2, log=log)
    assert late["status"] == "skipped" and "budget is spent" in late["reason"]

    gpu_part = gpu_check.all_parts(quick=False)[0]
    assert gpu_check.run_part(gpu_part, gpu=False, remaining_s=100, log=log)["status"] == "skipped"


def test_part_selection_by_name_and_section():
    parts = gpu_check.all_parts(quick=False)
    assert [p.name for p in gpu_check.select(parts, "c,cpu_adam")] == ["host_to_device", "cpu_adam"]
    engines = gpu_check.select(parts, "e")
    assert {p.env["HORIZON_KERNELS"] for p in engines} == {"triton", "torch"} and len(engines) == 5
    # most valuable first: engine steps at real widths, then the kernels against the library, the tests last
    assert [p.section for p in parts] == ["e"] * 4 + ["b"] * 3 + ["c"] + ["a"] * 4 + ["b", "e", "d"]
    assert sum(p.budget_s for p in parts if not p.extra) == 400          # of an 8-minute window, with a margin
    assert all(p.extra for p in parts if p.name in ("library_and_canary_tests", "engine_cuda_tests", "cpu_adam",
                                                    "moe_kernel_tests", "moe_benchmark", "moe_merge"))
    with pytest.raises(SystemExit, match="unknown nope"):
        gpu_check.select(parts, "nope")


def _toy_part_on_cpu(tmp_path, part: str) -> dict:
    """The figures of gpu_parts.py's ``part`` run with --quick on CPU (the library path), after it said ok."""
    result_file = tmp_path / f"{part}.json"
    subprocess.run([sys.executable, str(ROOT / "perf" / "gpu_parts.py"), part, "--quick", "--device", "cpu",
                    "--result", str(result_file)], check=True, timeout=180,
                   env={**os.environ, "HORIZON_KERNELS": "torch"})
    result = json.loads(result_file.read_text())
    assert result["status"] == "ok", result
    return result["figures"]


def test_engine_part_on_a_toy_model_on_cpu(tmp_path):
    from transformers import AutoModelForCausalLM

    import horizon_triton as ht
    f = _toy_part_on_cpu(tmp_path, "engine_8b")
    assert f["kernels"] == "torch" and f["tokens_per_step"] == f["batch"] * f["seq"] == 64
    assert len(f["step_times_s"]) == f["measured_steps"] == 2 and f["step_s"] == f["step_times_s"][1]
    assert f["tokens_per_s"] == pytest.approx(64 / f["step_s"], rel=1e-3, abs=1)   # both rounded
    # 6PT against transformers' own parameter count of the same model, the embedding lookup left out
    cfg = ht.preset("llama-8b", hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=1, num_layers=2,
                    vocab_size=512)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg.to_hf_config("float32"))
    compute_params = sum(p.numel() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    assert f["parameters"] == sum(p.numel() for p in hf.parameters())
    assert f["tflops_6pt"] == pytest.approx(6 * compute_params * 64 / f["step_s"] / 1e12, rel=2e-3)
    assert f["tflops_model"] > f["tflops_6pt"]
    assert 0 < f["compute_busy"] <= 1 and 0 <= f["copy_hidden"] <= 1 and f["optimizer_s_per_step"] > 0
    assert all(abs(loss - math.log(512)) < 0.5 for loss in f["losses"])   # random init: about ln(vocab)


def test_moe_merge_part_on_a_toy_model_on_cpu(tmp_path):
    """Both ways of passing the micro-batches through the MoE layers train the same model (same losses)."""
    f = _toy_part_on_cpu(tmp_path, "moe_merge")
    one, merged = f["merged_1"], f[f"merged_{f['micro_batches']}"]
    assert f["micro_batches"] == 2 and len(one["losses"]) == len(merged["losses"]) == 2
    assert merged["losses"] == pytest.approx(one["losses"], rel=1e-3)
    assert f["merged_over_one_at_a_time"] == pytest.approx(merged["step_s"] / one["step_s"], rel=0.01)


def test_children_compile_kernels_and_get_only_their_own_backend(log, monkeypatch):
    monkeypatch.setenv("HORIZON_KERNELS", "torch")          # a user's setting
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code = ("import json, os, sys; json.dump({'status': 'ok', 'summary': '', 'figures': {k: os.environ.get(k) "
            "for k in ('HORIZON_KERNELS', 'TRITON_INTERPRET')}}, open(sys.argv[2], 'w'))")
    plain = gpu_check.run_part(_python_part(code), False, 100, log)
    assert plain["figures"] == {"HORIZON_KERNELS": None, "TRITON_INTERPRET": "0"}
    part = gpu_check.Part("child", "e", "a child", 60, (sys.executable, "-c", code), {"HORIZON_KERNELS": "triton"},
                          needs_gpu=False)
    assert gpu_check.run_part(part, False, 100, log)["figures"]["HORIZON_KERNELS"] == "triton"


def test_engine_parts_side_by_side_in_the_markdown():
    def engine_part(name, kernels, tokens_per_s):
        return dict(name=name, section="e", what=name, status="ok", seconds=30.0, summary="s",
                    figures=dict(kernels=kernels, tokens_per_s=tokens_per_s, tflops_model=400.0, step_s=1.5))
    report = dict(environment=dict(device="GPU", date_utc="d", commit="c", host="h", code_from={},
                                   code_is_this_checkout=True,
                                   versions=dict(python="3", torch="t", cuda="13", triton="3.6", numpy="2",
                                                 transformers="5")),
                  command="bash perf/gpu_check.sh out", wall_s=1.0, budget_s=470.0, quick=False,
                  parts=[engine_part("engine_8b_triton", "triton", 30000),
                         engine_part("engine_8b_torch", "torch", 20000),
                         dict(name="engine_70b_triton", section="e", what="w", status="failed", seconds=60.0,
                              reason="timed out after 60 s", error_tail="...")])
    md = gpu_check.markdown(report)
    table = md.split("Engine steps side by side:")[1]
    assert "| engine_8b_triton | triton | 30000 | 400 |  |  | 1.5 |" in table
    assert "| engine_8b_torch | torch | 20000 | 400 |" in table
    assert "engine_8b: triton / torch tokens/s = 1.50×" in table and "| engine_70b_triton |" not in table
    assert "| engine_70b_triton | w | failed | 60 | timed out after 60 s |" in md


def test_results_are_written_after_every_part(tmp_path, monkeypatch):
    """A run killed at any point keeps what it measured: when a part starts, the JSON already holds the parts
    before it and names the ones still to run; a pytest part is skipped with the reason where pytest is missing."""
    out = tmp_path / "out"
    first = _python_part("import json, sys; json.dump({'status': 'ok', 'summary': 'one', 'figures': {'x': 1}}, "
                         "open(sys.argv[2], 'w'))")
    # the second part reads the JSON the driver wrote before starting it and reports what it found (argv: the
    # JSON's path, then the driver's --result FILE)
    second = gpu_check.Part("second", "d", "reads the results so far", 60, (sys.executable, "-c", (
        "import json, sys; r = json.load(open(sys.argv[1])); json.dump({'status': 'ok', 'summary': 'two', "
        "'figures': {'parts_before': [p['name'] for p in r['parts']], 'not_run_yet': r['not_run_yet']}}, "
        "open(sys.argv[3], 'w'))"), str(out / "gpu_check.json")), needs_gpu=False)
    tests = gpu_check.Part("some_tests", "a", "a pytest part", 60, (sys.executable, "-m", "pytest", "x.py"),
                           needs_gpu=False, pytest=True)
    monkeypatch.setattr(gpu_check, "all_parts", lambda quick: [dataclasses.replace(first, name="first"), second,
                                                               tests])
    real_find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytest" else real_find_spec(name, *a))
    assert gpu_check.main([str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert parts["second"]["figures"] == {"parts_before": ["first"], "not_run_yet": ["second", "some_tests"]}
    assert parts["some_tests"]["status"] == "skipped" and "pytest is not installed" in parts["some_tests"]["reason"]
    assert report["not_run_yet"] == [] and "Not run yet" not in (out / "gpu_check.md").read_text()
