"""Host store layouts (bytes per parameter, kinds, the exact master) and pinning at exact size, with the CUDA
registration calls faked so that the logic runs without a GPU."""
import threading

import pytest
import torch

import horizon_triton as ht
from horizon_triton.host import store as store_module
from horizon_triton.kernels.host_formats import QBLOCK
from horizon_triton.host.pinning import PAGE, HostPinner
from horizon_triton.host.store import HostStore

CFG = ht.ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=176, num_layers=3, num_heads=4,
                     num_kv_heads=2)


class FakeCuda:
    """cudaHostRegister / cudaHostUnregister as the driver sees them: page-aligned, never overlapping."""

    def __init__(self, fail_at: int | None = None):
        self.registered: dict[int, int] = {}      # ptr -> bytes
        self.unregistered: list[int] = []
        self.calls = 0
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def register(self, ptr: int, nbytes: int) -> None:
        with self.lock:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("CUDA error: out of memory")
            assert ptr % PAGE == 0 and nbytes % PAGE == 0, (ptr, nbytes)
            for other, size in self.registered.items():
                assert ptr + nbytes <= other or other + size <= ptr, "overlapping registration"
            self.registered[ptr] = nbytes

    def unregister(self, ptr: int) -> None:
        with self.lock:
            del self.registered[ptr]
            self.unregistered.append(ptr)


def _bytes_per_param(store):
    return store.nbytes() / store.num_parameters()


def test_default_bf16_store_is_14_bytes_per_parameter():
    s = HostStore(CFG, torch.bfloat16)
    kinds = {a.kind: a.dtype for a in s.allocations}
    assert kinds == {"working": torch.bfloat16, "master_low": torch.int16, "exp_avg": torch.float32,
                     "exp_avg_sq": torch.float32, "grad": torch.bfloat16}
    assert s.nbytes() == 14 * s.num_parameters()


def test_8bit_store_is_8_bytes_per_parameter_plus_block_scales_and_small_tensors():
    s = HostStore(CFG, torch.bfloat16, optimizer_states="8bit")
    n, decayed = s.num_parameters(), sum(layout.decay_numel for layout in s.layouts)
    blocks = sum(-(-layout.decay_numel // QBLOCK) for layout in s.layouts)
    # 8 bytes per parameter; 8 more per block (two fp32 scales); norms and biases keep fp32 moments (8 bytes
    # instead of 2)
    assert s.nbytes() == 8 * n + 8 * blocks + 6 * (n - decayed)
    assert _bytes_per_param(s) < 8.1


def test_fp32_store_is_16_bytes_and_streams_its_master():
    s = HostStore(CFG, torch.float32)
    assert s.nbytes() == 16 * s.num_parameters()
    assert all(w is m for w, m in zip(s.working, s.master))


def test_8bit_needs_bf16():
    with pytest.raises(ValueError, match="needs compute_dtype='bfloat16'"):
        HostStore(CFG, torch.float32, optimizer_states="8bit")
    with pytest.raises(ValueError, match="optimizer_states"):
        ht.TrainConfig(compute_dtype="float32", optimizer_states="8bit")
    with pytest.raises(ValueError, match="optimizer_states must be"):
        ht.TrainConfig(optimizer_states="4bit")


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_optimizer_threads(threads):
    with pytest.raises(ValueError, match="optimizer_threads must be an int ≥ 1 or None"):
        ht.TrainConfig(optimizer_threads=threads)


def test_optimizer_leaves_one_core_free(monkeypatch):
    from horizon_triton.host import optimizer
    monkeypatch.setattr(optimizer, "default_num_threads", lambda: 16)
    assert optimizer.optimizer_threads(ht.TrainConfig()) == 15
    assert optimizer.optimizer_threads(ht.TrainConfig(optimizer_threads=4)) == 4
    monkeypatch.setattr(optimizer, "default_num_threads", lambda: 1)
    assert optimizer.optimizer_threads(ht.TrainConfig()) == 1


def test_master_round_trips_exactly_and_working_weights_are_its_rounding():
    s = HostStore(CFG, torch.bfloat16)
    s.init_random(seed=0)
    values = torch.randn(s.layouts[1].numel) * 0.02
    s.set_master(1, values)
    assert torch.equal(s.master_values(1), values)
    assert torch.equal(s.master[1], values)                          # store.master: the same reconstruction
    assert (s.working[1].float() - values).abs().max() <= values.abs().max() * 2 ** -8
    named = dict(s.named_master())
    q = s.layouts[1].params[0]
    assert torch.equal(named[q.hf_name], values[:q.numel].view(q.shape))
    assert len(s.master) == s.num_layers and len(list(s.master)) == s.num_layers


def test_state_buffers_are_everything_but_the_gradient():
    s = HostStore(CFG, torch.bfloat16, optimizer_states="8bit")
    kinds = {kind for kind, _, _ in s.state_buffers()}
    assert kinds == {"working", "master_low", "exp_avg_q", "exp_avg_scale", "exp_avg_sq_q", "exp_avg_sq_scale",
                     "exp_avg", "exp_avg_sq"}
    total = sum(t.numel() * t.element_size() for _, _, t in s.state_buffers())
    assert total == s.nbytes() - sum(a.nbytes for a in s.allocations if a.kind == "grad")


@pytest.mark.parametrize("compute_dtype, pinned_kinds", [(torch.bfloat16, {"working", "grad"}),
                                                         (torch.float32, {"master", "grad"})])
def test_only_what_crosses_the_bus_is_pinned_at_exact_size(compute_dtype, pinned_kinds):
    cuda = FakeCuda()
    pinner = HostPinner(cuda.register, cuda.unregister, threads=3)
    s = HostStore(CFG, compute_dtype, pin=True, pinner=pinner)
    s.init_random(seed=0)
    for i in range(s.num_layers):
        s.wait_pinned(i)
    assert {a.kind for a in s.allocations if a.pinned} == pinned_kinds
    expected = {}
    for a in s.allocations:
        if a.pinned:
            buffer = s.buffers(a.kind)[a.layer]
            expected[buffer.data_ptr()] = -(-a.nbytes // PAGE) * PAGE      # the buffer's pages, nothing more
    assert cuda.registered == expected
    # no power-of-two rounding: the arenas hold the buffers, a page of padding each and one page to align
    pinned_bytes = s.nbytes(pinned=True)
    assert pinner.arena_bytes <= pinned_bytes + (len(expected) + len(pinned_kinds)) * PAGE
    grads = s.grad
    assert all(not g.any() for g in grads)                                     # zero-filled before pinning
    s.close()
    assert not cuda.registered and len(cuda.unregistered) == len(expected)
    s.close()                                                                  # idempotent


def test_pinning_threads_register_on_the_ranks_device(monkeypatch):
    """A data-parallel rank pins from new threads, whose CUDA current device is 0 until set: each registration
    must run on the rank's device (else every rank makes a context on GPU 0). CUDA's per-thread current device
    and its registration calls are faked, so this runs without a GPU."""
    from horizon_triton.host import pinning

    current = threading.local()                                 # the runtime's per-thread current device
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", getattr(current, "device", 0)))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", getattr(current, "device", 0)))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", FakeCudart)
    monkeypatch.setattr(torch.cuda, "check_error", lambda res: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)     # the rank's torch.cuda.set_device(3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: setattr(current, "device", d))
    pinner = HostPinner(*pinning.cuda_register_functions(), threads=2)
    for key, region in enumerate(pinner.arena([PAGE, 3 * PAGE, 100])):
        pinner.pin(key, region)
    pinner.wait_all()
    pinner.close()
    assert calls == [("register", 3)] * 3 + [("unregister", 3)] * 3


def test_a_failed_registration_names_the_buffer():
    cuda = FakeCuda(fail_at=2)
    s = HostStore(CFG, torch.bfloat16, pin=True, pinner=HostPinner(cuda.register, cuda.unregister, threads=1))
    with pytest.raises(RuntimeError, match=r"pinning host buffer \('working', 1\) failed: CUDA error: out of "
                                           r"memory.*ulimit -l"):
        for i in range(s.num_layers):
            s.wait_pinned(i)
    s.close()


def test_meta_store_records_what_would_be_pinned():
    s = HostStore(CFG, torch.bfloat16, pin=True, device="meta")
    assert s.nbytes(pinned=True) == 4 * s.num_parameters()                   # bf16 weights + bf16 gradients
    assert s.nbytes(pinned=False) == 10 * s.num_parameters()


def test_engine_on_pinned_store_trains_as_on_pageable(monkeypatch):
    """The CPU device with the store 'pinned' through the fake driver: the same losses and weights as without,
    every pinned region registered while it trains and unregistered at close."""
    from hf_reference import random_batches

    def run(pin):
        cuda = FakeCuda()
        if pin:
            monkeypatch.setattr(store_module, "cuda_register_functions", lambda: (cuda.register, cuda.unregister))
            monkeypatch.setattr(ht.devices.device.SyncDevice, "pin_memory", True)
            monkeypatch.setattr(torch.Tensor, "pin_memory", torch.Tensor.clone)   # the batches' staging copies
        engine = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu", lr=1e-3))
        history = engine.fit(random_batches(3, vocab=64))
        weights = torch.cat(list(engine.store.master))
        registered = dict(cuda.registered)
        engine.close()
        monkeypatch.undo()
        return [h["loss"] for h in history], weights, registered, cuda

    losses, weights, _, _ = run(pin=False)
    pinned_losses, pinned_weights, registered, cuda = run(pin=True)
    assert pinned_losses == losses and torch.equal(pinned_weights, weights)
    assert len(registered) == 2 * (ht.preset("tiny").num_layers + 2)           # working + grad of every layer
    assert not cuda.registered
