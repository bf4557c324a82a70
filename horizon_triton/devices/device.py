"""Compute devices for the scheduler: one interface, three implementations.

The scheduler issues work to three streams (``compute``, ``copy_in``, ``copy_out``) and orders it with events,
exactly as on a GPU:

    dev.submit(stream, fn)     run fn's work on that stream, after everything submitted to it before
    ev = dev.record(stream)    an event that completes when the stream's work so far has finished
    dev.retain(t, stream)      t's memory stays reserved until the stream's queued work on it has run
    dev.wait(stream, ev)       later work on the stream starts only after ev completes
    dev.sync(ev)               the host blocks until ev completes   (every call site says "# sync: ...")
    dev.free_memory()          bytes still free for the engine on the device (None on CPU: unbounded)
    dev.is_pinned(host)        whether a host tensor is page-locked (copies from it are asynchronous)

- CudaDevice:       real CUDA streams and events; copies from pinned memory are asynchronous.
- SyncDevice:       CPU; every submit runs at once, events are trivially complete.
- AsyncTestDevice:  CPU; each stream is a worker thread that runs its queue after random delays, so a missing
                    ``wait`` lets a computation read a half-copied slot and the numbers come out wrong.
- MetaDevice:       the dry run's (dryrun.py): meta tensors, every submit runs at once, and a timeline of what
                    each stream was given, for the step-time model (plan.py).

Every device also makes the host buffers that device->host copies land in (``host_empty``) and says how much
memory its tensors may still take (``mem_get_info``, as torch.cuda.mem_get_info: (free, total) bytes).
"""
from __future__ import annotations

import queue
import random
import threading
import time

import torch

STREAMS = ("compute", "copy_in", "copy_out")


def host_memory_info() -> tuple[int, int]:
    """(MemAvailable, MemTotal) of this machine in bytes, from /proc/meminfo."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemAvailable"], fields["MemTotal"]


class _HostMemory:
    """Host buffers and free memory of the devices whose tensors live in host RAM."""
    pin_memory = False

    def host_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer for a device->host copy, pinned where the device copies asynchronously (through torch's
        caching host allocator, which only a CUDA device has)."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory and self.type == "cuda")

    def is_pinned(self, host: torch.Tensor) -> bool:
        """Whether a host tensor is in page-locked memory (the device can copy from it asynchronously)."""
        return host.is_pinned()

    def mem_get_info(self) -> tuple[int, int]:
        return host_memory_info()

    def free_memory(self) -> int | None:
        """Bytes the engine may still allocate on the device; None: unbounded (CPU memory is the host's)."""
        return None


class SyncDevice(_HostMemory):
    type = "cpu"

    def __init__(self):
        self.torch_device = torch.device("cpu")

    def submit(self, stream: str, fn) -> None:
        fn()

    def record(self, stream: str):
        return None

    def wait(self, stream: str, event) -> None:
        pass

    def sync(self, event) -> None:
        pass

    def retain(self, tensor, stream: str) -> None:
        pass

    def close(self) -> None:
        pass


class _DoneEvent(threading.Event):
    def __init__(self):
        super().__init__()
        self.set()


class AsyncTestDevice(_HostMemory):
    """CPU streams as worker threads with random delays before each task (seeded, so a failure replays)."""
    type = "cpu"

    def __init__(self, seed: int = 0, max_delay_s: float = 0.002):
        self.torch_device = torch.device("cpu")
        self._rng = random.Random(seed)
        self._max_delay = max_delay_s
        self._queues = {name: queue.Queue() for name in STREAMS}
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._worker, args=(q,), daemon=True, name=f"stream-{name}")
                         for name, q in self._queues.items()]
        for t in self._threads:
            t.start()

    def _worker(self, q: queue.Queue) -> None:
        while True:
            task = q.get()
            if task is None:
                return
            delay, fn, always = task
            if delay:
                time.sleep(delay)
            try:
                if self._error is None or always:   # events still complete after an error: sync must not hang
                    fn()
            except BaseException as e:  # surfaced at the next sync
                self._error = e

    def submit(self, stream: str, fn) -> None:
        self._queues[stream].put((self._rng.uniform(0, self._max_delay), fn, False))

    def rng_state(self) -> list:
        """The delays' generator state as JSON (training checkpoints carry it)."""
        version, internal, gauss = self._rng.getstate()
        return [version, list(internal), gauss]

    def set_rng_state(self, state: list) -> None:
        version, internal, gauss = state
        self._rng.setstate((version, tuple(internal), gauss))

    def record(self, stream: str):
        event = threading.Event()
        self._queues[stream].put((self._rng.uniform(0, self._max_delay), event.set, True))
        return event

    def wait(self, stream: str, event) -> None:
        if event is not None:
            self._queues[stream].put((0.0, event.wait, False))

    def sync(self, event) -> None:
        if event is not None:
            event.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def retain(self, tensor, stream: str) -> None:
        pass

    def close(self) -> None:
        for q in self._queues.values():
            q.put(None)


class CudaDevice(_HostMemory):
    type = "cuda"
    pin_memory = True

    def __init__(self, index: int = 0):
        self.torch_device = torch.device("cuda", index)
        torch.cuda.set_device(self.torch_device)
        self._streams = {"compute": torch.cuda.current_stream(self.torch_device),
                         "copy_in": torch.cuda.Stream(self.torch_device),
                         "copy_out": torch.cuda.Stream(self.torch_device)}

    def submit(self, stream: str, fn) -> None:
        with torch.cuda.stream(self._streams[stream]):
            fn()

    def record(self, stream: str):
        # blocking: a host that waits for it (sync, the step's end) sleeps instead of spinning on a core that
        # the CPU AdamW could use; a stream waiting for it is not affected
        event = torch.cuda.Event(blocking=True)
        event.record(self._streams[stream])
        return event

    def wait(self, stream: str, event) -> None:
        if event is not None:
            self._streams[stream].wait_event(event)

    def sync(self, event) -> None:
        if event is not None:
            event.synchronize()

    def retain(self, tensor, stream: str) -> None:
        """The caching allocator must not reuse ``tensor``'s memory before ``stream``'s queued work on it ran."""
        tensor.record_stream(self._streams[stream])

    def free_memory(self) -> int:
        """The driver's free bytes plus what torch's caching allocator holds but no tensor uses."""
        free, _ = torch.cuda.mem_get_info(self.torch_device)
        return free + torch.cuda.memory_reserved(self.torch_device) - torch.cuda.memory_allocated(self.torch_device)

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.torch_device)

    def close(self) -> None:
        pass


class MetaEvent:
    """An event of the MetaDevice: its stream, and how many tensors that stream had retained when it was recorded."""

    def __init__(self, stream: str, retained: int):
        self.stream, self.retained = stream, retained


class MetaDevice(_HostMemory):
    """The dry run's device: tensors on PyTorch's meta device (shapes and dtypes, no memory, no arithmetic), and
    every submit runs at once, as on SyncDevice. It stands for a CUDA device (host buffers pinned), or with
    pin_memory=False for the CPU device.

    ``timeline`` lists what the streams were given, in host order, for the step-time model (plan.py):
        ("task", stream, costs)   costs: a dict the dry run's op counter fills while the task runs
        ("record", stream, event) ("wait", stream, event) ("sync", event) ("wait_layer", layer)
    (the last one is appended by the dry run's stand-in optimizer). As the CUDA caching allocator does, a
    tensor passed to ``retain`` keeps its memory until its stream's work on it has run: until an event its
    stream recorded after it is waited for, or, for the copy streams, until the end of the next compute task
    (the copy runs beside it: the bus keeps up with the compute, which plan's "copies hide" checks). Without
    that, checkpoints offloaded in the forward, where nothing waits for the copy-out stream, would stay counted
    until the head, as if the allocator needed the host to wait before reusing their memory.
    ``host_allocating`` is true while a host buffer is made, so that the counter does not take it for device
    memory; ``allocated`` is what the counter sees live on the device, for ``mem_get_info``."""
    type = "meta"
    pin_memory = True

    def __init__(self, ops, kernel_backend: str, memory_bytes: int, pin_memory: bool = True):
        self.torch_device = torch.device("meta")
        self.ops, self.kernel_backend, self.memory_bytes = ops, kernel_backend, memory_bytes
        self.pin_memory = pin_memory             # False: it stands for the CPU device
        self.timeline: list[tuple] = []
        self.current: dict | None = None           # costs of the task running now
        self.host_allocating = False
        self.allocated = 0
        self._retained = {name: [] for name in STREAMS}
        self._released = {name: 0 for name in STREAMS}

    def task_costs(self) -> dict:
        """The costs of the running task; work issued outside any submit goes to the compute (default) stream."""
        if self.current is not None:
            return self.current
        if not (self.timeline and self.timeline[-1][:2] == ("task", "compute")):
            self.timeline.append(("task", "compute", {}))     # nothing came between: the same stream order
        return self.timeline[-1][2]

    def submit(self, stream: str, fn) -> None:
        costs, outer = {}, self.current
        copies = [MetaEvent(name, len(self._retained[name])) for name in ("copy_in", "copy_out")]
        self.timeline.append(("task", stream, costs))
        self.current = costs
        try:
            fn()
        finally:
            self.current = outer
        if stream == "compute":              # the copies issued before this task have run beside it
            for copied in copies:
                self._release(copied)

    def record(self, stream: str) -> MetaEvent:
        event = MetaEvent(stream, len(self._retained[stream]))
        self.timeline.append(("record", stream, event))
        return event

    def _release(self, event: MetaEvent) -> None:
        held = self._retained[event.stream]
        for k in range(self._released[event.stream], event.retained):
            held[k] = None
        self._released[event.stream] = max(self._released[event.stream], event.retained)

    def wait(self, stream: str, event) -> None:
        if event is not None:
            self.timeline.append(("wait", stream, event))
            self._release(event)

    def sync(self, event) -> None:
        if event is not None:
            self.timeline.append(("sync", event))
            self._release(event)

    def retain(self, tensor, stream: str) -> None:
        self._retained[stream].append(tensor)

    def host_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        self.host_allocating = True
        try:
            return torch.empty(shape, dtype=dtype, device="meta")
        finally:
            self.host_allocating = False

    def is_pinned(self, host: torch.Tensor) -> bool:
        """The host tensors on meta are host_empty's and the store's, pinned when the device is (real CPU tensors,
        made from a batch, are pageable)."""
        return self.pin_memory and host.device.type == "meta"

    def mem_get_info(self) -> tuple[int, int]:
        return max(0, self.memory_bytes - self.allocated), self.memory_bytes

    def free_memory(self) -> int | None:
        """As the device it stands for: the card's free bytes, or unbounded for the CPU device."""
        return self.mem_get_info()[0] if self.pin_memory else None

    def close(self) -> None:
        pass


def device_kind(device: str) -> str:
    """"cuda" or "cpu": the kind of device TrainConfig.device makes (the process group's backend follows it)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device == "cuda" else "cpu"


def make_device(kind: str, seed: int = 0, index: int = 0):
    """kind: "cpu" | "cuda" | "auto" | "cpu-async"; index: the CUDA device (a data-parallel rank's local rank,
    modulo the devices this process sees: one each when the launcher narrows CUDA_VISIBLE_DEVICES)."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'")
        return CudaDevice(index % torch.cuda.device_count())
    if kind == "cpu-async":
        return AsyncTestDevice(seed)
    return SyncDevice()
