"""kernels/cpu_adam.py against torch.optim.AdamW.

Tolerances come from torch's own error (STYLE.md's rule, tests/kernel_checks.py): both the kernel and
torch.optim.AdamW in fp32 are compared with torch.optim.AdamW in fp64, and the kernel may be at most twice as
far off as torch plus one fp32 ulp of the values (for tensors where torch happens to be exact). The bf16 output
must be bit-identical to ``master.to(torch.bfloat16)``. Both implementations are tested: the C++ one (built
once per session, on first use) and the torch one, which is also the fallback.
"""
import re
import threading
import time
import warnings

import pytest
import torch
from kernel_checks import assert_within_reference_error

from horizon_triton.kernels import cpu_adam
from horizon_triton.kernels.cpu_adam import adamw_step_, adamw_step_torch_

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
STEPS = 5


@pytest.fixture(params=["cpp", "torch"])
def step_fn(request):
    """The implementation under test: adamw_step_ on the C++ path, or the torch path directly."""
    if request.param == "torch":
        return adamw_step_torch_
    if cpu_adam.implementation().split()[0] != "cpp":
        pytest.skip(f"C++ path unavailable: {cpu_adam.implementation()}")
    return adamw_step_


def _torch_adamw(master0, grads, grad_scale, weight_decay, dtype):
    """torch.optim.AdamW (default single-tensor path) in `dtype` over the given gradients -> (p, m, v)."""
    p = torch.nn.Parameter(master0.to(dtype, copy=True))   # a copy: master0 must stay as it was
    opt = torch.optim.AdamW([p], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=weight_decay)
    for g in grads:
        p.grad = g.to(torch.float32).to(dtype) * grad_scale
        opt.step()
    state = opt.state[p]
    return p.detach(), state["exp_avg"], state["exp_avg_sq"]


@pytest.mark.parametrize("n", [1, 7, 1000003])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay, grad_scale", [(0.0, 1.0), (0.1, 0.37)])
def test_matches_torch_adamw(step_fn, n, grad_dtype, weight_decay, grad_scale):
    master0 = torch.randn(n) * 0.02      # weights at init scale: the updates are not lost below their ulp
    # gradients of mixed magnitudes, so that eps and the bias corrections both matter
    grads = [(torch.randn(n) * torch.logspace(-6, 1, n)[torch.randperm(n)]).to(grad_dtype) for _ in range(STEPS)]
    master, exp_avg, exp_avg_sq = master0.clone(), torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    for step, g in enumerate(grads, start=1):
        step_fn(master, g, exp_avg, exp_avg_sq, out, step=step, **HYPER, weight_decay=weight_decay,
                grad_scale=grad_scale)
        assert torch.equal(out.view(torch.int16), master.to(torch.bfloat16).view(torch.int16))

    ref32 = _torch_adamw(master0, grads, grad_scale, weight_decay, torch.float32)
    ref64 = _torch_adamw(master0, grads, grad_scale, weight_decay, torch.float64)
    for name, ours, theirs, exact in zip(("master", "exp_avg", "exp_avg_sq"), (master, exp_avg, exp_avg_sq),
                                         ref32, ref64):
        ulp = torch.finfo(torch.float32).eps * exact.abs().max().item()
        assert_within_reference_error(ours, theirs, exact, atol=ulp, name=name)


def test_bf16_output_rounds_to_nearest_even(step_fn):
    """With lr = 0 the master stays as it is, so the output is the rounding of chosen bit patterns: ties to even
    and to odd, subnormals, ±0, ±inf, the largest finite floats (which round to inf) and random patterns."""
    special = torch.tensor([0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0x0000_8000, 0x0001_8000, 0x0000_0001,
                            0x8000_0000, 0x0000_0000, 0x7F80_0000, -0x0080_0000, 0x7F7F_FFFF, 0x7F7F_8000,
                            0x7F7E_8000], dtype=torch.int64).to(torch.int32)
    randoms = torch.randint(-2**31, 2**31, (100_000,), dtype=torch.int64).to(torch.int32)
    master = torch.cat([special, randoms]).view(torch.float32)
    master = master[~master.isnan()].clone()
    n = master.numel()
    expected = master.to(torch.bfloat16)
    out = torch.empty(n, dtype=torch.bfloat16)
    step_fn(master, torch.zeros(n), torch.zeros(n), torch.zeros(n), out, step=1, lr=0.0, beta1=0.9, beta2=0.999,
            eps=1e-8, weight_decay=0.0)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_views_into_a_larger_buffer(step_fn):
    """1-D views at odd offsets into flat buffers: the same result as on standalone tensors, and nothing outside
    the view is touched."""
    n, offset, total = 10_007, 13, 30_001
    buffers = [torch.randn(total), torch.randn(total).bfloat16(), torch.randn(total), torch.rand(total),
               torch.randn(total).bfloat16()]
    before = [b.clone() for b in buffers]
    views = [b[offset:offset + n] for b in buffers]
    standalone = [v.clone() for v in views]
    kwargs = dict(step=3, **HYPER, weight_decay=0.1, grad_scale=0.5)
    step_fn(*views, **kwargs)
    step_fn(*standalone, **kwargs)
    for buf, old, view, alone in zip(buffers, before, views, standalone):
        assert torch.equal(view, alone)
        assert torch.equal(buf[:offset], old[:offset]) and torch.equal(buf[offset + n:], old[offset + n:])


def test_no_bf16_output(step_fn):
    n = 1000
    master, grad = torch.randn(n), torch.randn(n)
    with_out = [master.clone(), grad, torch.zeros(n), torch.zeros(n)]
    without = [master.clone(), grad, torch.zeros(n), torch.zeros(n)]
    step_fn(*with_out, torch.empty(n, dtype=torch.bfloat16), step=1, **HYPER, weight_decay=0.01)
    step_fn(*without, None, step=1, **HYPER, weight_decay=0.01)
    for a, b in zip(with_out, without):
        assert torch.equal(a, b)


def _good_args(n=64):
    return dict(master=torch.randn(n), grad=torch.randn(n).bfloat16(), exp_avg=torch.zeros(n),
                exp_avg_sq=torch.zeros(n), out_bf16=torch.zeros(n, dtype=torch.bfloat16))


BAD_INPUTS = [
    ("grad", lambda a: a["grad"][:-1], "grad has 63 elements but master has 64"),
    ("exp_avg", lambda a: a["exp_avg"][1:], "exp_avg has 63 elements"),
    ("exp_avg_sq", lambda a: torch.zeros(65), "exp_avg_sq has 65 elements"),
    ("out_bf16", lambda a: torch.empty(63, dtype=torch.bfloat16), "out_bf16 has 63 elements"),
    ("out_bf16", lambda a: torch.empty(64), "out_bf16 has dtype torch.float32"),
    ("grad", lambda a: torch.randn(64).half(), "grad has dtype torch.float16"),
    ("master", lambda a: torch.randn(64).bfloat16(), "master has dtype torch.bfloat16"),
    ("exp_avg_sq", lambda a: torch.zeros(64, dtype=torch.float64), "exp_avg_sq has dtype torch.float64"),
    ("exp_avg", lambda a: torch.zeros(128)[::2], "exp_avg is not contiguous"),
    ("master", lambda a: torch.randn(8, 8), "master has shape (8, 8)"),
    ("grad", lambda a: a["grad"].float().numpy(), "grad must be a torch.Tensor"),
]


@pytest.mark.parametrize("name, make_bad, message", BAD_INPUTS)
def test_bad_input_raises_before_writing(step_fn, name, make_bad, message):
    args = _good_args()
    args[name] = make_bad(args)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=re.escape(message)):
        step_fn(*args.values(), step=1, **HYPER, weight_decay=0.0)
    for k, v in snapshot.items():
        torch.testing.assert_close(args[k], v, rtol=0, atol=0, equal_nan=True, msg=f"{k} was written before the error")


@pytest.mark.parametrize("step", [0, -1, 1.0, True])
def test_bad_step_raises(step_fn, step):
    with pytest.raises(ValueError, match="step must be an int ≥ 1"):
        step_fn(*_good_args().values(), step=step, **HYPER, weight_decay=0.0)


def test_thread_count_does_not_change_the_result():
    if cpu_adam.implementation().split()[0] != "cpp":
        pytest.skip(f"C++ path unavailable: {cpu_adam.implementation()}")
    n = 100_003
    args = _good_args(n)
    results = []
    try:
        for threads in (1, 3):
            cpu_adam.set_num_threads(threads)
            assert f"{threads} threads" in cpu_adam.implementation()
            copy = {k: v.clone() for k, v in args.items()}
            adamw_step_(*copy.values(), step=2, **HYPER, weight_decay=0.1)
            results.append(copy)
    finally:
        cpu_adam.set_num_threads(None)
    for k in args:
        assert torch.equal(results[0][k], results[1][k])
    with pytest.raises(ValueError, match="num_threads"):
        cpu_adam.set_num_threads(0)


def test_releases_the_gil():
    """While one thread runs adamw_step_ on a large buffer, another Python thread keeps running: we count its
    loop iterations inside the middle 80% of the call."""
    if cpu_adam.implementation().split()[0] != "cpp":
        pytest.skip(f"C++ path unavailable: {cpu_adam.implementation()}")
    n = 32 * 2**20
    args = [torch.ones(n), torch.ones(n, dtype=torch.bfloat16), torch.zeros(n), torch.zeros(n),
            torch.empty(n, dtype=torch.bfloat16)]
    call = {}

    def worker():
        call["start"] = time.perf_counter()
        adamw_step_(*args, step=1, **HYPER, weight_decay=0.0)
        call["end"] = time.perf_counter()

    cpu_adam.set_num_threads(1)    # leave the second core to this thread, so only the GIL can stop it
    try:
        thread = threading.Thread(target=worker)
        ticks = []
        thread.start()
        while thread.is_alive():
            ticks.append(time.perf_counter())
        thread.join()
    finally:
        cpu_adam.set_num_threads(None)
    margin = 0.1 * (call["end"] - call["start"])
    inside = sum(call["start"] + margin < t < call["end"] - margin for t in ticks)
    assert inside > 100, f"only {inside} iterations of the other thread during a {call['end'] - call['start']:.3f} s call"


# ----------------------------------------------------------------------------------------------------------
# Choosing the implementation. Each test starts from "nothing chosen yet"; monkeypatch restores the choice.
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def unchosen(monkeypatch):
    monkeypatch.setattr(cpu_adam, "_chosen", None)
    monkeypatch.setattr(cpu_adam, "_cpp_fn", None)
    return monkeypatch


def _failing_build():
    raise RuntimeError("Error building extension 'horizon_cpu_adam': g++ not found")


def _run_small_step():
    args = _good_args(1000)
    expected = {k: v.clone() for k, v in args.items()}
    adamw_step_(*args.values(), step=1, **HYPER, weight_decay=0.1)
    adamw_step_torch_(*expected.values(), step=1, **HYPER, weight_decay=0.1)
    for k in args:
        assert torch.equal(args[k], expected[k])


def test_env_var_forces_the_torch_path(unchosen, recwarn):
    unchosen.setenv("HORIZON_CPU_ADAM", "torch")
    unchosen.setattr(cpu_adam, "_load_cpp", _failing_build)    # must not even be tried
    _run_small_step()
    assert cpu_adam.implementation() == "torch (HORIZON_CPU_ADAM=torch)"
    assert not recwarn.list


def test_failed_build_falls_back_with_one_warning(unchosen):
    unchosen.delenv("HORIZON_CPU_ADAM", raising=False)
    unchosen.setattr(cpu_adam, "_load_cpp", _failing_build)
    with pytest.warns(RuntimeWarning, match="did not build, using the slower torch path"):
        _run_small_step()
    assert cpu_adam.implementation().startswith("torch (C++ build failed: RuntimeError")
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the second call must not warn again
        _run_small_step()


def test_compiler_error_falls_back(unchosen, tmp_path):
    """The real build path with a compiler that fails (`false`): a warning naming it, no partial library left."""
    unchosen.delenv("HORIZON_CPU_ADAM", raising=False)
    unchosen.setenv("XDG_CACHE_HOME", str(tmp_path))
    unchosen.setenv("CXX", "false")
    with pytest.warns(RuntimeWarning, match="false failed on cpu_adam.cpp"):
        _run_small_step()
    assert not list(tmp_path.rglob("cpu_adam-*"))


def test_failed_build_is_an_error_when_cpp_is_required(unchosen):
    unchosen.setenv("HORIZON_CPU_ADAM", "cpp")
    unchosen.setattr(cpu_adam, "_load_cpp", _failing_build)
    with pytest.raises(RuntimeError, match="HORIZON_CPU_ADAM=cpp but"):
        cpu_adam.implementation()


def test_unknown_env_value(unchosen):
    unchosen.setenv("HORIZON_CPU_ADAM", "cuda")
    with pytest.raises(ValueError, match="HORIZON_CPU_ADAM='cuda'"):
        cpu_adam.implementation()

