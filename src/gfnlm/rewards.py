"""Rewards: log R for every prefix of each episode, or for the complete episode only.

A reward maps a :class:`RewardBatch` to **log-rewards**, untempered:

* a *prefix* reward returns ``[B, N+1]``: entry ``t`` is log R(z_1:t ⊤) for t = 0..N
  (entries beyond the episode's length are ignored);
* a *terminal* reward returns ``[B]``: log R(z_1:n ⊤) of the complete episode.

Modified SubTB and modified DB need prefix rewards; TB and VarGrad work with either.
Tempering (``log R / T``) is applied by the trainer, following the config's schedule.

A TRL-style callable ``f(prompts, completions, **columns) -> list[float]`` is accepted
anywhere a reward is: its values are taken as terminal **log**-rewards.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .errors import RewardError
from .sampling import Constraints
from .scoring import completion_logits


@dataclass
class RewardBatch:
    """What a reward sees about a batch of B episodes.

    Attributes:
        prompts: [B] prompt text of each row (as given in the dataset, before templating).
        prompt_ids: P distinct tokenised prompts (what the policy conditions on).
        prompt_index: [B] long, the row of ``prompt_ids`` each episode continues.
        tokens: [B, N] long completions, padded (no stop token).
        lengths: [B] long.
        completions: [B] decoded completions (text, without the stop token).
        columns: extra dataset columns, each a list of B values.
        tokenizer: the policy's tokenizer.
        action_mask: [B, N] bool, False on tokens a tool wrote (None without a tool).
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    prompt_index: Tensor
    tokens: Tensor
    lengths: Tensor
    completions: list[str]
    columns: dict[str, list] = field(default_factory=dict)
    tokenizer: Any = None
    action_mask: Tensor | None = None

    def prefix_ids(self, b: int, t: int) -> list[int]:
        return self.tokens[b, :t].tolist()


class Reward:
    """Base class. Subclasses set ``prefix`` and implement :meth:`__call__` (log space)."""

    #: True if the reward returns log R for every prefix ([B, N+1]), False if terminal only ([B]).
    prefix: bool = True
    name: str = "reward"

    def __call__(self, batch: RewardBatch) -> Tensor:
        raise NotImplementedError


class PrefixRuleReward(Reward):
    """Log-reward from a rule on the decoded text of every prefix.

    ``fn(prompt: str, completion_prefix: str) -> float`` is called for each row and each
    t = 0..n (text of z_1:t); handy for small vocabularies and short episodes.
    """

    def __init__(self, fn: Callable[[str, str], float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "prefix_rule")

    def __call__(self, batch: RewardBatch) -> Tensor:
        B, N = batch.tokens.shape
        out = torch.zeros(B, N + 1)
        tok = batch.tokenizer
        for b in range(B):
            n = int(batch.lengths[b])
            for t in range(n + 1):
                text = tok.decode(batch.prefix_ids(b, t), skip_special_tokens=False) if t else ""
                out[b, t] = float(self.fn(batch.prompts[b], text))
        return out


class CallableReward(Reward):
    """A TRL-style reward ``f(prompts, completions, completion_ids, **columns) -> list[float]``.

    Its values are used as terminal **log**-rewards (``prefix = False``). Extra keyword
    arguments the function does not accept are not passed, unless it takes ``**kwargs``.
    """

    prefix = False

    def __init__(self, fn: Callable[..., Sequence[float]], name: str | None = None):
        if not callable(fn):
            raise RewardError(f"reward {fn!r} is not callable: pass a function f(prompts, completions, **kw) -> list[float]")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        try:
            params = inspect.signature(fn).parameters
            self._var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            self._accepts = set(params)
        except (TypeError, ValueError):
            self._var_kw, self._accepts = True, set()

    def __call__(self, batch: RewardBatch) -> Tensor:
        kwargs = dict(batch.columns)
        kwargs["completion_ids"] = [batch.tokens[b, : int(n)].tolist() for b, n in enumerate(batch.lengths)]
        kwargs.update(prompts=batch.prompts, completions=batch.completions)
        if not self._var_kw:
            kwargs = {k: v for k, v in kwargs.items() if k in self._accepts}
        values = self.fn(**kwargs)
        values = list(values) if values is not None else []
        if len(values) != len(batch.completions):
            raise RewardError(
                f"reward '{self.name}' returned {len(values)} values for {len(batch.completions)} completions: return one float per completion"
            )
        if any(v is None for v in values):
            raise RewardError(f"reward '{self.name}' returned None: every completion needs a log-reward")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)


class LMLikelihoodReward(Reward):
    """log p_LM(z_1:t ⊤ | X) for every prefix t, from one forward pass of the base model.

    With a PEFT model the base model is the policy with its adapters switched off (no
    second copy in memory). The pass runs in eval mode (dropout off), under ``no_grad``,
    with logits converted to fp32 before the log-softmax.  The stop probability is the sum
    over ``stop_token_ids``; with ``constraints`` the distribution is renormalised over the
    allowed tokens first (as the paper does for its vocabulary-restricted tasks).

    Args:
        model: the LM (a PeftModel, a plain model, or a callable returning one).
        stop_token_ids: ids that mean ⊤ (used when ``constraints`` is None).
        constraints: optional constraints (length limits are ignored: the LM may stop anywhere).
        context: optional text placed before each prompt (e.g. a few-shot prefix).
    """

    prefix = True
    name = "lm_likelihood"

    def __init__(self, model, stop_token_ids: Sequence[int] | None = None, constraints: Constraints | None = None,
                 pad_id: int = 0):
        if constraints is None:
            if not stop_token_ids:
                raise RewardError("LMLikelihoodReward needs stop_token_ids or constraints")
            constraints = Constraints(stop_token_ids=list(stop_token_ids), min_new_tokens=0, max_new_tokens=10**9)
        else:
            constraints = Constraints(stop_token_ids=list(constraints.stop_token_ids), min_new_tokens=0,
                                      max_new_tokens=10**9, allowed_token_ids=constraints.allowed_token_ids,
                                      forbidden_token_ids=list(constraints.forbidden_token_ids))
        self.model = model
        self.constraints = constraints
        self.pad_id = pad_id

    def resolved_model(self):
        """The model (calling the factory if one was given)."""
        return self.model() if callable(self.model) and not isinstance(self.model, torch.nn.Module) else self.model

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> Tensor:
        with base_model(self.resolved_model()) as base:
            logits, _ = completion_logits(base, batch.prompt_ids, batch.prompt_index.to(batch.tokens.device),
                                          batch.tokens, batch.lengths, self.pad_id)
        B, N1, _ = logits.shape
        steps = torch.zeros((B, N1), dtype=torch.long, device=logits.device)
        tokens = batch.tokens.to(logits.device)
        next_tokens = torch.cat([tokens, tokens.new_full((B, 1), self.constraints.stop_token_ids[0])], dim=1)
        tok, stop_lp = self.constraints.selected_log_probs(logits, steps, next_tokens)
        valid = torch.arange(N1 - 1, device=tok.device)[None, :] < batch.lengths[:, None].to(tok.device)
        tok = torch.where(valid, tok[:, :-1], torch.zeros_like(tok[:, :-1]))
        cum = torch.cat([tok.new_zeros(B, 1), tok.cumsum(1)], dim=1)
        return (cum + stop_lp).cpu()


@contextlib.contextmanager
def base_model(model):
    """Context in which ``model`` acts as its base LM: adapters off, eval mode (dropout off)."""
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "disable_adapter") and getattr(model, "peft_config", None):
            with model.disable_adapter():
                yield model
        else:
            yield model
    finally:
        model.train(was_training)


def as_reward(fn) -> Reward:
    """Wrap anything reward-like into a :class:`Reward`."""
    if isinstance(fn, Reward):
        return fn
    return CallableReward(fn)


def compute_log_rewards(rewards: Sequence[Reward], weights: Sequence[float] | None, batch: RewardBatch) -> Tensor:
    """Weighted sum of log-rewards, checked for NaN/inf.

    Returns [B, N+1] if every reward gives prefix rewards, else [B] (terminal only).
    """
    weights = list(weights) if weights is not None else [1.0] * len(rewards)
    if len(weights) != len(rewards):
        raise RewardError(f"{len(weights)} reward_weights for {len(rewards)} reward functions: give one weight per reward")
    B, N = batch.tokens.shape
    all_prefix = all(r.prefix for r in rewards)
    total = torch.zeros(B, N + 1) if all_prefix else torch.zeros(B)
    lengths = batch.lengths.cpu()
    for r, w in zip(rewards, weights):
        v = torch.as_tensor(r(batch), dtype=torch.float32).cpu()
        expected = (B, N + 1) if r.prefix else (B,)
        if tuple(v.shape) != expected:
            raise RewardError(f"reward '{r.name}' returned shape {tuple(v.shape)}, expected {expected}")
        check_finite(v, lengths, r.name, batch)
        if not all_prefix and r.prefix:
            v = v.gather(1, lengths[:, None]).squeeze(1)
        total = total + w * v
    return total


def check_finite(v: Tensor, lengths: Tensor, name: str, batch: RewardBatch) -> None:
    """Raise :class:`RewardError` if a log-reward that matters is NaN or ±inf."""
    if v.ndim == 2:
        valid = torch.arange(v.shape[1])[None, :] <= lengths[:, None]
        bad = valid & ~torch.isfinite(v)
    else:
        bad = ~torch.isfinite(v)
    if bad.any():
        b = int(bad.nonzero()[0, 0])
        value = v[b][bad[b]][0].item() if v.ndim == 2 else v[b].item()
        what = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        raise RewardError(
            f"reward '{name}' returned {what} for completion {batch.completions[b]!r}: "
            "log-rewards must be finite (use a finite floor such as -50 for impossible outcomes)"
        )
