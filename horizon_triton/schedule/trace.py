"""Timeline of a run: every primitive and optimizer chunk as a Chrome/Perfetto trace event (JSON).

Work is timed where it runs: on CPU devices by the thread that executes it, on CUDA by events recorded on the
stream around it (read back when the trace is written, so tracing adds no sync to the step).

Memory stays bounded over a long run: the tracer keeps the last ``max_spans`` spans (a few hundred steps of an
80-layer model by default); the trace file and its summary cover those.
"""
from __future__ import annotations

import collections
import json
import threading
import time

import torch

LANES = {"compute": 1, "copy_in": 2, "copy_out": 3, "optimizer": 4}


MAX_SPANS = 100_000


def traced(tracer, name: str, lane: str, fn):
    """fn itself without a tracer, else fn timed as a span named ``name`` on ``lane`` where it runs."""
    return fn if tracer is None else tracer.wrap(name, lane, fn)


class Tracer:
    def __init__(self, max_spans: int = MAX_SPANS):
        self._lock = threading.Lock()
        # (name, lane, start, end): seconds, or CUDA events; the oldest drop out (with their events) past max_spans
        self._spans: collections.deque[tuple] = collections.deque(maxlen=max_spans)
        self.dropped = 0                       # spans that fell out of the window
        self._t0 = time.perf_counter()
        self._cuda_origin = None

    def wrap(self, name: str, lane: str, fn):
        def timed():
            on_gpu = lane != "optimizer" and torch.cuda.is_available() and torch.cuda.is_initialized()
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if self._cuda_origin is None:
                    self._cuda_origin = (torch.cuda.Event(enable_timing=True), time.perf_counter())
                    self._cuda_origin[0].record()
                start.record()
                fn()
                end.record()
            else:
                start = time.perf_counter()
                fn()
                end = time.perf_counter()
            with self._lock:
                self.dropped += len(self._spans) == self._spans.maxlen
                self._spans.append((name, lane, start, end))
        return timed

    def spans(self) -> list[tuple[str, str, float, float]]:
        """(name, lane, start_s, end_s) relative to the tracer's creation. Syncs CUDA (at write time only)."""
        out = []
        with self._lock:
            kept = list(self._spans)
        for name, lane, start, end in kept:
            if isinstance(start, float):
                out.append((name, lane, start - self._t0, end - self._t0))
            else:
                end.synchronize()  # sync: reading CUDA event times
                origin_event, origin_host = self._cuda_origin
                base = origin_host - self._t0
                out.append((name, lane, base + origin_event.elapsed_time(start) / 1e3,
                            base + origin_event.elapsed_time(end) / 1e3))
        return sorted(out, key=lambda s: s[2])

    def summary(self) -> dict:
        """Busy fraction of the compute lane over the traced span, and the share of copy time under compute."""
        spans = self.spans()
        if not spans:
            return {}
        compute = _union([(s, e) for _, lane, s, e in spans if lane == "compute"])
        copies = [(s, e) for _, lane, s, e in spans if lane in ("copy_in", "copy_out")]
        begin = min(s for _, _, s, _ in spans)
        finish = max(e for _, _, _, e in spans)
        busy = sum(e - s for s, e in compute)
        copy_total = sum(e - s for s, e in copies)
        hidden = sum(_overlap(c, compute) for c in copies)
        return {"compute_busy": busy / max(finish - begin, 1e-12),
                "copy_hidden": hidden / copy_total if copy_total else 1.0,
                "copy_seconds": copy_total, "compute_seconds": busy}

    def write(self, path: str) -> None:
        events = [{"name": name, "ph": "X", "pid": 0, "tid": LANES[lane], "ts": start * 1e6,
                   "dur": (end - start) * 1e6, "cat": lane} for name, lane, start, end in self.spans()]
        events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": lane}}
                   for lane, tid in LANES.items()]
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": {**self.summary(), "dropped_spans": self.dropped}}, f)


def _union(intervals):
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def _overlap(interval, merged) -> float:
    s, e = interval
    return sum(max(0.0, min(e, me) - max(s, ms)) for ms, me in merged)
