"""The MoE router's auxiliary load-balancing loss on the generic path, as transformers adds it to a causal LM's loss
when the config sets ``output_router_logits`` (``load_balancing_loss_func``, Switch Transformer eqs. 4-6), laid out
for the engine's schedule: the forward of every layer, then the backward layer by layer with recompute.

For one forward (a micro-batch m), over the router calls of every layer and every token t, with a_t its
attention-mask value (1, or 0 at padding; 1 everywhere without a mask):

    c_e = Σ a_t·[e among t's top-k]        p_e = Σ a_t·softmax(logits_t)_e        R = Σ a_t
    aux_m = E · Σ_e (c_e / R)·(p_e / R)

c (the token fractions' counts) is not differentiable; the gradient flows through p only, and p is a sum over
layers, so d(aux_m)/d(layer l's logits) = E/R² · Σ_e c_e · d(p_e of layer l). Hence:

- forward of layer l (no autograd): a forward hook on the layer's router module (the class transformers' model
  declares in ``_can_record_outputs["router_logits"]``, with the output index it records) gives its logits;
  they add to m's c, p, R (device tensors of [E], [E] and one element: nothing per token outlives the layer);
- after the head's forward, before the first backward (``finish_forward``, on the compute stream): every aux_m is
  known, and with it each micro-batch's weights w_m = coef·E·c_m / (M·R_m²) [E];
- backward of layer l: the recompute's router logits give Σ_e w_m,e · p_e(layer l), a scalar autograd
  differentiates together with the layer's output (its d_out), so the aux gradient reaches the router (and the
  layer's input, hence every layer below) in the same torch.autograd.grad call.

The step's objective, M being the step's micro-batches (over every data-parallel rank):

    loss = Σ_m CE_sum_m / (the step's counted tokens)  +  coef · (1/M) Σ_m aux_m

With one micro-batch this is transformers' ``outputs.loss`` (its token-mean cross-entropy + coef·aux). With
gradient accumulation each forward's aux loss is averaged over the step, so the balance term's weight does not
change with how a step is split into micro-batches or ranks. (transformers' Trainer, for these models, which take
``num_items_in_batch``, backpropagates each micro-batch's ``outputs.loss`` unscaled: the sum of the aux losses,
i.e. coef·M here.) The history reports ``loss`` (the objective) and ``aux_loss`` ((1/M) Σ_m aux_m, unscaled by
coef, as transformers' ``outputs.aux_loss``).
"""
from __future__ import annotations

import threading

import torch


def router_specs(text_model: torch.nn.Module) -> list:
    """transformers' recorders of the router logits of this text model's class: a list of (module class or None,
    class-name suffix or None, layer name or None, output index), as its output capture reads
    ``_can_record_outputs``; [] when the model declares none."""
    declared = (getattr(type(text_model), "_can_record_outputs", None) or {}).get("router_logits")
    if declared is None:
        return []
    specs = []
    for spec in declared if isinstance(declared, list) else [declared]:
        if hasattr(spec, "target_class"):                  # an OutputRecorder
            specs.append((spec.target_class, spec.class_name, spec.layer_name, spec.index))
        elif isinstance(spec, str):                        # transformers' shorthands: a class name, or a class
            specs.append((None, spec, None, 1))
        else:
            specs.append((spec, None, None, 1))
    return specs


class RouterBalance:
    """The auxiliary loss of one model (``sk``: its skeleton.Skeleton); raises when the model declares no router
    logits to record. ``of`` gives None when the config does not ask for the loss."""

    def __init__(self, sk, model_type: str):
        lm = sk.lm
        self.coef = float(lm.config.router_aux_loss_coef)
        self.num_experts = getattr(lm, "num_experts", None)
        self.top_k = getattr(lm, "num_experts_per_tok", None)
        self.specs = router_specs(sk.text_model)
        if not self.specs or self.num_experts is None or self.top_k is None:
            raise ValueError(f"model type {model_type!r}: the config asks for the router auxiliary loss "
                             "(output_router_logits=True, router_aux_loss_coef != 0), but transformers' "
                             f"{type(lm).__name__} declares no router logits to record (_can_record_outputs) or "
                             "no num_experts/num_experts_per_tok; set output_router_logits=False in config.json")
        self._calls = threading.local()          # routed: the router logits of the thread's layer call under way
        self.stats: dict = {}                    # id(micro-batch) -> [c, p, R] of the step's forward so far
        self.weights: dict = {}                  # id(micro-batch) -> w [E] fp32, from finish_forward
        self.micro_batches = 1
        self.step_aux = None                     # this rank's (1/M) Σ_m aux_m, a device scalar

    @property
    def routed(self) -> list | None:
        """The list the router hooks append to in this thread (a layer call per thread: experts.Meeting)."""
        return getattr(self._calls, "routed", None)

    @routed.setter
    def routed(self, value: list | None) -> None:
        self._calls.routed = value

    @classmethod
    def of(cls, sk, model_type: str) -> "RouterBalance | None":
        config = sk.lm.config
        asked = getattr(config, "output_router_logits", False) and getattr(config, "router_aux_loss_coef", 0)
        return cls(sk, model_type) if asked else None

    def attach(self, layers: torch.nn.ModuleList) -> None:
        """Hooks every router module of the decoder layers (their names as the text model's: layers.i.…)."""
        found = 0
        for i, layer in enumerate(layers):
            for name, module in layer.named_modules():
                full = f".layers.{i}.{name}."
                for target_class, class_name, layer_name, index in self.specs:
                    if not (target_class is not None and isinstance(module, target_class)
                            or class_name is not None and full.rstrip(".").endswith(class_name)):
                        continue
                    if layer_name is not None and f".{layer_name.strip('.')}." not in full:
                        continue
                    module.register_forward_hook(self._hook(index))
                    found += 1
        if not found:
            raise ValueError(f"the router auxiliary loss: no module of the decoder layers matches "
                             f"{self.specs} (transformers' _can_record_outputs['router_logits'])")

    def _hook(self, index: int):
        def record(module, args, output):
            if self.routed is not None:
                self.routed.append(output[index] if isinstance(output, (tuple, list)) else output)
        return record

    # ---- one step ---------------------------------------------------------------------------------------------
    def begin(self, mbs: list, micro_batches: int) -> None:
        """Host, at the start of a step of ``mbs``; ``micro_batches``: M, the step's micro-batches on every rank."""
        self.stats = {id(mb): None for mb in mbs}
        self.weights, self.micro_batches, self.step_aux = {}, micro_batches, None

    def end(self) -> None:
        """Host, after the step's last compute: forgets the micro-batches (step_aux stays, for the report)."""
        self.stats, self.weights = {}, {}

    def _mask(self, mb, logits: torch.Tensor) -> torch.Tensor | None:
        if mb.attention_mask is None:
            return None
        return mb.attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-token router probabilities fp32 [T, E] (softmax in the logits' dtype, as transformers)."""
        return torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1).float()

    def forward_layer(self, mb, routed: list) -> None:
        """Compute stream, forward of one layer of a micro-batch of the step: its router logits add to c, p, R."""
        if id(mb) not in self.stats:                   # a forward-only pass: no loss to form
            return
        E = self.num_experts
        for logits in routed:
            probs = self._probs(logits)
            mask = self._mask(mb, logits)
            chosen = torch.topk(probs, self.top_k, dim=-1).indices.reshape(-1)
            ones = torch.ones_like(chosen, dtype=torch.float32) if mask is None else mask.repeat_interleave(self.top_k)
            counts = torch.zeros(E, dtype=torch.float32, device=probs.device).scatter_add_(0, chosen, ones)
            prob_sum = (probs if mask is None else probs * mask[:, None]).sum(0)
            rows = probs.new_tensor(probs.shape[0]) if mask is None else mask.sum()
            stats = self.stats[id(mb)]
            if stats is None:
                self.stats[id(mb)] = [counts, prob_sum, rows]
            else:
                for total, part in zip(stats, (counts, prob_sum, rows)):
                    total += part

    def finish_forward(self, totals: dict, grad_scale: float) -> None:
        """Compute stream, after the head's forward: every micro-batch's aux loss and backward weights; the aux
        term joins totals["loss"], the step's loss sum, which the engine divides by the tokens (1/grad_scale)."""
        E, M = self.num_experts, self.micro_batches
        aux_sum = None
        for key, (counts, prob_sum, rows) in self.stats.items():
            rows = rows.clamp_min(1.0)           # a micro-batch of padding only: no routed token, no loss
            aux = E * (counts * prob_sum).sum() / (rows * rows)
            self.weights[key] = self.coef * E * counts / (M * rows * rows)
            aux_sum = aux if aux_sum is None else aux_sum + aux
        self.step_aux = aux_sum / M
        totals["loss"] = totals["loss"] + self.coef * self.step_aux / grad_scale

    def backward_term(self, mb, routed: list) -> torch.Tensor | None:
        """Under autograd, in the recompute of one layer: the scalar whose gradient is the aux loss's with respect
        to this layer's router logits (None: the layer has no router)."""
        if not routed:
            return None
        w = self.weights[id(mb)]
        term = None
        for logits in routed:
            probs = self._probs(logits)
            mask = self._mask(mb, logits)
            part = (probs if mask is None else probs * mask[:, None]).sum(0) @ w
            term = part if term is None else term + part
        return term
