"""The experts implementation the generic template runs transformers' MoE layers with, registered under ``NAME``
with transformers' experts interface.

transformers' fused experts modules (those its ``use_experts_implementation`` decorates: Qwen3-MoE, Qwen3-Next,
Qwen3.5-MoE, Mixtral, gpt-oss, DeepSeek-V3, GLM-4-MoE, ...) are called with the router's choice for each token,
top_k_index[T, k] and top_k_weights[T, k], and compute y[t] = Σ_j w[t, j] · down_e(act(gate_up_e(x[t]))). Here the
engine's MoE ops compute it (``ops.moe_permute``, the grouped GEMMs, SwiGLU or gpt-oss's clamped SwiGLU, the
weighted combine) inside an autograd Function, dropless as transformers. Within ``experts_gradients`` the backward
accumulates the experts' weight gradients in fp32 straight into the template's accumulators and gives autograd
none: no [E, N, K] gradient in the weights' dtype is ever made (one layer of gpt-oss-120b's experts is 3.2 B
parameters). Frozen experts (LoRA) get no weight-gradient GEMMs at all; LoRA adapters on the experts' weights
(``experts_lora``, peft's target_parameters) run as two more grouped GEMMs through their rank.

What the ops do not compute runs the implementation the model chose itself (transformers' grouped_mm or its eager
loop), the reason logged once per template: experts without a gate, a gate function other than SiLU's SwiGLU on
[gate | up] halves or gpt-oss's clamped SwiGLU on interleaved ones (found by running the module's own gate on a
probe, not by its name), a norm after the experts and expert parallelism.

Several micro-batches through one layer (``Meeting``): each micro-batch's layer call runs in a worker thread of its
own, one thread at a time in a fixed order; their experts calls wait for each other and run as one grouped
computation over all their tokens, so each expert's weights are read once per layer and pass, not once per
micro-batch. Imports only the kernels' references."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

NAME = "horizon"
log = logging.getLogger("horizon_triton")
_state = threading.local()      # around the template's layer calls: its Experts, the accumulators, the adapters
PROBE = torch.linspace(-9.0, 9.0, 3 * 16).view(3, 16)   # gate/up values past gpt-oss's clamp limit (7) both ways
ADAPTABLE = ("gate_up_proj", "down_proj")   # the experts weights LoRA adapters may carry: the ones the Function uses


@dataclasses.dataclass
class Experts:
    """The kernel path of one template: its ops (``models.ops.load_ops``), the model's own implementation for what
    they do not compute, the gate kind found per experts class and the fallback reasons already announced."""
    ops: object
    fallback: str
    gates: dict = dataclasses.field(default_factory=dict)
    announced: set = dataclasses.field(default_factory=set)


@contextlib.contextmanager
def _thread_state(name: str, value):
    old = getattr(_state, name, None)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, old)


def experts_on(experts: Experts | None):
    """Within: transformers' experts modules run on ``experts`` where they apply (None: always the model's own)."""
    return _thread_state("experts", experts)


def experts_lora(adapters: dict, scale: float):
    """Within: experts module m's weights carry LoRA adapters adapters[id(m)] = {"gate_up_proj": (A, B),
    "down_proj": (A, B)} (either or both; peft's ParamWrapper layout: A[r·E, in], B[out, r·E]), scaled by scale."""
    return _thread_state("lora", (adapters, scale))


def experts_gradients(accumulators: dict):
    """Within: the backward adds the gradient of an experts weight or bias t into accumulators[id(t)] (fp32, t's
    shape) instead of returning it; a tensor without one gets its gradient from autograd as usual."""
    return _thread_state("accumulators", accumulators)


def is_experts_module(module) -> bool:
    """A fused experts module of transformers (its use_experts_implementation decorator sets these)."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "gate_up_proj")


def _gate_kind(module) -> str | tuple[float, float] | None:
    """"swiglu" (SiLU(gate) · up on [gate | up] halves), (alpha, limit) (gpt-oss's clamped SwiGLU on interleaved
    gate/up), or None: what ``module._apply_gate`` computes on a probe, compared with the ops' references."""
    from horizon_triton.kernels import reference
    try:
        with torch.no_grad():
            got = module._apply_gate(PROBE)
    except Exception:        # a gate that cannot run on a CPU probe is one the kernels do not know either
        return None
    if got.shape != (3, 8):
        return None
    if getattr(module, "is_concatenated", True) and torch.allclose(got, reference.swiglu_forward(PROBE)):
        return "swiglu"
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    if alpha is not None and limit is not None and not getattr(module, "is_concatenated", True):
        if torch.allclose(got, reference.clamped_swiglu_forward(PROBE, float(alpha), float(limit))):
            return float(alpha), float(limit)
    return None


def _refusal(experts: Experts, module, x: torch.Tensor) -> str | None:
    """Why the ops do not compute this experts call (None: they do)."""
    if not getattr(module, "has_gate", False):
        return "experts without a gate (up and down projections only)"
    if getattr(module, "has_post_expert_norm", False):
        return "a norm after each expert"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallelism"
    kind = type(module)
    if kind not in experts.gates:
        experts.gates[kind] = _gate_kind(module)
    if experts.gates[kind] is None:
        return "a gate function other than SwiGLU or gpt-oss's clamped SwiGLU"
    return None


def _as_ops_take(gate_up, down, transposed: bool) -> tuple:
    """The weights (or their fp32 gradients) as the ops take them, [E, N, K]: gpt-oss stores its transposed."""
    return (gate_up.transpose(1, 2), down.transpose(1, 2)) if transposed else (gate_up, down)


def _lora_views(A: torch.Tensor, B: torch.Tensor, num_experts: int) -> tuple:
    """peft's experts adapters A[r·E, in], B[out, r·E] (or their fp32 gradients) as the ops' weights: A_e
    [E, r, in] and B_e [E, out, r] (B's r·E axis is [r, E]: a strided view)."""
    return A.view(num_experts, -1, A.shape[1]), B.view(B.shape[0], -1, num_experts).permute(2, 0, 1)


class _GroupedExperts(torch.autograd.Function):
    """y[T, H] = Σ_j w[t, j] · down_e(gate(gate_up_e(x[t]))) over each token's k experts; backward by the ops.
    With LoRA on an experts weight W (adapters a, b), W_e's product gains s · (· A_eᵀ) B_eᵀ: two more grouped
    GEMMs through rank r, in the rows' expert order (``rows``: the identity order)."""

    @staticmethod
    def forward(ctx, x, weights, gate_up, gate_up_bias, down, down_bias, a_gu, b_gu, a_d, b_d, ids, ops, gate,
                transposed, scale, accumulators):
        E, k = gate_up.shape[0], ids.shape[1]
        order, offsets = ops.moe_permute(ids.to(torch.int32), E)
        # the identity order of the rank-r products (LoRA only): their rows are already in expert order
        rows = None if a_gu is None and a_d is None else torch.arange(order.shape[0], dtype=torch.int32,
                                                                      device=x.device)
        w_gu, w_d = _as_ops_take(gate_up, down, transposed)
        gu = ops.moe_gate_up_forward(x, order, offsets, k, w_gu, gate_up_bias)
        xa = ha = None
        if a_gu is not None:
            A, B = _lora_views(a_gu, b_gu, E)
            xa = ops.moe_gate_up_forward(x, order, offsets, k, A)                    # [T·k, r], expert order
            gu = gu + scale * ops.moe_gate_up_forward(xa, rows, offsets, 1, B)
        h = ops.swiglu_forward(gu) if gate == "swiglu" else ops.clamped_swiglu_forward(gu, *gate)
        o = ops.moe_down_forward(h, order, offsets, w_d, down_bias)
        if a_d is not None:
            A, B = _lora_views(a_d, b_d, E)
            ha = ops.moe_gate_up_forward(h, rows, offsets, 1, A)                     # [T·k, r], expert order
            o = o + scale * ops.moe_down_forward(ha, order, offsets, B)
        weights32 = weights.float()
        ctx.save_for_backward(x, weights32, gu, h, o, order, offsets, rows, xa, ha)
        ctx.params = (gate_up, gate_up_bias, down, down_bias, a_gu, b_gu, a_d, b_d)
        ctx.ops, ctx.gate, ctx.transposed, ctx.k, ctx.scale = ops, gate, transposed, k, scale
        ctx.weights_dtype, ctx.accumulators = weights.dtype, accumulators
        return ops.moe_combine_forward(o, weights32)

    @staticmethod
    def backward(ctx, dy):
        x, weights32, gu, h, o, order, offsets, rows, xa, ha = ctx.saved_tensors
        ops, params, s, E = ctx.ops, ctx.params, ctx.scale, ctx.params[0].shape[0]
        # fp32 buffers the ops accumulate into: the template's accumulators, else fresh ones returned to autograd
        buffers, fresh = [], []
        for p, need in zip(params, ctx.needs_input_grad[2:10]):
            acc = ctx.accumulators.get(id(p)) if need else None
            fresh.append(need and acc is None)
            buffers.append(torch.zeros(p.shape, dtype=torch.float32, device=p.device) if fresh[-1] else acc)
        w_gu, w_d = _as_ops_take(params[0], params[2], ctx.transposed)
        d_gu_w, d_d_w = (None, None) if buffers[0] is None else _as_ops_take(buffers[0], buffers[2], ctx.transposed)
        d_o, d_weights = ops.moe_combine_backward(dy.contiguous(), o, weights32)
        dh = ops.moe_down_backward(d_o, h, order, offsets, w_d, d_d_w, buffers[3])
        if ha is not None:
            (A, B), (dA, dB) = _lora_views(params[6], params[7], E), _adapter_buffers(buffers[6:8], E)
            d_ha = ops.moe_down_backward(d_o * s, ha, order, offsets, B, dB)             # [T·k, r]
            dh = dh + ops.moe_gate_up_backward(d_ha, h, rows, offsets, 1, A, dA)
        d_gu = ops.swiglu_backward(dh, gu) if ctx.gate == "swiglu" else ops.clamped_swiglu_backward(dh, gu, *ctx.gate)
        dx = ops.moe_gate_up_backward(d_gu, x, order, offsets, ctx.k, w_gu, d_gu_w, buffers[1])
        if xa is not None:
            (A, B), (dA, dB) = _lora_views(params[4], params[5], E), _adapter_buffers(buffers[4:6], E)
            d_xa = ops.moe_gate_up_backward(d_gu * s, xa, rows, offsets, 1, B, dB)        # [T·k, r]
            dx = dx + ops.moe_gate_up_backward(d_xa, x, order, offsets, ctx.k, A, dA)
        grads = [buffer.to(p.dtype) if give else None for buffer, p, give in zip(buffers, params, fresh)]
        return (dx, d_weights.to(ctx.weights_dtype), *grads, None, None, None, None, None, None)


def _adapter_buffers(buffers: list, num_experts: int) -> tuple:
    """(dA, dB) as the ops' fp32 weight gradients, or (None, None) for frozen adapters."""
    dA, dB = buffers
    return (None, None) if dA is None else _lora_views(dA, dB, num_experts)


class _Abandoned(Exception):
    """Raised in a worker whose meeting another worker's exception ended (that exception reaches the caller)."""


def _merge_key(args: tuple) -> tuple:
    """What experts calls must share to run as one: the module's weights and adapters, ops, gate, layout, LoRA
    scale and gradient accumulators (the tokens, their routing weights and expert ids are concatenated)."""
    return (*map(id, args[2:10]), id(args[11]), args[12], args[13], args[14], id(args[15]) if args[15] else None)


class Meeting:
    """Micro-batches' calls of one decoder layer (``run``), each in a worker thread of its own, taking turns: one
    thread computes at a time (a baton passed in worker order, so the work and its order are those of one thread),
    and a worker gives the baton on when it finishes or reaches an experts call (``arrive``). When the baton
    comes back to a worker waiting in an experts call, every unfinished worker waits in one: their calls run as
    one grouped computation over all their tokens (one per experts module) and each gets its rows back. A worker
    whose micro-batch calls the experts more often (a layer run once per packed document) meets the others as
    long as they call too, then goes on alone. An exception in any worker ends every other one where it waits
    and is raised by ``run``."""

    def __init__(self, count: int):
        self._changed = threading.Condition()
        self._turn = 0                       # the worker holding the baton
        self._live = list(range(count))      # workers not finished, in order
        self._waiting: dict = {}             # worker -> its experts call's arguments, until the grouped call
        self._results: dict = {}             # worker -> its rows of the grouped call's output
        self._error: BaseException | None = None

    def run(self, calls: list) -> list:
        """calls[m]() in worker m's thread, with the caller's experts state, grad and inference mode, CUDA stream
        and dispatch modes (all per thread); their results in order."""
        state = dict(vars(_state))
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        stream = torch.cuda.current_stream() if torch.cuda.is_initialized() else None
        modes = _get_current_dispatch_mode_stack()
        results = [None] * len(calls)

        def work(m: int) -> None:
            try:
                self._wait_turn(m)       # the modes' flags (shared objects) are entered and left with the baton
                with contextlib.ExitStack() as context:
                    vars(_state).update(state, meeting=(self, m))
                    context.enter_context(torch.inference_mode(inference))
                    context.enter_context(torch.set_grad_enabled(grad))
                    if stream is not None:
                        context.enter_context(torch.cuda.stream(stream))
                    for mode in modes:
                        context.enter_context(mode)
                    results[m] = calls[m]()
            except BaseException as error:       # noqa: B036 -- re-raised by run, in the caller's thread
                with self._changed:
                    if self._error is None and not isinstance(error, _Abandoned):
                        self._error = error
                    self._changed.notify_all()
            finally:
                with self._changed:
                    self._live.remove(m)
                self._pass(m)

        threads = [threading.Thread(target=work, args=(m,), name=f"horizon-layer-{m}", daemon=True)
                   for m in range(len(calls))]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException as error:       # noqa: B036 -- interrupted: the workers stop where they wait
            with self._changed:
                self._error = self._error or error
                self._changed.notify_all()
            raise
        if self._error is not None:
            raise self._error
        return results

    def arrive(self, m: int, args: tuple) -> torch.Tensor:
        """Worker m's experts call (_GroupedExperts' arguments): waits for the others', returns its rows."""
        self._waiting[m] = args
        self._pass(m)
        self._wait_turn(m)
        if m not in self._results:
            self._run_waiting()
        return self._results.pop(m)

    def _wait_turn(self, m: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._turn == m or self._error is not None)
            if self._error is not None:
                raise _Abandoned()

    def _pass(self, m: int) -> None:
        """The baton goes to the next unfinished worker after m (wrapping around)."""
        with self._changed:
            if self._live:
                self._turn = next((n for n in self._live if n > m), self._live[0])
            self._changed.notify_all()

    def _run_waiting(self) -> None:
        """Every unfinished worker waits in an experts call: one grouped computation per experts module."""
        groups: dict = {}
        for m in sorted(self._waiting):
            groups.setdefault(_merge_key(self._waiting[m]), []).append(m)
        for members in groups.values():
            calls = [self._waiting.pop(m) for m in members]
            first = calls[0]
            if len(calls) == 1:
                self._results[members[0]] = _GroupedExperts.apply(*first)
                continue
            x, weights, ids = (torch.cat([call[i] for call in calls]) for i in (0, 1, 10))
            out = _GroupedExperts.apply(x, weights, *first[2:10], ids, *first[11:])
            for m, rows in zip(members, out.split([call[0].shape[0] for call in calls])):
                self._results[m] = rows


def experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """transformers' experts signature: hidden_states[T, H], the router's top_k_index / top_k_weights [T, k]."""
    experts = getattr(_state, "experts", None)
    reason = "outside the engine's layers" if experts is None else _refusal(experts, module, hidden_states)
    if reason is None:
        gate_up, gate_up_bias, down, down_bias = (module.gate_up_proj, getattr(module, "gate_up_proj_bias", None),
                                                  module.down_proj, getattr(module, "down_proj_bias", None))
        if not getattr(module, "has_bias", False):
            gate_up_bias = down_bias = None
        accumulators = getattr(_state, "accumulators", None) or {}
        adapters, scale = getattr(_state, "lora", None) or ({}, 0.0)
        adapted = adapters.get(id(module), {})
        a_gu, b_gu = adapted.get("gate_up_proj", (None, None))
        a_d, b_d = adapted.get("down_proj", (None, None))
        args = (hidden_states.contiguous(), top_k_weights, gate_up, gate_up_bias, down, down_bias, a_gu, b_gu, a_d,
                b_d, top_k_index, experts.ops, experts.gates[type(module)], getattr(module, "is_transposed", False),
                scale, accumulators)
        meeting = getattr(_state, "meeting", None)
        return _GroupedExperts.apply(*args) if meeting is None else meeting[0].arrive(meeting[1], args)
    adapters = (getattr(_state, "lora", None) or ({}, 0.0))[0]
    if id(module) in adapters:
        raise ValueError(f"lora_target_parameters: {type(module).__name__} cannot carry LoRA adapters here: its "
                         f"experts run transformers' code ({reason}), which would ignore them; adapt other weights")
    if experts is not None and reason not in experts.announced:
        experts.announced.add(reason)
        log.info("horizon-triton: %s runs transformers' %s experts instead of the kernels: %s",
                 type(module).__name__, experts.fallback, reason)
    fallback = "grouped_mm" if experts is None else experts.fallback
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    if fallback in ALL_EXPERTS_FUNCTIONS:
        return ALL_EXPERTS_FUNCTIONS[fallback](module, hidden_states, top_k_index, top_k_weights)
    # the class's own loop, which transformers' decorator wraps
    return type(module).forward.__wrapped__(module, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    ALL_EXPERTS_FUNCTIONS.register(NAME, experts_forward)
