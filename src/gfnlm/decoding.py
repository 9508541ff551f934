"""A lean decode step for Llama-architecture policies: the sampler's hot loop without the overhead.

On a small batch, one decode step of a small LM is mostly overhead around its matrix products: a
KV cache that grows by concatenation every token, the module and hook machinery of the model and of
PEFT's adapter layers, and a general matrix product that re-packs each weight on every call. For a
``LlamaForCausalLM`` (plain, or with PEFT LoRA adapters) :class:`LlamaDecoder` runs the same step
from the model's own modules and weights with

* a static KV cache, allocated once per batch of episodes and written in place;
* on a CPU with oneDNN and frozen fp32 weights (LoRA, or a model that is not trained), each linear
  layer's weight packed once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``
  and ``_linear_pointwise``, the kernels PyTorch's own compiler uses for frozen weights on CPU). On 16
  rows, with each weight read once per step as in decoding, this ran the products of a SmolLM2-135M step
  in 65 ms against 120 ms for ``F.linear`` and 108 ms for MKL's packed product (``bench/decode_kernels.py``,
  2-core AMD EPYC); the results differ from ``F.linear`` by float rounding (up to 4e-5 on those products). The packed copies, q/k/v and gate/up
  concatenated, cost one more copy of the linear weights in memory per decoder (eager and compiled
  decoders each have one); they are kept, per model, while the base weights do not change (LoRA: for
  the whole run);
* each LoRA update computed as scale * B(A(x)) from the adapters' current weights, as PEFT does,
  with the adapters reading the same input (q, k, v; gate, up) fused into one product;
* attention of the one new query written out as two small products (a fused kernel is mostly call
  overhead at this size);
* optionally (``compile_decoder``), the layers of the step compiled by :func:`torch.compile` into one
  graph with shapes that do not change from token to token (the cache length dynamic, so one
  compilation serves every prompt length; a new batch size compiles again). The packed products enter
  the graph through the custom operator ``gfnlm::packed_linear`` (an opaque packed tensor cannot be
  traced); the LM head runs after the graph.

Its logits equal the model's own forward to float rounding (tested against it). Everything else (other
architectures or replaced Llama modules, forward hooks, an adapter PEFT cannot express as base + scale * B A
or one that is merged, dropout active, autocast, weights on the meta device, on several devices or sharded)
is left to the model's forward: :meth:`LlamaDecoder.for_model` returns None. The packed copies are checked
against the model's current weight tensors and their version counters at every call; a write through
``.data`` bypasses the version counter and is not seen (sample with ``fast_decode=False`` after one).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .policy import adapter_layers, plain_lora

logger = logging.getLogger(__name__)


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._linear_pointwise) \
            and callable(torch.ops.mkldnn._reorder_linear_weight)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_linear_available()
# Packed weights by handle. A packed oneDNN weight is an opaque tensor that torch.compile cannot trace,
# so a compiled step reaches it through the custom operator ``gfnlm::packed_linear`` by an integer
# handle; handles are stable per model, decoder kind and layer group (a rebuilt decoder reuses them, so
# its compiled step is not recompiled), and are dropped with the model.
_PACKED: dict[int, Tensor] = {}
_SLOTS: "weakref.WeakKeyDictionary[nn.Module, dict[bool, int]]" = weakref.WeakKeyDictionary()
_NEXT_SLOT = [0]
_PER_SLOT = 1 << 16


def _slot(lm: nn.Module, compiled: bool) -> int:
    """The handle block of ``lm``'s eager (False) or compiled (True) decoder."""
    slots = _SLOTS.get(lm)
    if slots is None:
        slots = _SLOTS[lm] = {}
        weakref.finalize(lm, _drop_slots, slots)
    if compiled not in slots:
        slots[compiled] = _NEXT_SLOT[0]
        _NEXT_SLOT[0] += 1
    return slots[compiled]


def _drop_slots(slots: dict[bool, int]) -> None:
    for slot in slots.values():
        for h in [h for h in _PACKED if h // _PER_SLOT == slot]:
            del _PACKED[h]


def _packed_linear(x: Tensor, handle: int, out_features: int) -> Tensor:
    """``x`` [B, in] times the packed weight ``handle`` [out_features, in], transposed: [B, out_features]."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[handle], None, "none", [], "")


def _packed_linear_shape(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty((x.shape[0], out_features))


# registered on the dispatcher's CPU key directly: torch.library.custom_op's Python dispatch cost about
# 70 us a call here, 2400 calls per sample of 20 tokens
_LIB = torch.library.Library("gfnlm", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, int handle, int out_features) -> Tensor")
_LIB.impl("packed_linear", _packed_linear, "CPU")
torch.library.register_fake("gfnlm::packed_linear", _packed_linear_shape, lib=_LIB)


# per model, its decoder for eager steps (False) and for compiled steps (True)
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, dict[bool, LlamaDecoder]]" = weakref.WeakKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (through PEFT's ``PeftModel`` and DDP's ``module``)."""
    base = model
    while hasattr(base, "get_base_model") or hasattr(base, "module"):
        base = base.get_base_model() if hasattr(base, "get_base_model") else base.module
    return base


class _Linears:
    """Linear layers that read the same input, as one product [B, in] -> [B, sum of outs] split into
    their outputs. With ``pack_rows`` (frozen fp32 weights on a CPU with oneDNN) the base weights are
    concatenated once and packed for oneDNN's product on ``pack_rows`` rows, under the integer ``handle``
    (how a compiled step finds them); else the layers' current weight
    tensors are read at every step (no copy, so a trained or swapped weight is always current). The LoRA
    updates of the layers that carry one run as one low-rank product (their A matrices stacked, their B
    matrices block-diagonal with the scale folded in)."""

    def __init__(self, layers: list[nn.Module], pack_rows: int | None, handle: int):
        self.layers = layers
        self.bases = [_base_layer(m) for m in layers]
        self.sizes = [b.weight.shape[0] for b in self.bases]
        self.source = self.handle = None
        if pack_rows:
            ws = [b.weight for b in self.bases]
            with torch.no_grad():
                weight = ws[0].detach() if len(ws) == 1 else torch.cat([w.detach() for w in ws])
                _PACKED[handle] = torch.ops.mkldnn._reorder_linear_weight(weight, pack_rows)
            self.source = [(w, w._version) for w in ws]  # the tensors packed, and their versions then
            self.handle = handle
        self.lora_a = self.lora_b = None

    def still_valid(self) -> bool:
        """False if packed copies were made and a layer's weight is since another tensor, or was written
        in place."""
        return self.source is None or all(b.weight is w and w._version == v
                                          for b, (w, v) in zip(self.bases, self.source))

    @torch.no_grad()
    def load_adapters(self) -> None:
        """Read the adapters' current A, B and scale (they change every optimiser step)."""
        names = [_lora_name(m) for m in self.layers]
        self.lora_a = self.lora_b = None
        if all(n is None for n in names):
            return
        self.lora_a = torch.cat([m.lora_A[n].weight for m, n in zip(self.layers, names) if n])  # [R, in]
        ref = self.lora_a
        self.lora_b = ref.new_zeros((sum(self.sizes), ref.shape[0]))  # [sum outs, R], block-diagonal
        row = col = 0
        for m, n, size in zip(self.layers, names, self.sizes):
            if n:
                b = m.lora_B[n].weight
                self.lora_b[row:row + size, col:col + b.shape[1]] = b * m.scaling[n]
                col += b.shape[1]
            row += size

    def __call__(self, x: Tensor) -> list[Tensor]:
        if self.handle is not None and torch.compiler.is_compiling():  # (the packed tensor cannot be traced)
            y = torch.ops.gfnlm.packed_linear(x, self.handle, sum(self.sizes))
        elif self.handle is not None:
            y = _packed_linear(x, self.handle, sum(self.sizes))
        elif len(self.bases) == 1:
            y = F.linear(x, self.bases[0].weight)
        else:
            y = torch.cat([F.linear(x, b.weight) for b in self.bases], dim=-1)
        if self.lora_a is not None:
            u = F.linear(x.to(self.lora_a.dtype), self.lora_a)  # [B, R]
            y = torch.addmm(y, u, self.lora_b.t()) if u.dtype == y.dtype else (y + F.linear(u, self.lora_b)).to(y.dtype)
        return [y] if len(self.sizes) == 1 else list(y.split(self.sizes, dim=-1))


@dataclass
class DecodeCache:
    """The static KV cache of one batch of episodes (one per :func:`gfnlm.sampling.sample` call, so two
    calls on the same model never share one).

    Attributes:
        keys, values: per layer [B, kv_heads, L + steps, head_dim].
        mask: [B, 1, 1, L + steps] bool, True at the positions filled with real tokens.
        filled: positions written so far (L after :meth:`LlamaDecoder.begin`).
    """

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor
    filled: int


class LlamaDecoder:
    """One decode step of a ``LlamaForCausalLM`` (with or without LoRA) over a static KV cache.

    Use: ``dec = LlamaDecoder.for_model(model, rows)`` (None if it does not apply), then per batch of
    episodes ``kv = dec.begin(cache, attention_mask, steps)`` with the model's own KV cache of the
    prompts, and per token ``logits = dec.step(kv, ids, positions)``.
    """

    def __init__(self, lm: nn.Module, pack_rows: int | None, compiled: bool = False):
        body = lm.model
        self.compiled = compiled
        first = _slot(lm, compiled) * _PER_SLOT
        handles = iter(range(first, first + _PER_SLOT))
        group = lambda ms: _Linears(ms, pack_rows, next(handles))  # noqa: E731
        self.embed, self.norm, self.rotary = body.embed_tokens, body.norm, body.rotary_emb
        self.blocks = []
        for layer in body.layers:
            a, f = layer.self_attn, layer.mlp
            self.blocks.append((layer.input_layernorm, group([a.q_proj, a.k_proj, a.v_proj]), a.scaling,
                                group([a.o_proj]), layer.post_attention_layernorm,
                                group([f.gate_proj, f.up_proj]), f.act_fn, group([f.down_proj])))
        head = lm.get_output_embeddings()
        self.head = group([head]) if pack_rows else head
        cfg = lm.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = body.layers[0].self_attn.head_dim
        self.pack_rows = self.last_rows = pack_rows
        self.modules = _modules(lm)

    # ------------------------------------------------------------------ when it applies

    @classmethod
    def for_model(cls, model: nn.Module, rows: int, compiled: bool = False) -> "LlamaDecoder | None":
        """The decoder of ``model`` for batches of ``rows`` episodes, or None where the model's own
        forward must run (see the module docstring). Packed weights are reused across calls while the
        model's weights are the same tensors, unchanged; they are packed for the batch size, and
        packed again for a new size that comes twice in a row. ``compiled``: run the step's layers
        through :func:`torch.compile` (see :meth:`_compiled_body`)."""
        lm = unwrap(model)
        if not _supported(lm):
            return None
        frozen = all(not _base_layer(m).weight.requires_grad
                     for layer in lm.model.layers for m in _projections(layer))
        w = lm.model.embed_tokens.weight
        pack = rows if (_ONEDNN and frozen and w.device.type == "cpu" and w.dtype == torch.float32) else None
        dec = _DECODERS.setdefault(lm, {}).get(compiled)
        if dec is None or (dec.pack_rows is None) != (pack is None) or dec.modules != _modules(lm) \
                or not all(g.still_valid() for g in dec._groups()) \
                or (pack is not None and pack != dec.pack_rows and rows == dec.last_rows):
            # (a pack for another batch size still computes the same numbers, more slowly: it is
            # replaced only when the new size comes twice in a row, so alternating sizes never repack)
            dec = cls(lm, pack, compiled)
            _DECODERS[lm][compiled] = dec
        dec.last_rows = rows
        for g in dec._groups():
            g.load_adapters()
        return dec

    def _groups(self) -> list[_Linears]:
        gs = [g for b in self.blocks for g in (b[1], b[3], b[5], b[7])]
        return gs + ([self.head] if isinstance(self.head, _Linears) else [])

    # ------------------------------------------------------------------ decoding

    def begin(self, cache, attention_mask: Tensor, steps: int) -> DecodeCache:
        """A static cache holding the prompts' KV cache (a transformers cache of B rows and L positions,
        e.g. after ``batch_select_indices``) with room for ``steps`` more tokens. ``attention_mask``
        [B, L] marks the cached positions that are real (not left padding)."""
        B, L = attention_mask.shape
        keys, values = [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # [B, kv_heads, L, head_dim]
            kk = k.new_zeros((B, k.shape[1], L + steps, k.shape[3]))
            vv = v.new_zeros((B, v.shape[1], L + steps, v.shape[3]))
            kk[:, :, :L] = k
            vv[:, :, :L] = v
            keys.append(kk)
            values.append(vv)
        mask = torch.zeros((B, 1, 1, L + steps), dtype=torch.bool, device=attention_mask.device)
        mask[:, 0, 0, :L] = attention_mask.bool()
        if self.compiled:  # one compilation for every cache length
            for x in (*keys, *values):
                torch._dynamo.mark_dynamic(x, 2)
            torch._dynamo.mark_dynamic(mask, 3)
        return DecodeCache(keys, values, mask, L)

    def step(self, kv: DecodeCache, ids: Tensor, positions: Tensor) -> Tensor:
        """Append tokens ``ids`` [B] at position ids ``positions`` [B] to ``kv``; returns next-token
        logits [B, V]. The layers run through :func:`_static_body`, eagerly or compiled (the LM head
        after them, packed where it can be)."""
        index = torch.tensor([kv.filled], device=ids.device)
        if self.compiled:
            x = self._compiled_body(kv, ids.contiguous(), positions.contiguous(), index)
        else:
            x = _static_body(self, kv.keys, kv.values, kv.mask, ids, positions, index)
        kv.filled += 1
        return self.head(x)[0] if isinstance(self.head, _Linears) else self.head(x)

    def _compiled_body(self, kv: DecodeCache, ids: Tensor, positions: Tensor, index: Tensor) -> Tensor:
        """:func:`_static_body` through :func:`torch.compile`. The cache's length is marked dynamic, so
        one compilation serves every prompt length; a new batch size, or a model of other shapes,
        compiles again (after 8 compilations torch runs the body eagerly, with the same results). The
        seconds of the calls that compiled add up in :func:`compile_seconds`."""
        global _COMPILED_BODY, _COMPILE_SECONDS
        if _COMPILED_BODY is None:
            _COMPILED_BODY = torch.compile(_static_body, dynamic=False)
        before = _compilations()
        start = time.perf_counter()
        try:
            x = _COMPILED_BODY(self, kv.keys, kv.values, kv.mask, ids, positions, index)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler for inductor's CPU kernels
            raise ConfigError(f"compile_decoder: torch.compile failed ({_first_line(e)}); set compile_decoder "
                              "false, or install what it names (inductor needs a C++ compiler on CPU)") from e
        if _compilations() != before:
            took = time.perf_counter() - start
            _COMPILE_SECONDS += took
            logger.info("compile_decoder: compiled the decode step for %d rows in %.1f s", ids.shape[0], took)
        return x


_COMPILED_BODY = None
_COMPILE_SECONDS = 0.0


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0][:200] if lines else type(e).__name__


def compile_seconds() -> float:
    """Seconds this process has spent in decode steps that compiled (``compile_decoder``), each
    including the one step it ran."""
    return _COMPILE_SECONDS


def _compilations() -> int:
    """How many frames dynamo has compiled in this process (grows when a call compiles or recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _static_body(dec: LlamaDecoder, keys: list[Tensor], values: list[Tensor], mask: Tensor, ids: Tensor,
                 positions: Tensor, index: Tensor) -> Tensor:
    """The layers of one decode step (:meth:`LlamaDecoder.step`) with shapes that do not change from
    token to token, so that :func:`torch.compile` compiles it once: the step's cache slot ``index`` [1]
    is a tensor, the new key and value are written there with ``index_copy_``, and attention reads the
    whole static cache (``keys``, ``values``: per layer [B, kv_heads, T, head_dim]) under ``mask``
    [B, 1, 1, T], whose slot ``index`` is set here (the unfilled slots stay masked out). ``ids``,
    ``positions``: [B] tokens and their position ids. Returns the final normed hidden states [B, hidden]
    (the LM head is left to the caller)."""
    from transformers.models.llama.modeling_llama import rotate_half

    B, H, KV, D = ids.shape[0], dec.heads, dec.kv_heads, dec.head_dim
    mask.index_fill_(-1, index, True)
    h = dec.embed(ids)  # [B, hidden]
    cos, sin = dec.rotary(h, positions[:, None])  # [B, 1, D]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]
    for i, (norm1, qkv, scaling, o, norm2, gate_up, act, down) in enumerate(dec.blocks):
        q, k, v = qkv(_rms_norm(norm1, h))
        qk = torch.cat([q, k], -1).view(B, H + KV, 1, D)
        qk = qk * cos + rotate_half(qk) * sin
        keys[i].index_copy_(2, index, qk[:, H:])
        values[i].index_copy_(2, index, v.view(B, KV, 1, D))
        a = _attend(qk[:, :H], keys[i], values[i], mask, scaling)
        h = h + o(a.reshape(B, H * D))[0]
        g, u = gate_up(_rms_norm(norm2, h))
        h = h + down(act(g) * u)[0]
    return _rms_norm(dec.norm, h)


def _attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scaling: float) -> Tensor:
    """Attention of one new query per row, q [B, H, 1, D], over ``keys``, ``values`` [B, KV, T, D]
    where ``mask`` [B, 1, 1, T] is True; query head j reads key/value head j // (H / KV), as
    transformers' ``repeat_kv`` arranges them. Returns [B, KV, H / KV, D] (reshape to [B, H * D]).
    Written out as two small products: for one query, a fused attention kernel is mostly call overhead."""
    B, H, _, D = q.shape
    KV = keys.shape[1]
    w = torch.matmul(q.reshape(B, KV, H // KV, D), keys.transpose(-1, -2)) * scaling  # [B, KV, H/KV, T]
    w = torch.softmax(w.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(w, values)


def _rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)`` for a Llama RMSNorm: PyTorch's fused kernel on fp32 (the same numbers), else the module."""
    w = norm.weight
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(x, w.shape, w, norm.variance_epsilon)
    return norm(x)


def _projections(layer: nn.Module) -> list[nn.Module]:
    """The seven linear layers of a Llama decoder layer (LoRA-wrapped or not), in a fixed order."""
    a, f = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj]


def _base_layer(m: nn.Module) -> nn.Module:
    """The plain layer under a PEFT adapter layer (``m`` itself if it has none)."""
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def _modules(lm: nn.Module) -> list[nn.Module]:
    """The modules a decoder reads, in order (a decoder is rebuilt when any of them is replaced, e.g. by
    PEFT's ``merge_and_unload``)."""
    projections = [m for layer in lm.model.layers for m in _projections(layer)]
    return [lm.model.embed_tokens, lm.get_output_embeddings(), *projections]


def _lora_name(m: nn.Module) -> str | None | bool:
    """What an adapter layer adds to its base layer's output: the name of its one active plain LoRA
    adapter (:func:`gfnlm.policy.plain_lora`), None for nothing (not an adapter layer, adapters switched
    off, or no active adapter on this layer, which PEFT skips), False for what the decoder cannot run."""
    if not adapter_layers(m):
        return None
    if getattr(m, "disable_adapters", False) and not getattr(m, "merged", False):
        return None
    lora_a = getattr(m, "lora_A", None)
    if lora_a is not None and not getattr(m, "merged", False) \
            and not any(a in lora_a for a in getattr(m, "active_adapters", [])):
        return None
    return plain_lora(m) or False


# transformers' and PEFT's own hooks (output capture, inputs that require grad): no effect on outputs
_HARMLESS_HOOKS = {"output_capturing_hook", "make_inputs_require_grads", "make_inputs_require_grad"}


def _hooked(m: nn.Module) -> bool:
    """True if ``m`` has a forward or pre-forward hook that could change its output (not transformers'
    output-capturing hooks), or an Accelerate dispatch hook (offloaded or multi-device weights)."""
    if hasattr(m, "_hf_hook"):
        return True
    hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    return any(getattr(h, "__name__", None) not in _HARMLESS_HOOKS for h in hooks)


def _supported(lm: nn.Module) -> bool:
    """True if ``lm`` is transformers' own Llama, built of its own modules, whose decode step
    :class:`LlamaDecoder` reproduces exactly (up to float rounding)."""
    try:
        from transformers.models.llama import modeling_llama as ml
    except ImportError:
        return False
    if type(lm) is not ml.LlamaForCausalLM or type(lm.model) is not ml.LlamaModel:
        return False
    cfg, body = lm.config, lm.model
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1) or getattr(cfg, "_attn_implementation", "sdpa") not in (
            "sdpa", "eager", None) or len(body.layers) != cfg.num_hidden_layers:
        return False
    head = lm.get_output_embeddings()
    if type(body.embed_tokens) is not nn.Embedding or type(head) is not nn.Linear or head.bias is not None \
            or type(body.norm) is not ml.LlamaRMSNorm or type(body.rotary_emb) is not ml.LlamaRotaryEmbedding:
        return False
    devices = {p.device for p in lm.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return False
    if torch.is_autocast_enabled(next(iter(devices)).type):
        return False
    for m in lm.modules():
        if _hooked(m):
            return False
        if m.training and isinstance(m, nn.Dropout) and m.p > 0:  # each module's own flag decides
            return False
    lora = adapter_layers(lm)
    if any(_lora_name(m) is False for m in lora):
        return False  # an adapter other than plain LoRA, a merged one, or one on a module this decoder does not run
    handled = set()
    for layer in body.layers:
        a, f = layer.self_attn, layer.mlp
        if type(layer) is not ml.LlamaDecoderLayer or type(a) is not ml.LlamaAttention or type(f) is not ml.LlamaMLP \
                or type(layer.input_layernorm) is not ml.LlamaRMSNorm \
                or type(layer.post_attention_layernorm) is not ml.LlamaRMSNorm:
            return False
        if a.training and a.attention_dropout > 0:
            return False
        for m in _projections(layer):
            base = _base_layer(m)
            w = base.weight
            if type(base) is not nn.Linear or base.bias is not None or type(w.data) is not torch.Tensor \
                    or tuple(w.shape) != (base.out_features, base.in_features):  # e.g. a ZeRO-3 placeholder
                return False
            handled.add(id(m))
    return all(id(m) in handled for m in lora)  # not e.g. adapters on the embeddings or the output layer
