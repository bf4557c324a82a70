"""The one prepared GPU check: everything a first session on one H100/H200 must measure, in under 8 minutes.

    bash perf/gpu_check.sh OUT_DIR [--parts NAMES] [--quick] [--budget-s 440] [--list]

Parts, in the order they run (the letters are sections; ``--parts`` takes part names or letters, comma-separated):
    e  engine steps at Llama-3-8B and Llama-3-70B layer widths, real vocabulary, for our kernels
       (HORIZON_KERNELS=triton) and the library path (HORIZON_KERNELS=torch) side by side; in the time left, MoE
       steps with micro-batches through a layer one at a time and together
    b  each kernel against cuBLAS / torch SDPA at the engine's real shapes (perf/gpu_parts.py); in the time left,
       the MoE kernels against torch._grouped_mm (perf/test_moe_perf.py)
    c  host -> device bandwidth: the scheduler's stream_in against a plain pinned copy
    a  the compiled kernel tests (TRITON_INTERPRET=0 pytest: one bf16 reference check per family), then, in the
       time earlier parts left, the library/canary tests, tests/test_engine_cuda.py and the MoE kernels' tests
    d  (in the time left) the CPU AdamW (kernels/cpu_adam.py) on this machine's cores

Every part runs in a child process of its own under a time box (its budget, and never past the whole run's
budget), so a part that fails, hangs or runs out of memory is reported and the others still run. Parts that need
a GPU are skipped, with the reason, where none is visible; the pytest parts, where pytest is not installed.
OUT_DIR/gpu_check.json (every figure) and OUT_DIR/gpu_check.md (ready to append to perf/RESULTS.md) are rewritten
after every part, so a run killed at any point keeps what it measured; OUT_DIR/gpu_check.log has every child's
output. The run ends with a summary table on stdout. Exit status 1 when a part failed, else 0.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench import commit  # noqa: E402

TAIL_LINES = 30                  # lines of a failed child's output kept in the results
# one bf16 reference check per family, on shapes that exercise every mask (odd sizes, documents, a window): the
# whole "matches_reference" selection compiles 170 specializations (compile_counts.py), ~6 minutes cold
KERNEL_TESTS = ("tests/test_attention.py::test_matches_reference[hd128-docs-window-bf16]",
                "tests/test_cross_entropy.py::test_kernel_matches_reference[77-48-301-32-ignore0-bf16]",
                "tests/test_rmsnorm_matmul.py::test_kernel_matches_reference[37-100-130-dtype1]",
                "tests/test_rmsnorm.py::test_kernel_matches_reference[(37, 100)-dtype1]",
                "tests/test_swiglu.py::test_kernel_matches_reference[37-130-dtype1]",
                "tests/test_rope.py::test_kernel_matches_reference[forward-37-5-72-dtype1]")
CHILD_DEFAULTS = {"TRITON_INTERPRET": "0"}          # compiled kernels; HORIZON_KERNELS only where a part sets it
PYTEST_OUTCOME = re.compile(r"^(\S+?\.py)::(.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")  # ids may hold spaces


@dataclass(frozen=True)
class Part:
    name: str
    section: str                 # a-e, as in the module docstring
    what: str
    budget_s: int
    argv: tuple[str, ...]        # the child's command line
    env: dict = field(default_factory=dict)
    needs_gpu: bool = True
    pytest: bool = False
    without_gpu: str = ""        # why it cannot run without a GPU, and what covers it there
    extra: bool = False          # past the 400 s of boxes: runs in the time earlier parts left unused
    compiles: str = ""           # the kernel specializations it compiles, as counted (COMPILES_*)



# Kernel specializations a part compiles, counted on a CPU with perf/compile_counts.py (the same launches in
# Triton's interpreter, keyed as the JIT keys them); on a cold GPU machine each costs 1-3 s (far more where a
# kernel spills). A part's box is its start-up (python, torch and CUDA: ~10 s), those compiles at ~2 s and its work.
COMPILES_CANARY = ("20 at start-up (`compile_counts.py engine --canary-only`, hd128 bf16), about as many in the "
                   "first step")
COMPILES_KERNEL_TESTS = "21 (`compile_counts.py pytest <KERNEL_TESTS>`)"
# the MoE kernels (what the generic template runs for MoE experts): a whole block (routing, permutation, grouped
# GEMMs, SwiGLU / clamped SwiGLU, combine, all their backward) as gpt-oss and as DeepSeek-V3 route, in bf16
MOE_KERNEL_TESTS = ("tests/test_moe_experts.py::test_whole_block_matches_reference[gpt_oss-bfloat16]",
                    "tests/test_moe_experts.py::test_whole_block_matches_reference[deepseek-bfloat16]")
COMPILES_MOE_KERNEL_TESTS = "21 (`compile_counts.py pytest <MOE_KERNEL_TESTS>`)"


def all_parts(quick: bool) -> list[Part]:
    """The parts in the order they run, what a short window must not miss first: engine steps at real widths for
    both backends, each kernel against the library, the host link, the compiled kernel tests. Their boxes add up
    to 400 s of an 8-minute window (start-up and the install take the rest); the parts after those (``extra``)
    run in what earlier parts left unused. A box is start-up (python, torch, CUDA: ~10 s), the part's compiles
    (COMPILES_*, ~2 s each cold) and its own work."""
    py = sys.executable
    measure = lambda name: (py, str(HERE / "gpu_parts.py"), name) + (("--quick",) if quick else ())  # noqa: E731
    timed = "GPU kernel timings need one"
    parts = []
    for workload, what, budgets in (("8b", "Llama-3-8B width, 4 layers, 32K tokens/step", (85, 50)),
                                    ("70b", "Llama-3-70B layer width, 2 layers (tied), 16K tokens/step", (85, 50))):
        for kernels, budget in zip(("triton", "torch"), budgets):
            parts.append(Part(f"engine_{workload}_{kernels}", "e", f"engine: {what}, HORIZON_KERNELS={kernels}",
                              budget, measure(f"engine_{workload}"), {"HORIZON_KERNELS": kernels},
                              compiles=COMPILES_CANARY if kernels == "triton" else "none of ours",
                              without_gpu=f"real widths need one; `python perf/gpu_parts.py engine_{workload} --quick "
                                          "--device cpu --result FILE` runs this part's code on a toy model"))
    parts += [
        Part("attention", "b", "flash attention vs SDPA, hd128 4K/8K causal GQA, fwd+bwd", 25, measure("attention"),
             without_gpu=timed),
        Part("rmsnorm_matmul", "b", "rmsnorm+matmul vs cuBLAS on the pre-normalized input, H 4096/8192", 20,
             measure("rmsnorm_matmul"), without_gpu=timed),
        Part("cross_entropy", "b", "fused linear cross-entropy vs its GEMMs, H 4096/8192, V 128K/152K", 20,
             measure("cross_entropy"), without_gpu=timed),
        Part("host_to_device", "c", "stream_in vs a plain pinned copy (GB/s)", 10, measure("host_to_device"),
             without_gpu="a host -> device copy needs a device"),
        Part("kernel_tests", "a", "compiled kernel tests: one bf16 reference check per family (every mask)",
             55, (py, "-m", "pytest", *KERNEL_TESTS),
             pytest=True, compiles=COMPILES_KERNEL_TESTS,
             without_gpu="compiled kernels need one; without it `python -m pytest tests` runs these tests in "
                         "Triton's interpreter"),
        Part("library_and_canary_tests", "a", "the library path, the weight-gradient GEMM and the canary on CUDA",
             20, (py, "-m", "pytest", "tests/test_library.py", "tests/test_weight_gradient_gemm.py",
                  "tests/test_kernel_dispatch.py", "-k", "cuda or canary or library"), pytest=True, extra=True,
             without_gpu="their CUDA cases need one; their CPU twins run in the suite"),
        Part("engine_cuda_tests", "a", "tests/test_engine_cuda.py: the engine on CUDA vs the CPU path", 40,
             (py, "-m", "pytest", "tests/test_engine_cuda.py"), pytest=True, extra=True,
             without_gpu="the CUDA device needs one; tests/test_scheduler.py races the same scheduler on CPU"),
        Part("moe_kernel_tests", "a", "compiled MoE kernel tests: a whole MoE block as gpt-oss and DeepSeek-V3, bf16",
             55, (py, "-m", "pytest", *MOE_KERNEL_TESTS), pytest=True, extra=True,
             compiles=COMPILES_MOE_KERNEL_TESTS,
             without_gpu="compiled kernels need one; without it `python -m pytest tests/test_moe_experts.py` runs "
                         "these tests in Triton's interpreter"),
        Part("moe_benchmark", "b", "MoE grouped GEMMs and a whole expert layer vs torch._grouped_mm, gpt-oss-120b "
             "and Qwen3-235B expert shapes, 8K tokens", 90,
             (py, "-m", "pytest", "perf/test_moe_perf.py", "--benchmark-only", "-s"), pytest=True, extra=True,
             compiles="the MoE kernels at two shapes (about as many as moe_kernel_tests)", without_gpu=timed),
        Part("moe_merge", "e", "MoE steps (qwen3_moe, H 2048, 128 experts top-4, 4 × 2048 tokens): micro-batches "
             "through a layer one at a time vs together (moe_merge_microbatches)", 90, measure("moe_merge"),
             {"HORIZON_KERNELS": "triton"}, extra=True, compiles="not counted: the canary's and the MoE kernels' (about as many as moe_kernel_tests)",
             without_gpu="`python perf/gpu_parts.py moe_merge --quick --device cpu --result FILE` runs this part's "
                         "code on a toy model"),
        Part("cpu_adam", "d", "CPU AdamW (adamw_step_) on this machine's cores", 20, measure("cpu_adam"),
             needs_gpu=False, extra=True),
    ]
    return parts


def select(parts: list[Part], spec: str | None) -> list[Part]:
    if not spec:
        return parts
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    known = {p.name for p in parts} | {p.section for p in parts}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)}; parts: {', '.join(p.name for p in parts)} "
                         "(or a section letter a-e)")
    return [p for p in parts if p.name in wanted or p.section in wanted]


# ---- running children ------------------------------------------------------------------------------------------
def run_child(argv, env: dict, timeout_s: float, log) -> tuple[int | None, float, str]:
    """Runs argv in the repository root in a process group of its own, its output appended to ``log`` (an open
    file). -> (exit status, or None when it was killed at timeout_s; seconds; its output)."""
    start = time.perf_counter()
    base = {k: v for k, v in os.environ.items() if k not in ("HORIZON_KERNELS", *CHILD_DEFAULTS)}
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(list(argv), cwd=ROOT, env={**base, **CHILD_DEFAULTS, **env}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)       # the child and whatever it started
            proc.wait()
            rc = None
        out.seek(0)
        text = out.read()
    log.write(text)
    log.flush()
    return rc, time.perf_counter() - start, text


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def pytest_outcomes(text: str) -> dict:
    """Counts of pytest -v outcome lines, and the names of the tests that failed or errored."""
    counts, failed = {}, []
    for line in text.splitlines():
        m = PYTEST_OUTCOME.match(line.strip())
        if m:
            outcome = m.group(3).lower()
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome in ("failed", "error"):
                failed.append(f"{m.group(1)}::{m.group(2)}")
    return dict(counts=counts, failed_tests=failed)


def run_part(part: Part, gpu: bool, remaining_s: float, log, min_s: float = 5.0) -> dict:
    """Runs one part and returns its record: status ok / failed (with the error tail) / skipped (with the reason)."""
    record = dict(name=part.name, section=part.section, what=part.what, budget_s=part.budget_s,
                  env=part.env, **({"compiles": part.compiles} if part.compiles else {}))
    if part.needs_gpu and not gpu:
        return dict(record, status="skipped", seconds=0.0, reason=f"no CUDA GPU visible: {part.without_gpu}")
    if part.pytest and importlib.util.find_spec("pytest") is None:
        return dict(record, status="skipped", seconds=0.0,
                    reason=f"pytest is not installed for {sys.executable} (`{sys.executable} -m pip install pytest` "
                           "adds it); the other parts ran")
    if remaining_s < min_s:
        return dict(record, status="skipped", seconds=0.0,
                    reason=f"the whole run's budget is spent ({remaining_s:.0f} s left)")
    timeout = min(part.budget_s, remaining_s)
    log.write(f"\n===== {part.name}: {' '.join(part.argv)} {part.env} (time box {timeout:.0f} s)\n")
    log.flush()
    if part.pytest:
        rc, seconds, text = run_child(part.argv + ("-v", "-rfE", "--tb=short", "-p", "no:cacheprovider"),
                                      part.env, timeout, log)
        outcomes = pytest_outcomes(text)
        counts = outcomes["counts"]
        record.update(seconds=round(seconds, 1), figures=outcomes,
                      summary=", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran")
        if rc == 0:
            return dict(record, status="ok")
        reason = (f"timed out after {timeout:.0f} s" if rc is None else
                  "no test selected" if rc == 5 else f"pytest exit status {rc}")
        return dict(record, status="failed", reason=reason, error_tail=_tail(text))
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        rc, seconds, text = run_child(part.argv + ("--result", str(result_file)), part.env, timeout, log)
        result = json.loads(result_file.read_text()) if rc == 0 and result_file.exists() else None
    record["seconds"] = round(seconds, 1)
    if result is None:
        reason = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
        return dict(record, status="failed", reason=reason, error_tail=_tail(text))
    return dict(record, **result)


# ---- the report ------------------------------------------------------------------------------------------------
def environment(gpu: bool) -> dict:
    import numpy
    import torch
    versions = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                    numpy=numpy.__version__)
    for name in ("triton", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)     # without importing it
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    device = "no CUDA GPU visible"
    if gpu:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    import horizon_triton
    from horizon_triton.kernels import reference     # a kernel module: the package's own __init__ is elsewhere
    code = {"horizon_triton": str(Path(horizon_triton.__file__).resolve().parent),
            "horizon_triton.kernels": str(Path(reference.__file__).resolve().parent)}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(device=device, versions=versions, commit=commit(), date_utc=now.strftime("%Y-%m-%d %H:%M"),
                triton_cache=triton_cache(), code_from=code, code_is_this_checkout=all(Path(c).is_relative_to(ROOT) for c in code.values()),
                host=f"{os.cpu_count()} CPUs, {ram:.0f} GiB RAM, {platform.machine()}")


def triton_cache() -> dict:
    """Triton's cache folder and the compiled kernels in it (a folder holding a cubin each): counted at the start
    and after each part, the difference is what this machine compiled itself (a pre-warmed cache's misses)."""
    folder = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return dict(dir=str(folder), kernels=len({p.parent for p in folder.glob("*/*.cubin")}))


def _cell(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(report: dict) -> str:
    env = report["environment"]
    v = env["versions"]
    lines = [f"## GPU check: {env['device']}, {env['date_utc']} UTC, commit {env['commit']}", "",
             f"- Machine: {env['device']}; {env['host']}. Python {v['python']}, torch {v['torch']} (CUDA {v['cuda']}), "
             f"triton {v['triton']}, numpy {v['numpy']}, transformers {v['transformers']}.",
             f"- Command: `{report['command']}`; {report['wall_s']:.0f} s wall of a {report['budget_s']:.0f} s budget"
             f"{' (quick shapes: a smoke test, not figures)' if report['quick'] else ''}.",
             *([f"- Triton cache {env['triton_cache']['dir']}: {env['triton_cache']['kernels']} compiled kernels at "
                f"the start, {report['triton_cache_kernels']} now (the difference was compiled on this machine)."]
               if "triton_cache" in env else []),
             *([] if env["code_is_this_checkout"] else
               [f"- WARNING: the code measured is not this checkout's: {env['code_from']}."]), "",
             "| part | what | status | s | result |", "|---|---|---|---|---|"]
    for p in report["parts"]:
        result = p.get("summary") if p["status"] == "ok" else p.get("reason", "")
        if p["status"] == "failed" and p.get("summary"):
            result = f"{p['reason']}; {p['summary']}"
        lines.append(f"| {p['name']} | {_cell(p['what'])} | {p['status']} | {p['seconds']:.0f} | {_cell(result)} |")
    if report.get("not_run_yet"):
        lines += ["", f"Not run yet (the run is still going, or was stopped): {', '.join(report['not_run_yet'])}."]
    lines += engine_table(report["parts"])
    for p in report["parts"]:
        if p["status"] == "skipped":
            continue
        box = f" of a {p['budget_s']} s box" if p.get("budget_s") else ""
        lines += ["", f"### {p['name']}: {p['status']} ({p['seconds']:.0f} s{box})", ""]
        if p.get("compiles"):
            lines.append(f"- kernel specializations it compiles (counted on a CPU): {p['compiles']}")
        figures = p.get("figures", {})
        lines += [f"- {k}: {_cell(val)}" for k, val in figures.items() if k != "counts" or not p.get("summary")]
        rows = p.get("rows") or []
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in rows]
        if p.get("error_tail"):
            lines += ["", "```", p["error_tail"], "```"]
    return "\n".join(lines) + "\n"


ENGINE_COLUMNS = ("kernels", "tokens_per_s", "tflops_model", "tflops_6pt", "mfu", "step_s", "compute_busy",
                  "compute_s_per_step", "hidden_copy_s_per_step", "optimizer_s_per_step", "device_allocator_peak_GiB")


def engine_table(parts: list[dict]) -> list[str]:
    """Markdown lines: the engine parts that ran, side by side, and our kernels' speed-up over the library path."""
    ran = [p for p in parts if p["section"] == "e" and p["status"] == "ok" and "tokens_per_s" in p["figures"]]
    if not ran:
        return []
    lines = ["", "Engine steps side by side:", "", "| part | " + " | ".join(ENGINE_COLUMNS) + " |",
             "|" + "---|" * (len(ENGINE_COLUMNS) + 1)]
    for p in ran:
        lines.append(f"| {p['name']} | " + " | ".join(_cell(p["figures"].get(c, "")) for c in ENGINE_COLUMNS) + " |")
    speed = {p["name"]: p["figures"]["tokens_per_s"] for p in ran}
    for name in speed:
        if name.endswith("_triton") and name.replace("_triton", "_torch") in speed:
            lines.append(f"\n{name.removesuffix('_triton')}: triton / torch tokens/s = "
                         f"{speed[name] / speed[name.replace('_triton', '_torch')]:.2f}×")
    return lines


def summary_table(report: dict) -> str:
    rows = [(p["name"], p["status"], f"{p['seconds']:.0f}",
             (p.get("summary") if p["status"] == "ok" else p.get("reason", "")) or "") for p in report["parts"]]
    widths = [max(len(r[i]) for r in rows + [("part", "status", "s", "")]) for i in range(3)]
    out = [f"{'part':<{widths[0]}}  {'status':<{widths[1]}}  {'s':>{widths[2]}}  result"]
    out += [f"{n:<{widths[0]}}  {s:<{widths[1]}}  {t:>{widths[2]}}  {r}" for n, s, t, r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="where gpu_check.md, gpu_check.json and gpu_check.log go")
    parser.add_argument("--parts", help="comma-separated part names or section letters (default: all)")
    parser.add_argument("--quick", action="store_true", help="small shapes everywhere (a smoke test)")
    parser.add_argument("--budget-s", type=float, default=440.0, help="the whole run's time budget (seconds)")
    parser.add_argument("--list", action="store_true", help="list the parts and their time boxes, run nothing")
    args = parser.parse_args(argv)
    parts = select(all_parts(args.quick), args.parts)
    if args.list:
        for p in parts:
            print(f"{p.section}  {p.name:<26} {p.budget_s:>4} s  {p.what}"
                  + (f" [compiles: {p.compiles}]" if p.compiles else ""))
        print(f"sum of time boxes: {sum(p.budget_s for p in parts if not p.extra)} s, then the extras in what is "
              f"left of it (the run stops at --budget-s {args.budget_s:.0f})")
        return 0
    if not args.out_dir:
        parser.error("OUT_DIR is required (unless --list)")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    gpu = torch.cuda.is_available()
    start = time.perf_counter()
    report = dict(environment=environment(gpu), command=" ".join(["bash perf/gpu_check.sh"] + (argv or sys.argv[1:])),
                  quick=args.quick, budget_s=args.budget_s, parts=[])
    if not gpu:
        print("gpu_check: no CUDA GPU visible; the parts that need one are skipped, the others run", flush=True)
    if not report["environment"]["code_is_this_checkout"]:
        print(f"gpu_check: WARNING: horizon_triton is imported from {report['environment']['code_from']}, not from "
              f"{ROOT}; `pip install --no-deps --no-build-isolation -e .` here measures this checkout", flush=True)
    # main parts get their boxes; the extras only what the main parts left unused of theirs
    main_total = sum(p.budget_s for p in parts if not p.extra) or sum(p.budget_s for p in parts)
    write_results(out, report, start, pending=parts)
    with open(out / "gpu_check.log", "w") as log:
        for i, part in enumerate(parts):
            elapsed = time.perf_counter() - start
            remaining = args.budget_s - elapsed
            if part.extra:
                remaining = min(remaining, main_total - elapsed)
            record = run_part(part, gpu, remaining, log)
            report["parts"].append(record)
            write_results(out, report, start, pending=parts[i + 1:])    # a killed run keeps what it measured
            print(f"[{time.perf_counter() - start:5.0f} s] {part.name}: {record['status']}"
                  f"{' - ' + record['reason'] if record.get('reason') else ''}", flush=True)
    print("\n" + summary_table(report))
    print(f"\nwrote {out / 'gpu_check.md'}, {out / 'gpu_check.json'}, {out / 'gpu_check.log'}")
    return 1 if any(p["status"] == "failed" for p in report["parts"]) else 0


def write_results(out: Path, report: dict, start: float, pending: list[Part]) -> None:
    """gpu_check.json and gpu_check.md as they stand, the parts not run yet listed: rewritten after every part,
    each file replaced whole (a reader never sees half of one)."""
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["triton_cache_kernels"] = triton_cache()["kernels"]
    report["not_run_yet"] = [p.name for p in pending]
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str, ensure_ascii=False)),
                       ("gpu_check.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


if __name__ == "__main__":
    sys.exit(main())
