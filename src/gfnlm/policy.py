"""The policy LM, wrapped once, and the one door to its base model.

GFlowNet fine-tuning trains a policy q(Z|X), usually a frozen base LM plus LoRA adapters, while
LM-likelihood rewards must score text with the *base* LM.  Two rules keep the two apart:

* :func:`wrap_policy` is the only place that adds adapters (PEFT's ``get_peft_model``).  The
  trainer calls it, and so does :func:`gfnlm.tasks.make_trainer` *before* a task builds its rewards,
  so no reward is ever built on a model that is wrapped afterwards.
* :class:`BaseLM` is the only way a reward reaches the base LM.  Whatever object it is given (a
  plain model, a ``PeftModel``, or a plain model into which PEFT later injected LoRA layers in
  place), inside ``with base_lm() as m`` every adapter layer of that module tree is switched off,
  the model is in eval mode (dropout off) and gradients are off.  With full fine-tuning there are
  no adapters to switch off: the trainer then gives the reward a frozen copy of the base model
  (:meth:`BaseLM.freeze_copy`, ``GFNConfig.base_model_copy``) or stops with an error.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from .errors import ConfigError


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """Every PEFT adapter layer (LoRA and other tuners, ``modules_to_save`` wrappers) in ``model``'s
    module tree, whether or not ``model`` is the ``PeftModel`` itself."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # no PEFT: no adapters
        return []
    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


@contextlib.contextmanager
def base_model(model: nn.Module):
    """Context in which ``model`` computes its base LM: every adapter layer off, eval mode (dropout
    off). Restores each layer's previous state, every ``requires_grad`` flag (PEFT's switch sets
    them) and the training flag on exit.

    Works on a ``PeftModel`` and on the plain model PEFT injected its layers into (the same
    module tree), so a reward holding either cannot see the adapters."""
    layers = adapter_layers(model)
    merged = [m for m in layers if getattr(m, "merged_adapters", None)]
    if merged:
        raise ConfigError("the policy's adapters are merged into the base weights, so the base model cannot be "
                          "recovered: unmerge them (model.unmerge_adapter()) before computing an LM reward")
    was_training = model.training
    was_disabled = [bool(m.disable_adapters) for m in layers]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    prompt_learning = getattr(model, "peft_config", None) and any(
        getattr(c, "is_prompt_learning", False) for c in model.peft_config.values())
    model.eval()
    try:
        for m in layers:
            m.enable_adapters(False)
        if prompt_learning:
            with model.disable_adapter():
                yield model
        else:
            yield model
    finally:
        for m, off in zip(layers, was_disabled):
            m.enable_adapters(not off)
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)


def plain_lora(m: nn.Module) -> str | None:
    """The adapter name if ``m`` is a PEFT LoRA ``Linear`` whose output is exactly base(x) + scale *
    B(A(x)) with one active adapter (no DoRA or other LoRA variant, no LoRA bias, not merged, not
    switched off) over a plain 2-D floating-point weight (not quantised, not sharded under FSDP /
    DeepSpeed ZeRO-3); else None."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return None
    if type(m) is not LoraLinear or m.merged or m.disable_adapters or len(m.active_adapters) != 1:
        return None
    name = m.active_adapters[0]
    if name not in m.lora_A or m.use_dora.get(name, False) or name in getattr(m, "lora_variant", {}) \
            or getattr(m, "lora_bias", {}).get(name, False):  # get_delta_weight leaves out a LoRA bias
        return None
    w = m.get_base_layer().weight
    if type(w) is not nn.Parameter or type(w.data) is not torch.Tensor or w.dim() != 2 \
            or tuple(w.shape) != (m.out_features, m.in_features) or not w.is_floating_point():
        return None
    return name


def _lora_merge_plan(model: nn.Module) -> list[tuple[nn.Module, str]] | None:
    """The (LoRA layer, adapter) pairs whose update can be folded into a copy of the base weight, or
    None when the adapters cannot all be merged that way (a layer :func:`plain_lora` rejects). No
    adapters: an empty list."""
    plan = []
    for m in adapter_layers(model):
        name = plain_lora(m)
        if name is None:
            return None
        plan.append((m, name))
    return plan


@contextlib.contextmanager
def merged_adapters(model: nn.Module, enabled: bool = True):
    """Context in which ``model`` computes the same policy with each LoRA update folded into a
    temporary copy of its base weight (W + scale * B A), with the adapter layers switched off.

    For decoding under ``no_grad``: one matrix product per linear layer instead of three, which on
    small batches is most of a decode step's cost (PEFT's extra kernels per layer). The original weight
    tensors are put back on exit, bit for bit (they are never written), so neither the policy nor the
    base model used by rewards moves; the merged copies (one more copy of the adapted weights) are
    freed. The outputs equal the unmerged model's up to float rounding (about 1e-6 in the logits of
    fp32 weights). Falls back to the model as it is (``enabled`` False, or adapters
    :func:`_lora_merge_plan` cannot merge)."""
    plan = _lora_merge_plan(model) if enabled else None
    if not plan:
        yield model
        return
    with torch.no_grad(), base_model(model):
        swapped = []
        try:
            for m, name in plan:
                base = m.get_base_layer()
                w = base.weight
                base._parameters["weight"] = nn.Parameter(w + m.get_delta_weight(name).to(w.dtype), requires_grad=False)
                swapped.append((base, w))
            yield model
        finally:
            for base, w in swapped:
                base._parameters["weight"] = w


class BaseLM:
    """The one handle through which a reward reads the base language model.

    Args:
        model: a causal LM (plain or ``PeftModel``), another :class:`BaseLM` (shares its module),
            or a zero-argument callable returning a model (resolved on first use).

    ``with handle() as m:`` yields a module whose outputs are the base model's: adapters off,
    eval mode, under ``torch.no_grad``.  A frozen copy made by :meth:`freeze_copy` has no
    adapters and no trainable parameters.
    """

    def __init__(self, model):
        if isinstance(model, BaseLM):
            model = model._model
        if model is None:
            raise ConfigError("an LM reward needs a model: pass the base model (or the policy) it scores with")
        self._model = model
        self.frozen_copy = False

    @property
    def module(self) -> nn.Module:
        """The model this handle reads (the factory's result if a callable was given)."""
        if callable(self._model) and not isinstance(self._model, nn.Module):
            self._model = self._model()
        return self._model

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def shares_weights_with(self, other: nn.Module) -> bool:
        """True if this handle's model and ``other`` hold the same parameter tensors (e.g. the
        policy under full fine-tuning)."""
        mine = {id(p) for p in self.module.parameters()}
        return any(id(p) in mine for p in other.parameters())

    def freeze_copy(self) -> "BaseLM":
        """Replace the model by a frozen deep copy of its base weights (no adapters, no grad, eval).
        Costs one more copy of the model's weights in memory. Returns self."""
        src = self.module
        with base_model(src):
            dup = copy.deepcopy(src)
        if adapter_layers(dup):
            raise ConfigError("cannot copy the base model out of a PEFT model: build the reward on the plain "
                              "model before wrapping it, or use LoRA (use_peft: true) so the adapters can be switched off")
        for p in dup.parameters():
            p.requires_grad_(False)
        dup.eval()
        self._model, self.frozen_copy = dup, True
        return self

    @contextlib.contextmanager
    def __call__(self):
        with torch.no_grad(), base_model(self.module) as m:
            yield m


def wrap_policy(model: nn.Module, use_peft: bool, peft_config=None, lora=None, seed: int | None = None) -> nn.Module:
    """The trainable policy, wrapped once: a ``PeftModel`` is returned as it is; else LoRA from
    ``peft_config`` (or ``lora()``, a factory of the default config, when ``use_peft``) is added with
    PEFT's ``get_peft_model``, its initial weights drawn after ``torch.manual_seed(seed)`` (the same
    on every rank and every run); with neither, every weight is made trainable (full fine-tuning)."""
    if seed is not None:
        torch.manual_seed(seed)
    if getattr(model, "peft_config", None):
        return model
    if peft_config is None and use_peft and lora is not None:
        peft_config = lora()
    if peft_config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def _fp32_forward(self, x, *args, **kwargs):
    """The output layer's forward with autocast off, from fp32 hidden states (see :func:`fp32_logits`)."""
    w = getattr(self, "weight", None)
    dtype = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 weights: fp32 logits; else the weights' dtype
        return type(self).forward(self, x.to(dtype), *args, **kwargs).float()


def fp32_logits(model: nn.Module) -> nn.Module:
    """Make ``model``'s output layer compute fp32 logits from fp32 hidden states even under autocast
    (mixed precision): the log q of the loss and every LM reward are read from fp32 logits, never
    from bf16 / fp16 ones. The body of the network still runs in the autocast dtype. Idempotent;
    changes no parameter or state-dict key (the layer's ``forward`` is rebound on the instance, so a
    deep copy of the model rebinds it to the copy's layer). Returns ``model``."""
    import types

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head.forward, "__func__", None) is not _fp32_forward:
        head.forward = types.MethodType(_fp32_forward, head)
    return model


def bind_base_models(rewards, policy_model: nn.Module, base_model_copy: bool) -> None:
    """Check that no reward can read a trained model as its "base" model.

    With adapters (LoRA), each reward's :class:`BaseLM` switches them off, so the policy itself
    serves as the base model.  With full fine-tuning, a reward whose model shares weights with the
    policy would move with it: it gets one shared frozen copy of the base weights when
    ``base_model_copy`` is set, else this raises a one-line :class:`ConfigError`."""
    if adapter_layers(policy_model):
        return
    copy_ = None
    for r in rewards:
        handle = getattr(r, "base_lm", None)
        if not isinstance(handle, BaseLM) or handle.frozen_copy or not handle.shares_weights_with(policy_model):
            continue
        if not base_model_copy:
            raise ConfigError(f"reward '{getattr(r, 'name', r)}' scores with the model that full fine-tuning "
                              "(use_peft: false) trains, so its base model would move with the policy: set "
                              "base_model_copy: true (a frozen copy, one more model in memory) or use_peft: true")
        if copy_ is None:
            copy_ = BaseLM(policy_model).freeze_copy()
        handle._model, handle.frozen_copy = copy_.module, True
