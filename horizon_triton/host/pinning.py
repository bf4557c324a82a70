"""Page-locked host memory at its exact size, pinned in the background.

torch's ``pin_memory=True`` goes through the pinned caching allocator, which rounds every block up to a power of
two: a 3.2 GiB layer buffer takes 4 GiB of locked memory, a 5 GiB embedding 8 GiB. Instead, each pinned kind of
the store (the working weights and the gradients: the bytes that cross the bus) is one ordinary pageable
allocation, an arena, cut into page-aligned per-layer regions that are registered with the CUDA driver
(cudaHostRegister) one by one on background threads. Registering faults in and locks every page, about as slow
as writing it; at 1 TB that is minutes on one thread, so several threads pin layers in order (layer 0 first)
while the engine starts, and the first copy of a layer waits only for that layer (``wait``).

The CUDA calls are two functions passed in (``cuda_register_functions()`` gives the real ones), so the logic runs
and is tested on machines without a GPU.
"""
from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

PAGE = 4096                         # cudaHostRegister locks whole pages: regions never share one
_CUDA_HOST_REGISTER_PORTABLE = 1    # usable from every CUDA context, whichever thread registered it


def cuda_register_functions(device: int | None = None):
    """(register(ptr, nbytes), unregister(ptr)) through torch's CUDA runtime bindings; raise on a CUDA error.

    The calls run on ``device`` (default: the caller's current device, which a data-parallel rank has set to its
    own). The pinning threads are new threads, whose current device would be 0: without the switch every rank
    would create a context on GPU 0 (hundreds of MB of its memory each) to register its buffers."""
    cudart = torch.cuda.cudart()
    device = torch.cuda.current_device() if device is None else device

    def register(ptr: int, nbytes: int) -> None:
        torch.cuda.set_device(device)           # per thread: this pinning thread's current device
        torch.cuda.check_error(cudart.cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE))

    def unregister(ptr: int) -> None:
        torch.cuda.set_device(device)
        torch.cuda.check_error(cudart.cudaHostUnregister(ptr))

    return register, unregister


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def arena_span(nbytes: list[int]) -> int:
    """Bytes of page-aligned memory an arena of regions of these sizes takes."""
    return sum(_round_up(n, PAGE) for n in nbytes)


def anonymous_pages(nbytes: int) -> torch.Tensor:
    """uint8[nbytes] of fresh zero pages mapped for this allocation alone (an anonymous mmap), unmapped when the
    last view of it is gone. Never in malloc's heap, whatever its mmap threshold: the training's temporaries may
    reuse heap memory freely (no fresh mapping, faulted in zeroed, for each) without fragmenting the store."""
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes)     # holds the mapping


def arena(nbytes: list[int], base: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One pageable allocation holding a page-aligned uint8 region of each size, nothing rounded beyond the page.
    The regions are views: they keep the allocation alive. The allocation is its own mapping (anonymous_pages):
    zero-filled, and out of malloc's heap, where layer-sized buffers and the training's temporaries would
    interleave and fragment it (+0.15 bytes/param of peak RSS measured, tests/test_host_memory.py).
    ``base``: cut the regions from this page-aligned uint8 memory of arena_span(nbytes) bytes instead (a shared
    segment, node_store.py, zero-filled by whoever made it)."""
    spans = [_round_up(n, PAGE) for n in nbytes]
    if base is None:
        base = anonymous_pages(sum(spans))
    elif base.data_ptr() % PAGE or base.numel() < sum(spans):
        raise ValueError(f"arena base at {base.data_ptr():#x} of {base.numel()} bytes: needs {sum(spans)} bytes "
                         f"starting on a page")
    regions, offset = [], 0
    for n, span in zip(nbytes, spans):
        regions.append(base[offset:offset + n])
        offset += span
    return regions


class HostPinner:
    """Arenas of page-aligned regions, registered on background threads; ``wait(key)`` before a region's first
    transfer, ``close()`` to unregister everything (before the memory is freed)."""

    def __init__(self, register, unregister, threads: int | None = None):
        self._register, self._unregister = register, unregister
        threads = threads or min(8, max(1, (os.cpu_count() or 2) // 2))
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pin")
        self._pending: dict = {}        # key -> Future
        self._registered: list[int] = []
        self._lock = threading.Lock()
        self.arena_bytes = 0            # bytes allocated for arenas (regions and their page padding)

    def arena(self, nbytes: list[int], base: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``arena(nbytes, base=base)``, counted in arena_bytes."""
        self.arena_bytes += arena_span(nbytes)
        return arena(nbytes, base=base)

    def pin(self, key, region: torch.Tensor) -> None:
        """Registers ``region`` (a page-aligned arena region) on a background thread; the page padding after it
        is registered with it."""
        if region.data_ptr() % PAGE:
            raise ValueError(f"{key}: region at {region.data_ptr():#x} is not page-aligned; take it from arena()")

        def work():
            if region.numel():
                self._register(region.data_ptr(), _round_up(region.numel() * region.element_size(), PAGE))
                with self._lock:
                    self._registered.append(region.data_ptr())
        self._pending[key] = self._pool.submit(work)

    def wait(self, key) -> None:
        """Blocks until ``key``'s region is pinned; raises what its registration raised, naming it."""
        future: Future | None = self._pending.get(key)
        if future is None:
            return
        try:
            future.result()
        except Exception as e:
            raise RuntimeError(f"pinning host buffer {key} failed: {e} (is enough memory lockable? see "
                               f"`ulimit -l`)") from e

    def wait_all(self) -> None:
        for key in list(self._pending):
            self.wait(key)

    def close(self) -> None:
        """Waits for pending registrations and unregisters every region (idempotent)."""
        self._pool.shutdown(wait=True)
        with self._lock:
            registered, self._registered = self._registered, []
        self._pending.clear()           # the regions they hold: the arenas may be freed now
        for ptr in registered:
            self._unregister(ptr)
