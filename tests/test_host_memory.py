"""Host memory: 14 bytes per parameter by default (8 with 8-bit moments) plus a fixed overhead, growing linearly
with depth.

Each depth runs in a fresh process so that its peak resident memory (ru_maxrss) is its own."""
import ctypes

import pytest
import torch

import horizon_triton as ht
from horizon_triton.host.store import HostStore
from host_memory_probe import probe, slope

GiB = 1024**3


@pytest.mark.slow
@pytest.mark.parametrize("states, store_bytes_per_param", [("fp32", 14.0), ("8bit", 8.04)])
def test_peak_host_memory_per_parameter(states, store_bytes_per_param):
    """The slope with malloc returning what is freed: the store's bytes and nothing more per parameter (a layer's
    temporaries kept alive to the end of the step once added 2 B/param). The deep run again with glibc's defaults:
    what malloc keeps of the freed temporaries for reuse stays a fixed part, under 1 GiB."""
    shallow, deep = probe(2, "--states", states), probe(12, "--states", states)   # about 88M and 201M
    assert deep["params"] > 200e6
    for run in (shallow, deep):
        assert run["store_bytes"] <= store_bytes_per_param * run["params"]
        assert run["host_peak_bytes"] == run["store_bytes"]           # history reports the store's real bytes
    store_slope = slope(shallow, deep, "store_bytes")
    assert store_slope - 0.1 <= slope(shallow, deep, "rss_growth") <= store_slope + 0.05, (shallow, deep)
    as_run = probe(12, "--states", states, malloc_returns_freed=False)
    assert as_run["rss_growth"] <= as_run["store_bytes"] + 1 * GiB, as_run


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_bytes() -> tuple[int, int]:
    """(bytes of malloc's heap, bytes of the chunks malloc mapped on their own): glibc's mallinfo2."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.arena, info.hblkhd


def test_store_is_outside_malloc_and_the_engine_leaves_its_threshold_alone():
    """The store's arenas are mappings of their own, not malloc's: they never share its heap with the training's
    temporaries, whatever its mmap threshold. So an engine need not fix that threshold low (4 MiB once, made
    every larger temporary a fresh mapping faulted in zeroed page by page: 34 s of system time in a 47 s run);
    malloc keeps its own rule, a freed 8 MiB block raising the threshold so that the next one reuses the heap."""
    cfg = ht.ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                         num_kv_heads=2)
    heap, mapped = _malloc_bytes()
    store = HostStore(cfg, torch.bfloat16)
    grown = [after - before for after, before in zip(_malloc_bytes(), (heap, mapped))]
    assert sum(grown) < store.nbytes() / 20, (grown, store.nbytes())
    engine = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu"))
    first = torch.empty(2**21)                       # 8 MiB
    del first                                        # freed: malloc raises its threshold
    _, mapped = _malloc_bytes()
    temporary = torch.empty(2**21)
    assert _malloc_bytes()[1] - mapped < temporary.nbytes
    engine.close()
