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
from horizon_triton.kernels.host_formats import QBLOCK, dequantize, join_master, num_blocks, split_master

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



# ----------------------------------------------------------------------------------------------------------
# The split-master and 8-bit layouts (kernels/host_formats.py)
# ----------------------------------------------------------------------------------------------------------
LAYOUT_FNS = {"cpp": (cpu_adam.adamw_step_, cpu_adam.adamw_step_split_, cpu_adam.adamw_step_split_8bit_),
              "torch": (adamw_step_torch_, cpu_adam.adamw_step_split_torch_, cpu_adam.adamw_step_split_8bit_torch_)}


@pytest.fixture(params=["cpp", "torch"])
def layout_fns(request):
    """(fp32 layout, split layout, split + 8-bit layout) of one implementation."""
    if request.param == "cpp" and cpu_adam.implementation().split()[0] != "cpp":
        pytest.skip(f"C++ path unavailable: {cpu_adam.implementation()}")
    return LAYOUT_FNS[request.param]


def _halves(values):
    hi, lo = torch.empty(values.numel(), dtype=torch.bfloat16), torch.empty(values.numel(), dtype=torch.int16)
    split_master(values, hi, lo)
    return hi, lo


def _moments_8bit(n):
    blocks = num_blocks(n)
    return [torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(blocks)]


def _mixed_grads(n, dtype, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * torch.logspace(-6, 1, n)[torch.randperm(n, generator=g)]).to(dtype)
            for _ in range(steps)]


@pytest.mark.parametrize("n", [1, 7, 100_003])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay, grad_scale", [(0.0, 1.0), (0.1, 0.37)])
def test_split_master_equals_fp32_master_bit_for_bit(layout_fns, n, grad_dtype, weight_decay, grad_scale):
    """The split layout is the fp32 layout stored differently: the master joined from its halves, and the
    moments, equal the fp32 layout's bit for bit after every step (so it inherits test_matches_torch_adamw), and
    the working weights are that master rounded to nearest."""
    step_fp32, step_split, _ = layout_fns
    master = torch.randn(n) * 0.02
    hi, lo = _halves(master)
    m32, v32, m, v = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for step, g in enumerate(_mixed_grads(n, grad_dtype), start=1):
        kwargs = dict(step=step, **HYPER, weight_decay=weight_decay, grad_scale=grad_scale)
        step_fp32(master, g, m32, v32, None, **kwargs)
        step_split(hi, lo, g, m, v, **kwargs)
        assert torch.equal(join_master(hi, lo).view(torch.int32), master.view(torch.int32))
        assert torch.equal(m, m32) and torch.equal(v, v32)
    expected_hi, _ = _halves(master)
    assert torch.equal(hi.view(torch.int16), expected_hi.view(torch.int16))


def test_split_master_keeps_updates_below_half_a_bf16_ulp(layout_fns):
    """Weights ~1 and lr 1e-4: each update is 1/40 of a bf16 ulp. A bf16 master (torch.optim.AdamW on bf16)
    never moves; the split master moves as torch.optim.AdamW's fp32 master does, and the working weights follow."""
    _, step_split, _ = layout_fns
    n = 4096
    master0 = 1 + 0.1 * torch.rand(n)
    hi, lo = _halves(master0)
    m, v = torch.zeros(n), torch.zeros(n)
    params = {dtype: torch.nn.Parameter(master0.to(dtype, copy=True)) for dtype in (torch.float32, torch.bfloat16)}
    optimizers = {dtype: torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
                  for dtype, p in params.items()}
    grad = torch.ones(n, dtype=torch.bfloat16)            # a constant push: Adam moves each weight by lr a step
    for step in range(1, 201):
        step_split(hi, lo, grad, m, v, step=step, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        for dtype, p in params.items():
            p.grad = grad.to(dtype)
            optimizers[dtype].step()
    fp32 = params[torch.float32].detach()
    # fp32 rounding of 200 additions of 1e-4 to values near 1 (a few ulps of 1.2e-7), nothing more
    torch.testing.assert_close(join_master(hi, lo), fp32, rtol=0, atol=2e-6)
    assert (master0 - fp32).min() > 0.0199
    assert torch.equal(params[torch.bfloat16].detach(), master0.bfloat16())   # the bf16 master lost every update
    assert (hi.float() < master0.bfloat16().float()).float().mean() > 0.9    # the working weights moved


@pytest.mark.parametrize("n", [1, 255, 257, 100_003])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_cpp_equals_torch_reference_bit_for_bit(n, grad_dtype):
    """Every layout's C++ loop against its torch reference over several steps: the same bits in every buffer
    (the references round each operation as the C++ loop does; see the cpu_adam docstring)."""
    if cpu_adam.implementation().split()[0] != "cpp":
        pytest.skip(f"C++ path unavailable: {cpu_adam.implementation()}")
    master0, grads = torch.randn(n), _mixed_grads(n, grad_dtype)
    results = {}
    for impl, (step_fp32, step_split, step_8bit) in LAYOUT_FNS.items():
        fp32 = [master0.clone(), torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)]
        split = [*_halves(master0), torch.zeros(n), torch.zeros(n)]
        eight = [*_halves(master0), *_moments_8bit(n)]
        for step, g in enumerate(grads, start=1):
            kwargs = dict(step=step, **HYPER, weight_decay=0.1, grad_scale=0.5)
            step_fp32(fp32[0], g, fp32[1], fp32[2], fp32[3], **kwargs)
            step_split(split[0], split[1], g, *split[2:], **kwargs)
            step_8bit(eight[0], eight[1], g, *eight[2:], **kwargs, seed=3)
        results[impl] = fp32 + split + eight
    for ours, reference in zip(results["cpp"], results["torch"]):
        assert torch.equal(ours.view(torch.uint8), reference.view(torch.uint8))


def test_8bit_moments_stay_close_to_fp32_moments(layout_fns):
    """Same gradients (magnitudes within 3x, so every code is in range), 8-bit against fp32 moments over 30
    steps: each stochastic re-encoding is off by less than one code step (6-12%) and unbiased, so the decoded
    moments wander (mean relative error a few percent) around the fp32 ones without drifting away (mean bias
    within 4%), and the weights drift from the fp32-moment ones by a few percent of the distance they moved."""
    _, step_split, step_8bit = layout_fns
    n, steps = 64 * 1024, 30
    master0 = torch.randn(n) * 0.02
    split, eight = [*_halves(master0), torch.zeros(n), torch.zeros(n)], [*_halves(master0), *_moments_8bit(n)]
    g = torch.Generator().manual_seed(3)
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=g).sign() * (0.5 + torch.rand(n, generator=g))).bfloat16()
        kwargs = dict(step=step, **HYPER, weight_decay=0.1)
        step_split(split[0], split[1], grad, *split[2:], **kwargs)
        step_8bit(eight[0], eight[1], grad, *eight[2:], **kwargs)
    m8 = dequantize(eight[2], eight[3], signed=True)
    v8 = dequantize(eight[4], eight[5], signed=False)
    m32, v32 = split[2], split[3]
    assert (m8 - m32).abs().mean() < 0.08 * m32.abs().mean()
    assert ((v8 - v32).abs() / v32).mean() < 0.12
    assert ((v8 - v32) / v32).mean().abs() < 0.04
    moved = (join_master(*split[:2]) - master0).abs().mean()
    drift = (join_master(*eight[:2]) - join_master(*split[:2])).abs().mean()
    assert drift < 0.08 * moved, (drift, moved)


BAD_SPLIT_INPUTS = [
    ("weights", lambda a: torch.zeros(64), "weights has dtype torch.float32; expected torch.bfloat16"),
    ("master_low", lambda a: torch.zeros(64, dtype=torch.int32), "master_low has dtype torch.int32"),
    ("master_low", lambda a: torch.zeros(63, dtype=torch.int16), "master_low has 63 elements but weights has 64"),
    ("exp_avg_q", lambda a: torch.zeros(64, dtype=torch.int8), "exp_avg_q has dtype torch.int8"),
    ("exp_avg_scale", lambda a: torch.zeros(2), "exp_avg_scale has 2 elements; weights's 64 elements make 1"),
    ("exp_avg_sq_scale", lambda a: torch.zeros(1, dtype=torch.float64), "exp_avg_sq_scale has dtype torch.float64"),
    ("grad", lambda a: torch.zeros(64, dtype=torch.float16), "grad has dtype torch.float16"),
]


@pytest.mark.parametrize("name, make_bad, message", BAD_SPLIT_INPUTS)
def test_bad_8bit_input_raises_before_writing(layout_fns, name, make_bad, message):
    _, _, step_8bit = layout_fns
    n = 64
    args = dict(zip(["weights", "master_low"], _halves(torch.randn(n))), grad=torch.randn(n).bfloat16())
    args.update(zip(["exp_avg_q", "exp_avg_scale", "exp_avg_sq_q", "exp_avg_sq_scale"], _moments_8bit(n)))
    args[name] = make_bad(args)
    snapshot = {k: v.clone() for k, v in args.items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        step_8bit(*args.values(), step=1, **HYPER, weight_decay=0.0)
    for k, v in snapshot.items():
        assert torch.equal(args[k].view(torch.uint8), v.view(torch.uint8)), f"{k} was written before the error"
    with pytest.raises(ValueError, match="step must be an int"):
        step_8bit(*snapshot.values(), step=0, **HYPER, weight_decay=0.0)


def test_thread_count_does_not_change_the_new_layouts():
    if cpu_adam.implementation().split()[0] != "cpp":
        pytest.skip(f"C++ path unavailable: {cpu_adam.implementation()}")
    n = 100_003
    master0, g = torch.randn(n), torch.randn(n).bfloat16()
    results = []
    for threads in (1, 3):
        split, eight = [*_halves(master0), torch.zeros(n), torch.zeros(n)], [*_halves(master0), *_moments_8bit(n)]
        for step in (1, 2):
            cpu_adam.adamw_step_split_(split[0], split[1], g, *split[2:], step=step, **HYPER, weight_decay=0.1,
                                       num_threads=threads)
            cpu_adam.adamw_step_split_8bit_(eight[0], eight[1], g, *eight[2:], step=step, **HYPER,
                                            weight_decay=0.1, num_threads=threads)
        results.append(split + eight)
    for a, b in zip(*results):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_8bit_update_in_block_aligned_slices_equals_one_call(layout_fns):
    """A buffer updated in slices (one process's shard each), each told its first_index, gets the bits of one call
    on the whole buffer; without first_index the slices would round with other offsets."""
    _, _, step_8bit = layout_fns
    n, cuts = 3 * QBLOCK * 5 + 77, [0, 5 * QBLOCK, 11 * QBLOCK, 3 * QBLOCK * 5 + 77]
    master0, grads = torch.randn(n), _mixed_grads(n, torch.bfloat16, steps=3)
    whole = [*_halves(master0), *_moments_8bit(n)]
    sliced, unplaced = [*_halves(master0), *_moments_8bit(n)], [*_halves(master0), *_moments_8bit(n)]
    for step, g in enumerate(grads, start=1):
        kwargs = dict(step=step, **HYPER, weight_decay=0.1, seed=7)
        step_8bit(whole[0], whole[1], g, *whole[2:], **kwargs)
        for lo, hi in zip(cuts, cuts[1:]):
            blocks = slice(lo // QBLOCK, num_blocks(hi))
            for buffers, first in ((sliced, lo), (unplaced, 0)):
                w, low, mq, ms, vq, vs = buffers
                step_8bit(w[lo:hi], low[lo:hi], g[lo:hi], mq[lo:hi], ms[blocks], vq[lo:hi], vs[blocks], **kwargs,
                          first_index=first)
    for a, b in zip(whole, sliced):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert not torch.equal(whole[2], unplaced[2])
    with pytest.raises(ValueError, match="first_index must be an int ≥ 0 on a 256-element block boundary"):
        cpu_adam.adamw_step_split_8bit_(*whole[:2], grads[0], *whole[2:], step=1, **HYPER, weight_decay=0.0,
                                        first_index=100)
