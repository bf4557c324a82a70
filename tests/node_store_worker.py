"""The local ranks of tests/test_node_store.py: each function runs in a spawned process, maps one store shared
with its peers, and reports through ``results`` (a queue) as (rank, what, value)."""
import gc
import hashlib
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
import uuid

import torch

import horizon_triton as ht
from horizon_triton.state import training_state
from horizon_triton.host.node_store import NodeShare, PeerError
from horizon_triton.host.optimizer import OptimizerDriver
from horizon_triton.host.pinning import HostPinner
from horizon_triton.host.store import HostStore, fix_malloc_mmap_threshold

# 0.9M parameters; the decoder layers' decayed prefix ends inside a 256-element block; with tied embeddings
# the head is one 304-element norm, so a cut of 2 or 3 ranks falls inside the undecayed rest (and one is empty)
CFG = ht.ModelConfig(vocab_size=512, hidden_size=304, intermediate_size=100, num_layers=2, num_heads=4,
                     num_kv_heads=2, tie_word_embeddings=True)
TRAIN = ht.TrainConfig(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, optimizer_threads=1)
LAYOUTS = {"split": (torch.bfloat16, "fp32"), "8bit": (torch.bfloat16, "8bit"), "fp32": (torch.float32, "fp32")}
STEPS, SEED, GRAD_SCALE = 3, 5, 0.7


CTX = mp.get_context("spawn")


class Ranks:
    """``world`` spawned local ranks running ``target(rank, world, name, barrier, results, *args)``; ``name``
    is unique to them (their NodeShare's)."""

    def __init__(self, target, world: int, *args, barrier_timeout: float = 120.0):
        self.name, self.results = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}", CTX.Queue()
        self.barrier = CTX.Barrier(world, timeout=barrier_timeout)    # kept: the children unpickle it late
        self.procs = [CTX.Process(target=target, args=(rank, world, self.name, self.barrier, self.results, *args))
                      for rank in range(world)]
        for p in self.procs:
            p.start()

    def get(self, timeout: float = 120.0):
        """The next report (rank, what, value); a rank's traceback, or a crash, fails the test."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                rank, what, value = self.results.get(timeout=0.5)
                break
            except queue.Empty:
                crashed = [p.exitcode for p in self.procs if p.exitcode not in (None, 0, -signal.SIGKILL)]
                if crashed or time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"no report from the ranks (exit codes {crashed}) within "
                                         f"{timeout} s") from None
        if what == "error":
            self.kill()
            raise AssertionError(f"local rank {rank} raised:\n{value}")
        return rank, what, value

    def collect(self, count: int, timeout: float = 120.0) -> dict:
        """{(rank, what): value} of the next ``count`` reports."""
        return {(r, w): v for r, w, v in (self.get(timeout) for _ in range(count))}

    def join(self, timeout: float = 60.0) -> list[int]:
        for p in self.procs:
            p.join(timeout)
        self.kill()
        return [p.exitcode for p in self.procs]

    def kill(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


def gradient(layout, layer: int, step: int, dtype: torch.dtype) -> torch.Tensor:
    """The full gradient of one layer at one step: the same in every process."""
    g = torch.Generator().manual_seed(1000 * step + layer)
    return (torch.randn(layout.numel, generator=g) * 0.01).to(dtype)


def digest(store: HostStore) -> str:
    h = hashlib.sha256()
    for kind, layer, t in store.state_buffers():
        h.update(f"{kind}{layer}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state(store: HostStore) -> dict:
    return {f"{kind}.{layer}": t.clone() for kind, layer, t in store.state_buffers()}


def train(store: HostStore, driver: OptimizerDriver, shard=None, steps: int = STEPS) -> None:
    """STEPS optimizer steps: each rank writes its shard of the gradient (as a reduce-scatter would), then
    updates its shard; shard None: one process, all of it."""
    for step in range(1, steps + 1):
        for i, layout in enumerate(store.layouts):
            lo, hi = store.shard_bounds(i, *shard) if shard else (0, layout.numel)
            store.grad[i][lo:hi] = gradient(layout, i, step, store.grad[i].dtype)[lo:hi]
        driver.start_step(step, TRAIN.lr, GRAD_SCALE)
        for i in range(store.num_layers):
            driver.wait_layer(i)
        driver.wait_all()


def reference_state(layout: str) -> dict:
    dtype, states = LAYOUTS[layout]
    store = HostStore(CFG, dtype, optimizer_states=states)
    store.init_random(SEED)
    train(store, OptimizerDriver(store, TRAIN))
    return state(store)


def _report(results, rank, fn):
    try:
        fn()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise


def sharded_training(rank, world, name, barrier, results, out_dir):
    """Every layout: map a shared store, fill it on rank 0, check that each rank's writes are seen by the
    others, train STEPS sharded steps; rank 0 saves the state to out_dir/<layout>.pt, every rank reports a
    digest of the whole store as it sees it."""
    def body():
        for layout, (dtype, states) in LAYOUTS.items():
            share = NodeShare(f"{name}-{layout}", rank, world, barrier.wait)
            store = HostStore(CFG, dtype, optimizer_states=states, shared=share)
            assert store.shared is share
            store.fill_shared(lambda: store.init_random(SEED))
            # a write by each rank, seen by every other
            store.grad[0][rank] = rank + 1
            barrier.wait()
            assert store.grad[0][:world].tolist() == list(range(1, world + 1)), store.grad[0][:world]
            barrier.wait()
            driver = OptimizerDriver(store, TRAIN, shard=(rank, world))
            train(store, driver, shard=(rank, world))
            results.put((rank, layout, digest(store)))
            if rank == 0:
                torch.save(state(store), os.path.join(out_dir, f"{layout}.pt"))
            barrier.wait()                 # nobody unmaps before rank 0 has saved
            store.close()
            del store, driver
            results.put((rank, f"{layout} mapped after close", mapped_segments(f"{name}-{layout}")))
    _report(results, rank, body)


def mapped_segments(name: str) -> list[str]:
    """The lines of /proc/self/maps that map a segment of NodeShare ``name``."""
    gc.collect()
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if f"horizon-{name}-" in line]


def dead_peer(rank, world, name, barrier, results, killed):
    """Rank 1 maps the store and waits to be killed; rank 0 starts a step: first its wait ends on the timeout
    (rank 1 alive but idle), then, once the test has killed rank 1, on rank 1 being gone."""
    def body():
        share = NodeShare(name, rank, world, barrier.wait, timeout_s=1.0)
        store = HostStore(CFG, torch.bfloat16, shared=share)
        store.fill_shared(lambda: store.init_random(SEED))
        driver = OptimizerDriver(store, TRAIN, shard=(rank, world))
        results.put((rank, "ready", os.getpid()))
        if rank != 0:
            time.sleep(600)
        driver.start_step(1, TRAIN.lr, 1.0)
        for wait_for in ("timeout", "gone"):
            if wait_for == "gone":
                killed.wait(60)
            start = time.monotonic()
            try:
                driver.wait_layer(0)
                results.put((rank, wait_for, "returned"))
            except PeerError as e:
                results.put((rank, wait_for, (str(e), time.monotonic() - start)))
    _report(results, rank, body)


def failing_peer(rank, world, name, barrier, results):
    """Rank 0's filling of a first store raises: rank 1's wait for it raises naming rank 0. Then rank 1's update
    of layer 1 of a second store raises: rank 0's waits raise naming it, rank 1 gets its own error back."""
    def body():
        first = HostStore(CFG, torch.bfloat16, shared=NodeShare(f"{name}-fill", rank, world, barrier.wait))

        def fill():
            raise OSError("checkpoint unreadable")
        try:
            first.fill_shared(fill)
            results.put((rank, "fill", "returned"))
        except Exception as e:
            results.put((rank, "fill", f"{type(e).__name__}: {e}"))
        first.close()
        share = NodeShare(name, rank, world, barrier.wait)
        store = HostStore(CFG, torch.bfloat16, optimizer_states="8bit", shared=share)
        store.fill_shared(lambda: store.init_random(SEED))
        driver = OptimizerDriver(store, TRAIN, shard=(rank, world))
        if rank == 1:
            update = driver.update_layer

            def broken(i, *args):
                if i == 1:
                    raise RuntimeError("injected failure")
                update(i, *args)
            driver.update_layer = broken
        driver.start_step(1, TRAIN.lr, 1.0)
        if rank == 0:
            driver.wait_layer(0)                   # layer 0 was updated by both
        try:
            driver.wait_layer(0)                   # rank 1: its own error, once its worker raised
            driver.wait_all()
            results.put((rank, "wait_all", "returned"))
        except Exception as e:
            results.put((rank, "wait_all", f"{type(e).__name__}: {e}"))
    _report(results, rank, body)


def die_in_rendezvous(rank, world, name, barrier, results):
    """Rank 0 creates the segments and is killed before its peers map them; the peers' barrier breaks."""
    def body():
        def rank0_barrier():
            results.put((rank, "created", sorted(f for f in os.listdir("/dev/shm") if name in f)))
            results.close()
            results.join_thread()              # flushed before the kill
            os.kill(os.getpid(), signal.SIGKILL)
        share = NodeShare(name, rank, world, rank0_barrier if rank == 0 else barrier.wait)
        try:
            HostStore(CFG, torch.bfloat16, shared=share)
        except Exception as e:
            results.put((rank, "raised", type(e).__name__))
    _report(results, rank, body)


def checkpoint(rank, world, name, barrier, results, ckpt_root):
    """A sharded step on a shared 8-bit store, saved by rank 0 (rank 1 may not), then loaded into a new shared
    store by both: every rank reports the digest of what it sees."""
    def body():
        share = NodeShare(f"{name}-a", rank, world, barrier.wait)
        store = HostStore(CFG, torch.bfloat16, optimizer_states="8bit", shared=share)
        store.fill_shared(lambda: store.init_random(SEED))
        driver = OptimizerDriver(store, TRAIN, shard=(rank, world))
        train(store, driver, shard=(rank, world), steps=1)
        results.put((rank, "trained", digest(store)))
        if rank == 0:
            training_state.save(store, ckpt_root, {"step": 1})
        else:
            try:
                training_state.save(store, ckpt_root, {"step": 1})
                results.put((rank, "save", "returned"))
            except ValueError as e:
                results.put((rank, "save", str(e)))
        barrier.wait()
        store.close()
        again = HostStore(CFG, torch.bfloat16, optimizer_states="8bit", shared=NodeShare(f"{name}-b", rank, world,
                                                                                          barrier.wait))
        ckpt = training_state.find(ckpt_root)
        manifest, _ = training_state.read(ckpt)
        training_state.load_into(again, ckpt, manifest)
        results.put((rank, "loaded", digest(again)))
        barrier.wait()
    _report(results, rank, body)


class SlowFakeCuda:
    """cudaHostRegister faked: records (ptr, bytes); the first call waits, so that this rank's pinning ends
    after local rank 0 has written the store."""

    def __init__(self, delay: float):
        import threading
        self.registered, self.delay, self.lock = {}, delay, threading.Lock()

    def register(self, ptr, nbytes):
        time.sleep(self.delay)
        with self.lock:
            self.delay = 0.0
            self.registered[ptr] = nbytes

    def unregister(self, ptr):
        with self.lock:
            del self.registered[ptr]


def pinned(rank, world, name, barrier, results):
    """Each rank pins, in its own address space (a fake driver), the shared store's working weights and its
    shard of the gradients; rank 1 pins late, after rank 0 has written weights and gradients, and must not clear
    them."""
    def body():
        cuda = SlowFakeCuda(delay=1.0 if rank == 1 else 0.0)
        share = NodeShare(name, rank, world, barrier.wait)
        store = HostStore(CFG, torch.bfloat16, pin=True, pinner=HostPinner(cuda.register, cuda.unregister,
                                                                           threads=1), shared=share)

        def fill():
            store.init_random(SEED)
            for i, layout in enumerate(store.layouts):
                store.grad[i].copy_(gradient(layout, i, 1, torch.bfloat16))
        store.fill_shared(fill)
        for i in range(store.num_layers):
            store.wait_pinned(i)
        expected = {}              # every page of the working weights; the pages of this rank's gradient shard
        for a in store.allocations:
            ptr = store.buffers(a.kind)[a.layer].data_ptr()
            if a.kind == "working":
                expected[ptr] = -(-a.nbytes // 4096) * 4096
            elif a.kind == "grad":
                lo, hi = (n * a.dtype.itemsize for n in store.shard_bounds(a.layer, rank, world))
                first, end = lo // 4096 * 4096, -(-hi // 4096) * 4096
                if hi > lo:
                    expected[ptr + first] = end - first
        results.put((rank, "registered", cuda.registered == expected and len(expected) >= store.num_layers + 2))
        grads_kept = all(torch.equal(store.grad[i], gradient(layout, i, 1, torch.bfloat16))
                         for i, layout in enumerate(store.layouts))
        results.put((rank, "grads kept", grads_kept))
        results.put((rank, "digest", digest(store)))
        barrier.wait()
        store.close()
        results.put((rank, "unregistered", not cuda.registered))
    _report(results, rank, body)


def smaps_rollup(field: str) -> int:
    """Bytes of one field of this process's /proc/self/smaps_rollup: "Pss" (proportional set size: a page
    mapped by n processes counts 1/n in each) or "Rss"."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} line in /proc/self/smaps_rollup")


def memory(rank, world, name, barrier, results, cfg_fields, shared, states, threads=1):
    """Builds a store (shared between the ranks, or one private store each), fills it, writes the gradient
    (this rank's shard) and runs two optimizer steps (every buffer touched); reports PSS and RSS before and after,
    measured while every rank still maps it, and the seconds of the second step (start_step to wait_all)."""
    def body():
        torch.set_num_threads(1)
        fix_malloc_mmap_threshold()            # as an Engine does: freed temporaries go back to the system
        cfg = ht.ModelConfig(**cfg_fields)
        before = smaps_rollup("Pss"), smaps_rollup("Rss")
        share = NodeShare(name, rank, world, barrier.wait) if shared else None
        store = HostStore(cfg, torch.bfloat16, optimizer_states=states, shared=share)
        store.fill_shared(lambda: store.init_random(SEED))
        shard = (rank, world) if shared else None
        for i, layout in enumerate(store.layouts):
            lo, hi = store.shard_bounds(i, *shard) if shard else (0, layout.numel)
            store.grad[i][lo:hi] = gradient(layout, i, 1, store.grad[i].dtype)[lo:hi]
        driver = OptimizerDriver(store, ht.TrainConfig(lr=TRAIN.lr, optimizer_threads=threads), shard=shard)
        for step in (1, 2):
            barrier.wait()
            start = time.perf_counter()
            driver.start_step(step, TRAIN.lr, GRAD_SCALE)
            driver.wait_all()
            seconds = time.perf_counter() - start
        barrier.wait()
        results.put((rank, "memory", dict(pss_before=before[0], rss_before=before[1], pss=smaps_rollup("Pss"),
                                           rss=smaps_rollup("Rss"), store_bytes=store.nbytes(), step_s=seconds)))
        barrier.wait()
    _report(results, rank, body)
