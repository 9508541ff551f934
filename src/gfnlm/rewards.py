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
from .sampling import Constraints, pad_right


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

    @classmethod
    def of(cls, prompt_ids: Sequence[Sequence[int]], states: Sequence[Sequence[int]], tokenizer=None,
           columns: dict[str, list] | None = None) -> "RewardBatch":
        """B episodes given as token ids, outside a trainer (evaluation, EM): ``prompt_ids[b]`` the
        prompt episode ``b`` continues (repeated prompts are stored once) and ``states[b]`` its
        tokens z_1:n (may be empty). ``prompts`` (the text) is left empty: give a reward that reads the
        prompt's text (a ``{prompt}`` template) a ``columns`` entry or a callable instead."""
        if len(prompt_ids) != len(states):
            raise RewardError(f"{len(prompt_ids)} prompts for {len(states)} states: give one prompt per state")
        if any(len(p) == 0 for p in prompt_ids):
            raise RewardError("an empty prompt: every state continues a non-empty prompt (at least a BOS token)")
        uniq: dict[tuple, int] = {}
        index = [uniq.setdefault(tuple(p), len(uniq)) for p in prompt_ids]
        tokens, lengths = pad_right(states, 0)
        texts = [tokenizer.decode(list(z), skip_special_tokens=False) if tokenizer is not None else "" for z in states]
        return cls(prompts=[""] * len(states), prompt_ids=[list(p) for p in uniq],
                   prompt_index=torch.tensor(index, dtype=torch.long), tokens=tokens, lengths=lengths,
                   completions=texts, columns=dict(columns or {}), tokenizer=tokenizer)

    def prefix_ids(self, b: int, t: int) -> list[int]:
        return self.tokens[b, :t].tolist()

    def row(self, b: int) -> dict:
        """The dataset row of episode ``b``: ``{"prompt": ..., **columns}``."""
        return {"prompt": self.prompts[b], **{k: v[b] for k, v in self.columns.items()}}


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
    """log R = weight · log p_LM(text | context), from the base LM (or an explicit ``lm``): the one
    LM-likelihood reward.

    For each episode (a dataset row and its state z_1:n) and each scored prefix t:

    * without ``suffix``: log R(z_1:t ⊤) = log p_LM(z_1:t ⊤ | C), the stop action ⊤ being the summed
      probability of the stop ids (a tempered posterior p_LM(Z|X)^(1/T), a contrastive term);
    * with ``suffix``: log R(z_1:t ⊤) = log p_LM(z_1:t Y | C), the text Y scored after the prefix
      (an answer, a story's ending, a label phrase) and no stop action.

    ``score`` picks the terms: ``"state+end"`` (both, as above), ``"state"`` (log p_LM(z_1:t | C):
    neither ⊤ nor a suffix) or ``"end"`` (log p_LM(⊤ | C z_1:t), or log p_LM(Y | C z_1:t) with a
    suffix). A latent-variable posterior whose two factors come from different models,
    p_base(Z|X) p_lik(Y|X,Z), is then one instance of each.

    The base LM is read only through :class:`gfnlm.policy.BaseLM`: adapters off, eval mode (dropout
    off), ``no_grad``, fp32 log-softmax, whatever model object was passed. A model that is meant to
    differ from the base LM (a likelihood model fitted by EM) is passed explicitly as ``lm``. Every (episode, prefix)
    job of a call is batched into as few forward passes as ``max_batch_tokens`` allows; each distinct
    context is encoded once and its KV cache reused; a constant ``shared_prefix`` (a few-shot block)
    is encoded once for the reward's lifetime (with ``lm``, once per call unless ``static_lm``).

    Args:
        model: the base LM, the policy (its adapters are switched off), or a :class:`BaseLM`.
        lm: instead of ``model``: a zero-argument callable returning a context manager that yields the
            scoring module as it is, adapters included (e.g. :meth:`gfnlm.em.LikelihoodModel.active`,
            or ``lambda: contextlib.nullcontext(model)``); it is read in eval mode, under ``no_grad``,
            and a ``shared_prefix`` is encoded again at each call (the module may change), unless
            ``static_lm`` promises it does not.
        static_lm: with ``lm``, the module's outputs do not change between calls, so a
            ``shared_prefix`` is encoded once.
        tokenizer: used for text contexts and suffixes (default: the batch's, i.e. the policy's).
        context: what the LM conditions on. None: the policy's own prompt (token ids as the policy
            sees them). A string is a template formatted with the row (``{prompt}`` and any dataset
            column); a callable gets the row dict and returns the text. ``""`` is the empty context
            (p_LM(Z), read after BOS, or EOS for a tokenizer without BOS).
        suffix: None (score ⊤), or text Y scored after each prefix: a template or a callable of the
            row, as ``context``.
        score: ``"state+end"``, ``"state"`` or ``"end"``: which terms (see above).
        prefixes: ``"all"`` (every t = 0..n, [B, N+1]), ``"stoppable"`` (only where ``constraints``
            let the policy stop of its own accord: past ``min_new_tokens``, not inside a tool's
            output, and with ``stop_after_tool`` right after it; [B, N+1]) or ``"terminal"`` (t = n
            only; [B], a terminal reward).
        constraints: the policy's action space: the stop ids, the prefixes ``"stoppable"`` keeps, and
            the allowed ids when ``renormalise``.
        stop_token_ids: the stop ids when there are no ``constraints`` (needed without a suffix; with
            constraints they must be the constraints' own).
        renormalise: with ``constraints`` that restrict the vocabulary, the policy's actions and ⊤ are
            scored under p_LM renormalised over the allowed and stop ids (as the paper does for its
            restricted tasks; length limits ignored); a tool's output and a suffix always use the
            full vocabulary.
        shared_prefix: constant text placed before every context (e.g. solved examples).
        weight: exponent of p_LM (log R is multiplied by it): R = p(Z|X)^a p(Z)^b is two instances,
            weights a and b, summed in log space by the trainer.
        invalid_log_reward: log R of the prefixes that ``"stoppable"`` does not score (the policy
            cannot stop there, except when forced at ``max_new_tokens``).
        max_batch_tokens: memory budget of one pass, rows × padded width after the context.
    """

    name = "lm_likelihood"

    def __init__(self, model=None, tokenizer=None, *, context=None, suffix=None, prefixes: str = "all",
                 constraints: Constraints | None = None, stop_token_ids: Sequence[int] | None = None,
                 renormalise: bool = True, shared_prefix: str | None = None, weight: float = 1.0,
                 invalid_log_reward: float = 0.0, max_batch_tokens: int = 4096, score: str = "state+end",
                 lm: Callable[[], Any] | None = None, static_lm: bool = False, name: str | None = None):
        from .policy import BaseLM

        if prefixes not in ("all", "stoppable", "terminal"):
            raise RewardError(f"prefixes={prefixes!r}: choose 'all', 'stoppable' or 'terminal'")
        if score not in ("state+end", "state", "end"):
            raise RewardError(f"score={score!r}: choose 'state+end', 'state' or 'end'")
        if score == "state" and suffix is not None:
            raise RewardError("score='state' scores neither the stop action nor a suffix: drop suffix= or score 'state+end'")
        if prefixes == "stoppable" and constraints is None:
            raise RewardError("prefixes='stoppable' needs the policy's constraints (constraints=...)")
        if suffix is None and score != "state" and constraints is None and not stop_token_ids:
            raise RewardError("LMLikelihoodReward without a suffix scores the stop action: pass stop_token_ids or constraints")
        if constraints is not None and stop_token_ids and sorted(stop_token_ids) != sorted(constraints.stop_token_ids):
            raise RewardError(f"stop_token_ids {list(stop_token_ids)} differ from the constraints' "
                              f"{list(constraints.stop_token_ids)}: give one of them")
        if (model is None) == (lm is None):
            raise RewardError("LMLikelihoodReward reads one LM: give model (its base LM is scored, adapters off) "
                              "or lm (a handle yielding the module to score with), not both or neither")
        if lm is not None and (isinstance(lm, torch.nn.Module) or not callable(lm)):
            raise RewardError(f"lm={type(lm).__name__}: give a zero-argument callable returning a context manager that "
                              "yields the module, e.g. lm=lambda: contextlib.nullcontext(model)")
        self.base_lm = BaseLM(model) if lm is None else None  # the handle bind_base_models checks
        self.lm = self.base_lm or lm
        self.static_lm = static_lm or lm is None
        self.score = score
        self.tokenizer = tokenizer
        self.context, self.suffix, self.prefixes = context, suffix, prefixes
        self.constraints = constraints
        self.stop_token_ids = list(stop_token_ids or (constraints.stop_token_ids if constraints else []))
        self.renormalise = renormalise and constraints is not None and (
            constraints.allowed_token_ids is not None or bool(constraints.forbidden_token_ids))
        self.shared_prefix = shared_prefix
        self.weight = float(weight)
        self.invalid_log_reward = float(invalid_log_reward)
        self.max_batch_tokens = max_batch_tokens
        self.prefix = prefixes != "terminal"
        self.name = name or self.name
        self._prefix_cache = None

    # --- text --------------------------------------------------------------------------------
    def _text(self, spec, row: dict, what: str) -> str:
        if callable(spec):
            return str(spec(row))
        try:
            return spec.format(**row)
        except KeyError as e:
            raise RewardError(f"{self.name}: the {what} template names {e}, which is not a dataset column "
                              f"(columns: {sorted(row)})") from None

    def context_ids(self, row: dict, prompt_ids: Sequence[int], tok) -> list[int]:
        """The token ids the LM conditions on for one dataset ``row`` whose prompt the policy sees as
        ``prompt_ids`` (after the shared prefix, when there is one)."""
        if self.context is None:  # after a shared prefix the prompt continues the text: no second BOS
            bos = tok.bos_token_id if tok is not None and self.shared_prefix else None
            p = list(prompt_ids)
            return p[1:] if bos is not None and len(p) > 1 and p[0] == bos else p
        text = self._text(self.context, row, "context")
        ids = tok(text, add_special_tokens=self.shared_prefix is None)["input_ids"] if text else []
        if not ids:
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise RewardError(f"{self.name}: empty context and the tokenizer has neither BOS nor EOS to start from")
            ids = [start]
        return list(ids)

    def _contexts(self, batch: RewardBatch, tok) -> tuple[list[list[int]], list[int]]:
        """Distinct context token lists and the context of each episode."""
        if self.context is None:
            return [self.context_ids({}, p, tok) for p in batch.prompt_ids], batch.prompt_index.tolist()
        uniq: dict[tuple, int] = {}
        index = []
        for b in range(batch.tokens.shape[0]):
            ids = self.context_ids(batch.row(b), [], tok)
            index.append(uniq.setdefault(tuple(ids), len(uniq)))
        return [list(c) for c in uniq], index

    def _prefix_cache_for(self, base, tok):
        """The shared prefix's KV cache under the scoring module: computed once for the base LM (or a
        ``static_lm``), at every call for an ``lm`` handle whose module may have changed since."""
        if not self.shared_prefix:
            return None
        if self._prefix_cache is None or not self.static_lm:
            from .data import render_prompt
            from .sampling import PrefixCache

            cache = PrefixCache(base, render_prompt(tok, self.shared_prefix, "never"))
            if not self.static_lm:
                return cache
            self._prefix_cache = cache
        return self._prefix_cache

    @contextlib.contextmanager
    def _module(self):
        """The scoring module in eval mode (its training flag restored on exit)."""
        handle = self.lm()
        if not hasattr(handle, "__enter__"):
            raise RewardError(f"{self.name}: lm() returned {type(handle).__name__}, not a context manager: "
                              "use lm=lambda: contextlib.nullcontext(model)")
        with handle as m:
            was = m.training
            m.eval()
            try:
                yield m
            finally:
                m.train(was)

    # --- which prefixes ------------------------------------------------------------------------
    def scored(self, batch: RewardBatch) -> Tensor:
        """[B, N+1] bool: the prefixes this reward scores ("stoppable": where the policy acts, past
        ``min_new_tokens``, with ``stop_after_tool`` right after a tool's output, and with a
        ``prefix_rule`` where the text so far satisfies it)."""
        from .sampling import EpisodeStates

        N = batch.tokens.shape[1]
        t = torch.arange(N + 1)[None, :]
        lengths = batch.lengths.cpu()
        if self.prefixes == "terminal":
            return t == lengths[:, None]
        if self.prefixes == "all":
            return t <= lengths[:, None]
        c = self.constraints
        st = EpisodeStates.of(lengths, N, None if batch.action_mask is None else batch.action_mask.cpu())
        ok = st.policy_acts & (st.n_act >= c.min_new_tokens)
        if c.prefix_rule is not None:  # and where the text so far satisfies the rule (c(z_1:t) = 1)
            ok = ok & c.accepting_along(batch.tokens, lengths)
        return ok & st.after_tool if c.stop_after_tool else ok

    # --- the reward ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> Tensor:
        from .scoring import continuation_log_probs, prefix_suffix_log_probs

        tok = self.tokenizer or batch.tokenizer
        if (self.context is not None or self.suffix is not None or self.shared_prefix) and tok is None:
            raise RewardError(f"{self.name}: text contexts and suffixes need a tokenizer (tokenizer=...)")
        B, N = batch.tokens.shape
        scored = self.scored(batch)
        contexts, ctx_index = self._contexts(batch, tok)
        states = [batch.tokens[b, :int(batch.lengths[b])].tolist() for b in range(B)]
        # the policy's own actions are renormalised; a tool's output is scored under the full vocabulary
        acts = [[True] * len(z) if batch.action_mask is None else batch.action_mask[b, :len(z)].tolist()
                for b, z in enumerate(states)]
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        values = torch.zeros(B, N + 1)
        state, end = self.score != "end", self.score != "state"
        with self._module() as base:
            kw = dict(pad_id=pad, prefix=self._prefix_cache_for(base, tok),
                      renormalise=self.constraints if self.renormalise else None,
                      max_batch_tokens=self.max_batch_tokens)
            if self.suffix is None:  # one row per episode: every prefix's stop comes from the same pass
                tok_lp, stop_lp = continuation_log_probs(base, contexts, ctx_index, states,
                                                         stop_token_ids=self.stop_token_ids if end else None,
                                                         renormalise_mask=acts, **kw)
                cum = torch.cat([tok_lp.new_zeros(B, 1), tok_lp.cumsum(1)], dim=1)
                values[:, :cum.shape[1]] = ((cum if state else 0.0) + (stop_lp if end else 0.0)).cpu()
            else:  # each state read once; Y read after each scored prefix z_1:t through the state's KV cache
                jobs = scored.nonzero().tolist()
                suffixes = [tok.encode(self._text(self.suffix, batch.row(b), "suffix"), add_special_tokens=False)
                            for b in range(B)]
                if any(not suffixes[b] for b, _ in jobs):
                    raise RewardError(f"{self.name}: a suffix is empty: give Y as non-empty text")
                if jobs:
                    state_lp, suffix_lp = prefix_suffix_log_probs(base, contexts, ctx_index, states, suffixes, jobs,
                                                                  renormalise_mask=acts, **kw)
                    cum = torch.cat([state_lp.new_zeros(B, 1), state_lp.cumsum(1)], dim=1)  # log p(z_1:t | C)
                    b_idx, t_idx = scored.nonzero(as_tuple=True)
                    at = cum[b_idx.to(cum.device), t_idx.to(cum.device)]
                    values[scored] = ((at if state else 0.0) + suffix_lp).cpu()
        out = torch.where(scored, self.weight * values, torch.full_like(values, self.invalid_log_reward))
        if self.prefixes == "terminal":
            return at_stop(out, batch.lengths.cpu())
        return out


class NoReward(Reward):
    """The reward of a trainer built only for its policy (supervised fine-tuning): calling it is an error."""

    name = "no_reward"

    def __call__(self, batch: RewardBatch) -> Tensor:
        raise RewardError("this trainer was built without rewards (supervised fine-tuning): build it with the task's rewards to sample and score")


def as_reward(fn) -> Reward:
    """Wrap anything reward-like into a :class:`Reward`."""
    if isinstance(fn, Reward):
        return fn
    return CallableReward(fn)


def at_stop(log_r: Tensor, lengths: Tensor) -> Tensor:
    """log R of each episode where it stops: a prefix reward [B, N+1] read at t = length, a terminal
    reward [B] as it is. [B]."""
    return log_r.gather(1, lengths[:, None].to(log_r.device)).squeeze(1) if log_r.ndim == 2 else log_r


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
        v = torch.as_tensor(r(batch), dtype=torch.float32).detach().cpu()  # a reward is data, never a graph
        expected = (B, N + 1) if r.prefix else (B,)
        if tuple(v.shape) != expected:
            raise RewardError(f"reward '{r.name}' returned shape {tuple(v.shape)}, expected {expected}")
        check_finite(v, lengths, r.name, batch)
        if not all_prefix:
            v = at_stop(v, lengths)
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
