"""The generic layer template: transformers' own decoder-layer modules, bound per call to views of a staging slot.

The modules are the model's, built on the meta device (skeleton.py): they hold no tensor of their own, and
``torch.func.functional_call`` runs one with the slot's views as its parameters, so nothing persists on the
device. The forward runs without autograd; the backward recomputes the layer from its checkpoint under autograd
and takes ``torch.autograd.grad`` for its input and its weights, which are added into the fp32 accumulator's
views: the graph lives for one layer of one micro-batch, and the boundary gradient is propagated by the scheduler
as for the hand-written template (models/dense/layer.py, whose signatures these methods share).

With LoRA (w holds adapters and w[LORA_SCALE], as the scheduler binds them after the base), each adapted nn.Linear
adds s · (x Aᵀ) Bᵀ to its output through a forward hook that lives for one call; the base views never require
grad, so the backward's autograd.grad gives the adapters' gradients alone (g's keys), and the head is frozen.

What the model computes around its layers is taken from its own code: once per micro-batch (``layer_inputs``)
the model's forward runs with its layers replaced by stand-ins that record what each is called with (masks per
layer kind, rotary tables per layer kind, position ids, ...), on an all-ones input, which also shows the factor
the model applies to the embedding before the first layer (Gemma's √H, Granite's multiplier). The embedding's
own scale (a scaled embedding module) is read off the module. The head is the model's final norm module, then
lm_head and the cross-entropy: the fused kernels, or with a logit transform (Gemma 2's soft-capping, Granite's
logit scaling) the same two passes written in torch.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import MutableMapping

import torch
from torch.func import functional_call

from ..dense.layer import LORA_SCALE
from ..ops import attention_refusal
from .attention import NAME, Kernels, LazyMask, documents, fused_attention_on, register
from .config import GenericConfig
from .experts import ADAPTABLE, Experts, Meeting, experts_gradients, experts_lora, experts_on, is_experts_module
from .experts import register as register_experts
from .router_balance import RouterBalance
from .skeleton import layer_buffers, skeleton
from .weights import layer_layouts

TOKEN_CHUNK = 4096          # tokens whose logits exist at once in the torch head (with a logit transform)


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer ``index`` in the model's forward: records its call, returns its input."""

    def __init__(self, layer: torch.nn.Module, index: int, calls: dict):
        super().__init__()
        for key, value in vars(layer).items():        # the plain attributes the model's forward may read
            if not key.startswith("_") and not isinstance(value, (torch.nn.Module, torch.Tensor)):
                setattr(self, key, value)
        self.index, self.calls = index, calls

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.index] = (hidden_states, args, kwargs)
        return hidden_states


def _masks_pairs(value) -> bool:
    """Whether a layer's call arguments hold a [B, 1, S, S] attention mask (which keeps packed documents apart)."""
    if isinstance(value, (tuple, list)):
        return any(_masks_pairs(v) for v in value)
    if isinstance(value, dict):
        return any(_masks_pairs(v) for v in value.values())
    return isinstance(value, LazyMask) or isinstance(value, torch.Tensor) and value.dim() == 4


def _reads_token_index(layer: torch.nn.Module) -> bool:
    """Whether the layer computes from each token's index in its row rather than its position: Llama 4's
    temperature-tuned NoPE attention scales queries by the index, so a packed document must run on its own to get
    the scales of its positions."""
    attn = getattr(layer, "self_attn", None)
    return bool(getattr(attn, "attn_temperature_tuning", False)) and not getattr(attn, "use_rope", True)


def _document_runs(doc_ids, shape: tuple[int, int]) -> list[tuple[int, int, int]] | None:
    """(row, start, end) of each packed document of a micro-batch of ``shape`` (doc_ids: its documents, or None),
    a masked token going with the run before it (the model's own padding mask covers it); None when no row packs
    more than one document."""
    if doc_ids is None:
        return None
    B, S = shape
    doc = doc_ids.cpu().long()
    kept = doc < S                                   # masked tokens are documents numbered from S (data.batch)
    last_kept = torch.where(kept, doc, -1).cummax(1).values
    starts = kept.clone()
    starts[:, 1:] &= doc[:, 1:] != last_kept[:, :-1]
    starts[:, 0] = True
    if int(starts.sum()) == B:
        return None
    runs = []
    for b in range(B):
        edges = starts[b].nonzero()[:, 0].tolist() + [S]
        runs += [(b, s, e) for s, e in zip(edges, edges[1:])]
    return runs


class _Bound(torch.nn.Module):
    """A decoder layer as the module functional_call binds weights to: its forward runs ``run()``, whose calls
    of the layer (from any thread) see the weights bound once, in the caller's thread."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, run):
        return run()


class GenericTemplate:
    """The layer template of a GenericConfig model on ``device``, computing in ``dtype``."""

    def __init__(self, cfg: GenericConfig, device: torch.device, dtype: torch.dtype):
        register()
        register_experts()
        sk = skeleton(cfg)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.layers = copy.deepcopy(sk.layers)          # meta modules: code and attributes, no weights
        self._bound = [_Bound(layer) for layer in self.layers]
        # transformers' fused experts modules: micro-batches through a layer together run them once (Meeting)
        self.fused_experts = any(is_experts_module(m) for m in self.layers.modules())
        # packed documents run apart in layers that count from the row's start: token-index scales (Llama 4's
        # NoPE layers), and chunked attention (Llama 4), whose chunks transformers 5.17 counts from the row's start
        hf = cfg.hf
        kinds = getattr(hf, "layer_types", None) or [None] * cfg.num_layers
        self.by_document = [_reads_token_index(layer) or kind == "chunked_attention"
                            for layer, kind in zip(self.layers, kinds)]
        self.eager = sk.lm.config._attn_implementation == "eager"    # the model's own choice of attention
        # and of experts (MoE); the layers call ours, which fall back to those choices
        self.experts_fallback = getattr(sk.lm.config, "_experts_implementation", None) or "grouped_mm"
        for module in self.layers.modules():
            config = getattr(module, "config", None)
            if hasattr(config, "_attn_implementation"):
                config._attn_implementation = NAME
            if hasattr(config, "_experts_implementation"):
                config._experts_implementation = NAME
        self.norm = copy.deepcopy(sk.text_model.norm)
        self.names = [[p.key for p in layout.params] for layout in layer_layouts(cfg)[1:-1]]
        # the layers' buffers: bound without a gradient, never trained (skeleton.layer_buffers)
        self.buffers = [{name for name, _ in layer_buffers(layer, f"layer {i}")} for i, layer in enumerate(self.layers)]
        self.softcap = getattr(hf, "final_logit_softcapping", None)
        scaling = getattr(hf, "logits_scaling", None)
        self.logit_scale = 1.0 / scaling if scaling else 1.0
        self.plain_head = self.softcap is None and self.logit_scale == 1.0
        self.router_balance = RouterBalance.of(sk, cfg.model_type)    # the MoE auxiliary loss, when asked
        if self.router_balance is not None:
            self.router_balance.attach(self.layers)
        self.announced: set = set()      # why layers fell back to transformers' attention or experts, logged once
        self.expert_gates: dict = {}     # experts class -> the gate function its _apply_gate computes (experts.py)
        self._model = self._build_model(sk)

    # ---- the model around its layers ------------------------------------------------------------------------
    def _build_model(self, sk) -> torch.nn.Module:
        """The text model with its layers replaced by recorders and a two-row embedding (never used: the forward
        gets inputs_embeds), on the device (on the CPU for the meta device, which has no values for the masks'
        data-dependent steps: layer_inputs); its config is the model's, with our attention implementation, and
        no final norm (the head has its own). The factor applied to the embedding before the first layer is
        found first, on the CPU."""
        small = self.cfg.hf
        small.vocab_size, small.pad_token_id, small.num_hidden_layers = 2, None, 0
        with torch.device("cpu"):
            model = type(sk.text_model)(small)
        module_scale = self._embedding_module_scale(model.embed_tokens)
        self.calls: dict = {}
        config = self.cfg.hf
        config._attn_implementation = NAME
        model.config = config
        model.layers = torch.nn.ModuleList(_Recorder(layer, i, self.calls) for i, layer in enumerate(sk.layers))
        model.norm = torch.nn.Identity()
        model = model.to(dtype=self.dtype).eval()
        scale = self._input_scale(model) * module_scale
        self._scales_embedding = float(scale) != 1.0
        self._embed_scale = scale.to(self.device)
        return model if self.device.type == "meta" else model.to(device=self.device)

    def _input_scale(self, model: torch.nn.Module) -> torch.Tensor:
        """The factor the model's forward applies to its input embeddings before the first layer, from a
        forward of an all-ones input (in self.dtype)."""
        ones = torch.ones(1, 2, self.cfg.hidden_size, dtype=self.dtype)
        with torch.no_grad(), documents(None, self.eager):
            model(inputs_embeds=ones, position_ids=torch.arange(2)[None], use_cache=False)
        first = self.calls[0][0]
        self.calls.clear()
        factor = first.flatten()[0]
        if not bool((first == factor).all()):
            raise ValueError(f"model type {self.cfg.model_type!r}: the model transforms its embeddings before the "
                             "first layer in a way other than a scale; not supported")
        return factor

    def _embedding_module_scale(self, embed: torch.nn.Module) -> torch.Tensor:
        """What the embedding module multiplies a looked-up row by (1 for a plain nn.Embedding), in self.dtype."""
        embed = embed.to(self.dtype)
        with torch.no_grad():
            embed.weight.fill_(1.0)
            return embed(torch.zeros(1, 1, dtype=torch.long))[0, 0, 0].clone()

    def layer_inputs(self, mb) -> dict:
        """{layer index: (args, kwargs)} of each decoder layer's call for micro-batch mb (made once, kept on mb).
        On the meta device the model runs on the CPU from mb.host_layout, and what it records is given to the
        layers as meta tensors of the same shapes, dtypes and sharing (on_meta)."""
        if mb.model_inputs is None:
            B, S = mb.shape
            meta = self.device.type == "meta"
            position_ids, doc_ids, attention_mask = mb.host_layout if meta else (
                mb.position_ids, mb.doc_ids, mb.attention_mask)
            # one row broadcast: the recorders return it untouched, only its shape matters to the model
            ones = torch.ones(1, 1, self.cfg.hidden_size, dtype=self.dtype,
                              device=position_ids.device).expand(B, S, -1)
            rows = self._record(ones, position_ids, attention_mask, doc_ids)
            runs = _document_runs(doc_ids, (B, S))
            # layers that do not keep packed documents apart (no mask: linear attention) or count from the row's
            # start run once per document, on that document's own layer inputs (recorded as for a sequence alone)
            apart = {i for i, call in rows.items() if self.by_document[i] or not _masks_pairs(call)}
            pieces = [] if runs is None or not apart else [
                (b, s, e, self._record(ones[:1, :e - s], position_ids[b:b + 1, s:e],
                                       None if attention_mask is None else attention_mask[b:b + 1, s:e], None))
                for b, s, e in runs]
            inputs = {i: (args, kwargs, [(b, s, e, *piece[i]) for b, s, e, piece in pieces] if i in apart and pieces
                          else None) for i, (args, kwargs) in rows.items()}
            mb.model_inputs = on_meta(inputs) if meta else inputs
        return mb.model_inputs

    def _record(self, ones, position_ids, attention_mask, doc_ids) -> dict:
        """{layer index: (args, kwargs)}: what the model's forward calls each decoder layer with, for inputs of
        ones' shape."""
        self.calls.clear()
        with torch.no_grad(), documents(doc_ids, self.eager):
            self._model(inputs_embeds=ones, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
        rows = {i: (args, kwargs) for i, (_, args, kwargs) in self.calls.items()}
        self.calls.clear()
        return rows

    @contextlib.contextmanager
    def _adapted(self, index: int, w: dict):
        """With LoRA adapters in w (w[LORA_SCALE] present): while inside, each adapted nn.Linear of layer
        ``index`` adds s · (x Aᵀ) Bᵀ to its output (peft's lora.Linear), by a forward hook removed on exit, and
        each adapted experts weight W_e adds s · B_e A_e (peft's ParamWrapper), computed by the experts
        (experts.experts_lora)."""
        handles, experts = [], {}
        try:
            if LORA_SCALE in w:
                s = w[LORA_SCALE]
                for name, module in self.layers[index].named_modules():
                    if name + ".lora_A" in w:
                        a, b = w[name + ".lora_A"], w[name + ".lora_B"]
                        handles.append(module.register_forward_hook(
                            lambda m, inputs, out, a=a, b=b: out + (inputs[0] @ a.t()) @ b.t() * s))
                    adapted = {weight: (w[f"{name}.{weight}.lora_A"], w[f"{name}.{weight}.lora_B"])
                               for weight in ADAPTABLE if f"{name}.{weight}.lora_A" in w}
                    if adapted:
                        experts[id(module)] = adapted
            with experts_lora(experts, w.get(LORA_SCALE, 0.0)):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _routed_layers(self, ops, index: int, w: dict, xs: list, mbs: list) -> list[tuple]:
        """Decoder layer ``index`` (0-based) on each micro-batch's x[T, H] with w's views as its weights (and
        adapters): [(its output [T, H], the router logits its call recorded: [] without the auxiliary loss)];
        attention on ops' kernels where they apply. The weights are bound once (functional_call of the layer's
        _Bound) for every micro-batch's call; with several micro-batches each call runs in a worker thread of its
        own and their MoE experts run as one over all their tokens (experts.Meeting)."""
        params = {"layer." + n: w[n] for n in self.names[index]}
        kernels = None if ops is None else Kernels(ops, lambda head_dim, dtype: attention_refusal(ops, head_dim, dtype),
                                                   self.announced)
        # without ops, the experts run as the caller's experts_on says (footprint.backward_bytes: the references)
        experts = None if ops is None else Experts(ops, self.experts_fallback, self.expert_gates, self.announced)
        calls = [lambda x=x, mb=mb: self._routed_call(index, x, mb, kernels, experts) for x, mb in zip(xs, mbs)]
        run = (lambda: [calls[0]()]) if len(calls) == 1 else (lambda: Meeting(len(calls)).run(calls))
        with self._adapted(index, w):
            return functional_call(self._bound[index], params, (run,), strict=False)

    def _routed_call(self, index: int, x: torch.Tensor, mb, kernels, experts) -> tuple:
        """One micro-batch's call of layer ``index`` (its weights bound): (output [T, H], its router logits)."""
        balance = self.router_balance
        routed = []
        if balance is not None:
            balance.routed = routed
        args, kwargs, runs = self.layer_inputs(mb)[index]
        B, S = mb.shape
        h = x.view(B, S, -1)
        if index == 0 and self._scales_embedding:
            h = h * self._embed_scale
        # runs: the layer keeps no packed documents apart (layer_inputs), each runs as a sequence of its own
        try:
            with fused_attention_on(h.device), contextlib.nullcontext() if experts is None else experts_on(experts), \
                    documents(mb.doc_ids if runs is None else None, self.eager, kernels):
                if runs is None:
                    out = self._call(index, h, args, kwargs)
                else:
                    rows = [[] for _ in range(B)]
                    for b, s, e, piece_args, piece_kwargs in runs:
                        rows[b].append(self._call(index, h[b:b + 1, s:e], piece_args, piece_kwargs))
                    out = torch.cat([torch.cat(row, dim=1) for row in rows])
        finally:
            if balance is not None:
                balance.routed = None
        if routed and runs is not None:      # run per document: the pieces, in token order
            routed = [torch.cat([logits.reshape(-1, logits.shape[-1]) for logits in routed])]
        return out.reshape(B * S, -1), routed

    def _call(self, index: int, h: torch.Tensor, args, kwargs) -> torch.Tensor:
        # a mapping among the kwargs is state the layers share (Gemma 4's keys and values, which its layers store
        # for assistant models even with nothing reused): each call writes into a fresh one, so no layer's
        # tensors outlive it in mb's recorded inputs
        kwargs = {k: type(v)() if isinstance(v, MutableMapping) else v for k, v in kwargs.items()}
        out = self.layers[index](h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # ---- decoder layer: the hand-written template's signatures ------------------------------------------------
    def decoder_forward(self, ops, cfg, w, x: torch.Tensor, mb, layer: int) -> torch.Tensor:
        """x[T, H] -> store layer ``layer``'s output (layer 1 is the first decoder layer)."""
        return self.decoders_forward(ops, cfg, w, [x], [mb], layer)[0]

    def decoders_forward(self, ops, cfg, w, xs: list, mbs: list, layer: int) -> list:
        """decoder_forward of several micro-batches, their MoE experts run as one (_routed_layers)."""
        with torch.no_grad():
            outs = []
            for mb, (out, routed) in zip(mbs, self._routed_layers(ops, layer - 1, w, xs, mbs)):
                if routed:
                    self.router_balance.forward_layer(mb, routed)
                outs.append(out)
            return outs

    def decoder_backward(self, ops, cfg, w, g, x: torch.Tensor, mb, d_out: torch.Tensor, layer: int) -> torch.Tensor:
        """Recomputes the layer under autograd from its input x, adds the gradients of what trains (g's keys: the
        layer's weights, or with LoRA its adapters alone, the base frozen; never a buffer) into g (fp32 views),
        returns d(x). With the router auxiliary loss, its gradient through this layer's router joins d_out's.
        MoE experts on the kernels add their weights' gradients into g themselves (experts_gradients)."""
        return self.decoders_backward(ops, cfg, w, g, [x], [mb], [d_out], layer)[0]

    def decoders_backward(self, ops, cfg, w, g, xs: list, mbs: list, d_outs: list, layer: int) -> list:
        """decoder_backward of several micro-batches: their recomputes (MoE experts run as one, _routed_layers)
        make one graph, and one torch.autograd.grad over it runs the experts' backward once (their weight
        gradients added once) and sums each trained weight's gradient over the micro-batches before adding it
        into g. Returns each micro-batch's d(x)."""
        buffers = self.buffers[layer - 1]
        with torch.enable_grad():
            trained = {n: w[n].detach().requires_grad_(True) for n in g if n not in buffers}
            inputs = [x.detach().requires_grad_(True) for x in xs]
            accumulators = {id(t): g[n] for n, t in trained.items()}
            with experts_gradients(accumulators):
                results = self._routed_layers(ops, layer - 1, {**w, **trained}, inputs, mbs)
                outputs, grad_outputs = [], []
                for mb, (out, routed), d_out in zip(mbs, results, d_outs):
                    outputs.append(out)
                    grad_outputs.append(d_out)
                    aux_term = self.router_balance.backward_term(mb, routed) if routed else None
                    if aux_term is not None:
                        outputs.append(aux_term)
                        grad_outputs.append(torch.ones_like(aux_term))
                grads = torch.autograd.grad(outputs, [*inputs, *trained.values()], grad_outputs, allow_unused=True)
        for name, grad in zip(trained, grads[len(inputs):]):
            if grad is not None:
                g[name] += grad
        return list(grads[:len(inputs)])

    # ---- head -----------------------------------------------------------------------------------------------
    def _final_norm(self, w, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.norm, {"weight": w["norm"]}, (x,))

    def head_norm(self, ops, cfg, w, x: torch.Tensor):
        """(x̂ = final_norm(x) [T, H], an empty tensor where the dense head keeps rstd: head_norm_backward
        recomputes the norm)."""
        with torch.no_grad():
            return self._final_norm(w, x), x.new_empty(0)

    def head_norm_backward(self, ops, w, g, x: torch.Tensor, rstd, d_xn: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xi, weight = x.detach().requires_grad_(True), w["norm"].detach().requires_grad_(True)
            xn = self._final_norm({"norm": weight}, xi)
            dx, d_weight = torch.autograd.grad(xn, (xi, weight), d_xn.to(xn.dtype))
        g["norm"] += d_weight
        return dx

    def head_forward_backward(self, ops, cfg, w, g, x: torch.Tensor, mb, grad_scale: float):
        """x[T, H] -> (summed loss, d(x) of grad_scale · loss), the whole vocabulary in one pass."""
        xn, _ = self.head_norm(ops, cfg, w, x)
        if self.plain_head:
            loss, d_xn = ops.linear_cross_entropy(xn, w["lm_head"], mb.targets, g["lm_head"], grad_scale)
        else:
            T = xn.shape[0]
            stats = [torch.full((T,), float("-inf"), device=xn.device), xn.new_zeros(T, dtype=torch.float32),
                     xn.new_zeros(T, dtype=torch.float32)]
            self.head_chunk_stats(ops, w, xn, mb, 0, stats)
            loss, lse = ops.cross_entropy_chunk_loss(*stats, mb.targets)
            d_xn = torch.zeros(xn.shape, dtype=torch.float32, device=xn.device)
            self.head_chunk_backward(ops, w, g, xn, mb, 0, lse, grad_scale, d_xn)
        return loss, self.head_norm_backward(ops, w, g, x, xn.new_empty(0), d_xn)

    def _logits(self, xn: torch.Tensor, rows: torch.Tensor):
        """(the model's logits of rows, fp32 [t, V_c], d(logits)/d(xn rowsᵀ) where it is not the constant
        logit_scale: with soft-capping)."""
        z = (xn @ rows.t()).float() * self.logit_scale
        if self.softcap is None:
            return z, None
        t = torch.tanh(z / self.softcap)
        return self.softcap * t, (1 - t * t) * self.logit_scale

    def head_chunk_logits(self, w, xn: torch.Tensor) -> torch.Tensor:
        """The model's logits [T, V_c] (fp32) of a vocabulary chunk's rows w["lm_head"], its logit transform
        applied (a forward-only pass: Engine.logits)."""
        return torch.cat([self._logits(xn[s:s + TOKEN_CHUNK], w["lm_head"])[0]
                          for s in range(0, xn.shape[0], TOKEN_CHUNK)])

    def head_chunk_stats(self, ops, w, xn: torch.Tensor, mb, start: int, stats) -> None:
        """Pass 1 over vocabulary chunk [start, start + V_c): running max, sum of exp and the target's logit."""
        if self.plain_head:
            return ops.cross_entropy_chunk_stats_(xn, w["lm_head"], mb.targets, start, *stats)
        row_max, row_sum, target_logit = stats
        rows = w["lm_head"]
        for s in range(0, xn.shape[0], TOKEN_CHUNK):
            z, _ = self._logits(xn[s:s + TOKEN_CHUNK], rows)
            new_max = torch.maximum(row_max[s:s + TOKEN_CHUNK], z.max(1).values)
            row_sum[s:s + TOKEN_CHUNK] = (row_sum[s:s + TOKEN_CHUNK] * torch.exp(row_max[s:s + TOKEN_CHUNK] - new_max)
                                          + torch.exp(z - new_max[:, None]).sum(1))
            row_max[s:s + TOKEN_CHUNK] = new_max
            local = mb.targets[s:s + TOKEN_CHUNK] - start
            inside = (local >= 0) & (local < rows.shape[0])
            picked = z.gather(1, local.clamp(0, rows.shape[0] - 1)[:, None])[:, 0]
            target_logit[s:s + TOKEN_CHUNK] += torch.where(inside, picked, 0.0)

    def head_chunk_backward(self, ops, w, g, xn: torch.Tensor, mb, start: int, lse: torch.Tensor, grad_scale,
                            d_xn: torch.Tensor) -> None:
        """Pass 2: d_xn fp32[T, H] and g["lm_head"] (this chunk's rows, None when frozen) accumulate."""
        if self.plain_head:
            return ops.cross_entropy_chunk_backward(xn, w["lm_head"], mb.targets, start, lse, grad_scale, d_xn,
                                                    g["lm_head"])
        rows = w["lm_head"]
        for s in range(0, xn.shape[0], TOKEN_CHUNK):
            e = s + TOKEN_CHUNK
            z, dz_draw = self._logits(xn[s:e], rows)
            dz = torch.exp(z - lse[s:e, None])
            targets = mb.targets[s:e]
            local = targets - start
            inside = (local >= 0) & (local < rows.shape[0])
            # -1 at each token's target column in this chunk of rows (0 added where it is in another chunk): no
            # data-dependent indexing, so the dry run's meta tensors take the same path
            dz.scatter_add_(1, local.clamp(0, rows.shape[0] - 1)[:, None], -inside.to(dz.dtype)[:, None])
            scale = grad_scale[s:e, None] if isinstance(grad_scale, torch.Tensor) else grad_scale
            dz = dz * scale * (targets != -100)[:, None]
            dz = dz * (dz_draw if dz_draw is not None else self.logit_scale)
            d_xn[s:e] += dz @ rows.float()
            if g["lm_head"] is not None:
                g["lm_head"] += dz.t() @ xn[s:e].float()


def on_meta(tree, storages: dict | None = None):
    """tree (tuples, lists, dicts) with each CPU tensor replaced by a meta tensor of its shape, strides and dtype;
    tensors sharing a storage share one of its size on meta (a rotary table given to every layer is one tensor)."""
    storages = {} if storages is None else storages
    if isinstance(tree, LazyMask):                  # built (on the CPU) and turned into meta only if a layer needs it
        if ("mask", id(tree)) not in storages:     # one copy however many layers share it (its checks done once)
            storages[("mask", id(tree))] = tree.converted(lambda t: on_meta(t, storages))
        return storages[("mask", id(tree))]
    if isinstance(tree, torch.Tensor):
        storage = tree.untyped_storage()
        if storage._cdata not in storages:
            storages[storage._cdata] = torch.empty(storage.nbytes(), dtype=torch.uint8, device="meta")
        base = storages[storage._cdata]
        return torch.empty(0, dtype=tree.dtype, device="meta").set_(
            base.untyped_storage(), tree.storage_offset(), tree.shape, tree.stride())
    if isinstance(tree, (tuple, list)):
        return type(tree)(on_meta(item, storages) for item in tree)
    if isinstance(tree, dict):
        return {key: on_meta(item, storages) for key, item in tree.items()}
    return tree
