"""Sampling episodes from the policy q(Z|X).

An episode appends tokens z_1..z_n to a prompt X and ends with the stop action ⊤.
The stop action is *one* action even when several token ids stand for it (EOS, ".",
"\\n"): its probability is the sum of their probabilities.  The sampled sequence
``tokens`` never contains the stop token itself.

The constraints (allowed/forbidden tokens, min/max length) define the policy: the
same :class:`Constraints` object is used here and in :mod:`gfnlm.scoring`, so
the log-probabilities accumulated while sampling equal the ones the teacher-forced
scoring pass computes (up to floating point).

Sampling runs under ``torch.no_grad`` with a KV cache.  Each distinct prompt is
encoded once and its cache is shared by all samples of that prompt.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .decoding import LlamaDecoder, unwrap
from .errors import DataError

NEG_INF = float("-inf")


@dataclass
class Constraints:
    """The action space of the policy.

    Attributes:
        stop_token_ids: token ids that mean ⊤ (stop). Their probabilities are summed.
        min_new_tokens: stopping is impossible before this many tokens.
        max_new_tokens: stopping is forced once this many tokens are generated.
        allowed_token_ids: if given, the only non-stop tokens the policy may emit
            (the distribution is renormalised over them and the stop tokens).
        forbidden_token_ids: tokens the policy may never emit.
        stop_after_tool: if True, the policy may stop only in a state that ends with a tool's
            output (e.g. a rationale ending in a computed result, "... 6 - 4 = 2"), besides the
            forced stop at ``max_new_tokens``. Needs a tool when sampling.
        prefix_rule: optional prefix-aware mask (e.g. :class:`gfnlm.patterns.RegexRule`): in each state,
            which tokens keep the constraint satisfiable (``allowed(state, remaining, V, device)``) and
            whether stopping satisfies it (``accepting(state)``); ``advance(state, token)`` and ``walk``
            give the states. Shared by sampling, scoring and rewards like every other field.
    """

    stop_token_ids: list[int]
    min_new_tokens: int = 0
    max_new_tokens: int = 20
    allowed_token_ids: list[int] | None = None
    forbidden_token_ids: list[int] = field(default_factory=list)
    stop_after_tool: bool = False
    prefix_rule: object | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not self.stop_token_ids:
            raise DataError("no stop token: set stop_tokens (e.g. ['eos']) so episodes can end")
        if self.max_new_tokens < 1 or self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise DataError(
                f"invalid lengths min_new_tokens={self.min_new_tokens}, max_new_tokens={self.max_new_tokens}: "
                "need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1"
            )
        self._masks: dict = {}

    def why_empty_cannot_stop(self) -> str | None:
        """Why an episode cannot stop before its first action (None when it can): ``min_new_tokens > 0``,
        ``stop_after_tool``, or a ``prefix_rule`` that does not accept the empty text. Without that
        terminal state, modified SubTB has no anchor and needs a learned log Z."""
        rule = self.prefix_rule
        if self.min_new_tokens > 0:
            return "min_new_tokens > 0"
        if self.stop_after_tool:
            return "stop_after_tool"
        if rule is not None and not rule.accepting(rule.walk([])[0]):
            return "a prefix_rule that rejects the empty text"
        return None

    def token_mask(self, vocab_size: int, device) -> Tensor:
        """Bool [V]: True for the non-stop tokens the policy may emit."""
        key = (vocab_size, str(device))
        if key not in self._masks:
            if self.allowed_token_ids is not None:
                m = torch.zeros(vocab_size, dtype=torch.bool)
                m[torch.tensor(self.allowed_token_ids, dtype=torch.long)] = True
            else:
                m = torch.ones(vocab_size, dtype=torch.bool)
            if self.forbidden_token_ids:
                m[torch.tensor(self.forbidden_token_ids, dtype=torch.long)] = False
            m[torch.tensor(self.stop_token_ids, dtype=torch.long)] = False
            if not m.any():
                raise DataError("the constraints allow no token besides stop: check allowed/forbidden tokens")
            stop = torch.zeros(vocab_size, dtype=torch.bool)
            stop[torch.tensor(self.stop_token_ids, dtype=torch.long)] = True
            self._masks[key] = (m.to(device), stop.to(device))
        return self._masks[key]

    def token_ids(self, vocab_size: int, device) -> Tensor:
        """Long [K]: the non-stop token ids the policy may emit."""
        key = ("ids", vocab_size, str(device))
        if key not in self._masks:
            self._masks[key] = self.token_mask(vocab_size, device)[0].nonzero().squeeze(1)
        return self._masks[key]

    def rule_arrays(self, tokens: Tensor, lengths: Tensor, vocab_size: int, device) -> tuple[Tensor, Tensor]:
        """The ``prefix_rule`` along episodes ``tokens`` [R, N] of ``lengths`` [R] (their actions):
        allowed [R, N+1, V] bool, the tokens the rule allows after each prefix z_1..z_t, and accepting
        [R, N+1] bool, whether stopping there satisfies it (positions past an episode repeat its last
        state). One walk of each episode, on the CPU."""
        rule, width = self.prefix_rule, tokens.shape[1]
        lengths = lengths.cpu().tolist()
        states = self._rule_states(tokens, lengths)
        allowed = torch.zeros((len(states), width + 1, vocab_size), dtype=torch.bool, device=device)
        for r, (n, row) in enumerate(zip(lengths, states)):
            allowed[r] = torch.stack([rule.allowed(st, self.max_new_tokens - min(t, n), vocab_size, device)
                                      for t, st in enumerate(row)])
        return allowed, self._accepting(states, width).to(device)

    def accepting_along(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """[R, N+1] bool (CPU): after each prefix of the episodes ``tokens`` [R, N] of ``lengths`` [R],
        whether the ``prefix_rule`` allows stopping (all True without a rule)."""
        if self.prefix_rule is None:
            return torch.ones((tokens.shape[0], tokens.shape[1] + 1), dtype=torch.bool)
        return self._accepting(self._rule_states(tokens, lengths.cpu().tolist()), tokens.shape[1])

    def _rule_states(self, tokens: Tensor, lengths: list[int]) -> list[list]:
        """The rule's state after each prefix of each episode, padded with its last state to N+1."""
        width, out = tokens.shape[1], []
        for row, n in zip(tokens.cpu().tolist(), lengths):
            states = self.prefix_rule.walk(row[:n])
            out.append(states + [states[-1]] * (width + 1 - len(states)))
        return out

    def _accepting(self, states: list[list], width: int) -> Tensor:
        return torch.tensor([[self.prefix_rule.accepting(st) for st in row] for row in states],
                            dtype=torch.bool).view(len(states), width + 1)

    def _can_stop(self, num_generated: Tensor, after_tool: Tensor | None,
                  accepting: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(can_stop, must_stop), bool like ``num_generated``: the length limits and, with
        ``stop_after_tool``, whether the state ends with tool output (``after_tool``); with a
        ``prefix_rule``, whether the text so far satisfies it (``accepting``)."""
        must_stop = num_generated >= self.max_new_tokens
        can_stop = num_generated >= self.min_new_tokens
        if accepting is not None:
            can_stop = can_stop & accepting.to(can_stop.device)
        if self.stop_after_tool:
            if after_tool is None:
                raise ValueError("stop_after_tool needs after_tool: whether each state ends with tool output")
            can_stop = (can_stop & after_tool.to(can_stop.device).bool()) | must_stop
        return can_stop, must_stop

    def selected_log_probs(self, logits: Tensor, num_generated: Tensor, next_tokens: Tensor,
                           after_tool: Tensor | None = None, rule: tuple[Tensor, Tensor] | None = None
                           ) -> tuple[Tensor, Tensor]:
        """log q(next_token | s) and log q(⊤ | s) without materialising the whole distribution.

        Same values as :meth:`log_probs` (gathered), for scoring passes: the normaliser is a
        log-sum-exp over the allowed tokens (a gather when ``allowed_token_ids`` is small) combined
        with the stop mass according to the length limits.

        Args:
            logits: [..., V] raw logits; num_generated: [...] long; next_tokens: [...] long (any id
                where there is no next token: its value is then ignored by the caller);
                after_tool: [...] bool, the state ends with tool output (read with ``stop_after_tool``);
                rule: with a ``prefix_rule``, (allowed [..., V], accepting [...]) of :meth:`rule_arrays`.
        Returns:
            token_logp [...] (-inf for a token the constraints forbid there), stop_logp [...].
        """
        V = logits.shape[-1]
        tok_mask, _ = self.token_mask(V, logits.device)
        x = logits.float()
        stop_ids = torch.as_tensor(self.stop_token_ids, device=logits.device)
        lse_stop = torch.logsumexp(x.index_select(-1, stop_ids), dim=-1)
        if rule is not None:
            lse_tok = torch.logsumexp(x.masked_fill(~(tok_mask & rule[0]), NEG_INF), dim=-1)
        elif self.allowed_token_ids is not None:
            lse_tok = torch.logsumexp(x.index_select(-1, self.token_ids(V, logits.device)), dim=-1)
        else:
            lse_tok = torch.logsumexp(x.masked_fill(~tok_mask, NEG_INF), dim=-1)
        can_stop, must_stop = self._can_stop(num_generated, after_tool, None if rule is None else rule[1])
        log_norm = torch.where(must_stop, lse_stop, torch.where(can_stop, torch.logaddexp(lse_tok, lse_stop), lse_tok))
        stop_logp = torch.where(can_stop, lse_stop - log_norm, torch.full_like(log_norm, NEG_INF))
        tok = x.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1) - log_norm
        ok = tok_mask[next_tokens] & ~must_stop
        if rule is not None:
            ok = ok & rule[0].gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
        return torch.where(ok, tok, torch.full_like(tok, NEG_INF)), stop_logp

    def log_probs(self, logits: Tensor, num_generated: Tensor, after_tool: Tensor | None = None,
                  rule: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Constrained log-probabilities of the actions at some states.

        Args:
            logits: [..., V] raw next-token logits (any dtype; computed in fp32).
            num_generated: [...] long, tokens generated so far at each state (t).
            after_tool: [...] bool, the state ends with tool output (read with ``stop_after_tool``).
            rule: with a ``prefix_rule``, (allowed [..., V], accepting [...]) of :meth:`rule_arrays`.

        Returns:
            logp: [..., V] log-probability of each token id under the constraints; for a
                non-stop token z this is log q(z|s) (-inf if not allowed).
            stop_logp: [...] log q(⊤|s), the sum over the stop ids; -inf below
                ``min_new_tokens``; 0 at ``max_new_tokens``.
        """
        tok_mask, stop_mask = self.token_mask(logits.shape[-1], logits.device)
        can_stop, must_stop = self._can_stop(num_generated, after_tool, None if rule is None else rule[1])
        can_stop, must_stop = can_stop.unsqueeze(-1), must_stop.unsqueeze(-1)
        if rule is not None:
            tok_mask = tok_mask & rule[0]
        allowed = (tok_mask & ~must_stop) | (stop_mask & can_stop)  # never empty: stop or a token
        x = logits.float()
        log_norm = torch.logsumexp(x.masked_fill(~allowed, NEG_INF), dim=-1, keepdim=True)
        logp = (x - log_norm).masked_fill(~allowed, NEG_INF)
        # the stop mass is computed on unmasked logits and then set to -inf where stopping is
        # impossible, so no logsumexp over an all -inf row (whose gradient is NaN) is ever taken
        stop_all = torch.logsumexp(x.masked_fill(~stop_mask, NEG_INF), dim=-1) - log_norm.squeeze(-1)
        stop_logp = torch.where(can_stop.squeeze(-1), stop_all, torch.full_like(stop_all, NEG_INF))
        return logp, stop_logp


@dataclass
class Samples:
    """A batch of episodes.

    Attributes:
        prompt_index: [B] long, row of the prompt (in the list given to :func:`sample`).
        tokens: [B, N] long, the state after the prompt: z_1..z_n, with any tool output in place,
            padded with ``pad_id`` (never includes the stop token).
        lengths: [B] long, state length n of each row (actions plus tool tokens).
        log_pf: [B, N] log q(z_t | z_<t) under the policy at temperature 1 (log space;
            0 in padding).
        log_pterm: [B, N+1] log q(⊤ | z_1:t) for t = 0..N (log space; -inf where stopping is
            impossible, beyond the length, and inside tool output).
        action_mask: [B, N] bool, True where the token is the policy's action and False where a
            tool wrote it; None when every token is an action (no tool).
    """

    prompt_index: Tensor
    tokens: Tensor
    lengths: Tensor
    log_pf: Tensor
    log_pterm: Tensor
    action_mask: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        """[B, N] bool, True on real tokens."""
        n = self.tokens.shape[1]
        return torch.arange(n, device=self.tokens.device)[None, :] < self.lengths[:, None]

    @property
    def log_prob(self) -> Tensor:
        """[B] log q(Z ⊤ | X) of each whole episode (log space)."""
        term = self.log_pterm.gather(1, self.lengths[:, None]).squeeze(1)
        return self.log_pf.sum(1) + term

    def completion_ids(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists. Returns ids [P, L] and attention mask [P, L] (long)."""
    if len(prompts) == 0:
        raise DataError("no prompts given")
    width = max(len(p) for p in prompts)
    if width == 0:
        raise DataError("empty prompt: every prompt needs at least one token (e.g. BOS)")
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def tool_output(tool, tokenizer, state_ids: Sequence[int], used: int, budget: int) -> list[int]:
    """Token ids a tool writes after the state ``state_ids`` (an action just taken), or [] if it
    stays silent or its output does not fit in what is left of the episode's ``budget`` (``used``
    tool tokens so far). The one rule shared by sampling and by re-building seeded episodes."""
    text = tool(tokenizer.decode(list(state_ids), skip_special_tokens=False))
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids) if used + len(ids) <= budget else []


def tool_output_ends(action_mask: Tensor, lengths: Tensor) -> Tensor:
    """[B, N+1] bool: state t ends with a tool's complete output (token t-1 was written by the tool
    and the policy acts at t: t is the length, or token t is an action). ``action_mask`` [B, N] is
    False on tool-written tokens; ``lengths`` [B]. The states where ``stop_after_tool`` allows a stop."""
    B, N = action_mask.shape
    device = action_mask.device
    in_range = torch.arange(N, device=device)[None, :] < lengths.to(device)[:, None]
    tool = in_range & ~action_mask.bool()
    acts_next = torch.cat([in_range & action_mask.bool(), torch.zeros((B, 1), dtype=torch.bool, device=device)], 1)
    at_end = torch.arange(N + 1, device=device)[None, :] == lengths.to(device)[:, None]
    after = torch.cat([torch.zeros((B, 1), dtype=torch.bool, device=device), tool], 1)
    return after & (acts_next | at_end)


@dataclass
class EpisodeStates:
    """Where the policy acts in a batch of states, for scoring passes and rewards.

    Attributes:
        acts: [B, N] bool, token t is the policy's action (in range, not tool-written).
        n_act: [B, N+1] long, actions taken before state t (what the length limits count).
        after_tool: [B, N+1] bool, state t ends with a tool's complete output.
        policy_acts: [B, N+1] bool, the policy acts (and may stop) at state t: at the end, or
            before one of its own actions, never inside tool output.
    """

    acts: Tensor
    n_act: Tensor
    after_tool: Tensor
    policy_acts: Tensor

    @classmethod
    def of(cls, lengths: Tensor, width: int, action_mask: Tensor | None = None) -> "EpisodeStates":
        """From ``lengths`` [B], the padded width N, and ``action_mask`` [B, N] (None: all actions)."""
        device = lengths.device
        B = lengths.shape[0]
        in_range = torch.arange(width, device=device)[None, :] < lengths[:, None]
        acts = in_range if action_mask is None else action_mask.to(device).bool() & in_range
        n_act = torch.cat([torch.zeros((B, 1), dtype=torch.long, device=device), acts.long().cumsum(1)], dim=1)
        at_end = torch.arange(width + 1, device=device)[None, :] == lengths[:, None]
        policy_acts = at_end | torch.cat([acts, acts.new_zeros((B, 1))], dim=1)
        return cls(acts, n_act, tool_output_ends(acts, lengths), policy_acts)


def pad_right(seqs: Sequence[Sequence], pad, dtype=torch.long) -> tuple[Tensor, Tensor]:
    """Right-pad lists (token ids, masks...). Returns values [K, N] and lengths [K]."""
    width = max((len(x) for x in seqs), default=0)
    out = torch.full((len(seqs), width), pad, dtype=dtype)
    for i, x in enumerate(seqs):
        if len(x):
            out[i, : len(x)] = torch.as_tensor(list(x), dtype=dtype)
    return out, torch.tensor([len(x) for x in seqs], dtype=torch.long)


def context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "max_position_embeddings", None)


def check_fits(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raise DataError if a prompt plus ``max_new_tokens`` exceeds the model's context."""
    ctx = context_length(model)
    if ctx is None:
        return
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > ctx:
        raise DataError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {ctx} tokens: shorten the prompt or lower max_new_tokens"
        )


_CACHE_KEYWORD: dict[type, str] = {}


def cache_kwargs(model, cache) -> dict:
    """Keyword passing a KV cache: ``cache=`` in transformers >= 5.2x, else ``past_key_values=``."""
    base = unwrap(model)
    key = type(base)
    if key not in _CACHE_KEYWORD:
        params = inspect.signature(base.forward).parameters
        _CACHE_KEYWORD[key] = "cache" if "cache" in params else "past_key_values"
    return {_CACHE_KEYWORD[key]: cache}


def output_cache(out):
    """The KV cache of a model output, whatever transformers calls it."""
    return out.get("cache", None) if out.get("cache", None) is not None else out.past_key_values


class PrefixCache:
    """The KV cache of a constant token prefix (e.g. a few-shot context), computed once.

    Valid as long as the model that reads it does not change: a reward computed by the base
    model with its adapters switched off, or a frozen model evaluated with a k-shot context.
    ``expand(n)`` gives a fresh cache of n rows."""

    def __init__(self, model, prefix_ids: Sequence[int]):
        if not prefix_ids:
            raise ValueError("empty prefix")
        device = next(model.parameters()).device
        ids = torch.tensor([list(prefix_ids)], device=device)
        with torch.no_grad():
            _, cache, _ = encode_prompts(model, ids, torch.ones_like(ids))
        self.length = len(prefix_ids)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def expand(self, n: int):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous())
                                            for k, v in self.layers])


def encode_prompts(model, prompt_ids: Tensor, prompt_mask: Tensor, output_hidden_states: bool = False,
                   prefix: PrefixCache | None = None):
    """Run the (left-padded) prompts [P, L] through the model, after ``prefix`` if given.

    Returns the model output (``logits`` [P, L, V]), its KV cache, and the attention mask of
    everything the cache holds ([P, L] or [P, prefix + L], long)."""
    if prefix is None:
        pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True,
                    output_hidden_states=output_hidden_states)
        return out, output_cache(out), prompt_mask
    P = prompt_ids.shape[0]
    full_mask = torch.cat([torch.ones((P, prefix.length), dtype=prompt_mask.dtype, device=prompt_mask.device),
                           prompt_mask], dim=1)
    pos = (full_mask.cumsum(-1) - 1)[:, prefix.length:]
    out = model(input_ids=prompt_ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
                output_hidden_states=output_hidden_states, **cache_kwargs(model, prefix.expand(P)))
    return out, output_cache(out), full_mask


def device_generator(where, seed: int) -> torch.Generator:
    """A generator seeded ``seed`` on ``where``: a device, or a model (its parameters' device). The
    engine's rule: tensors live on the model's device, and so do the generators that draw them."""
    device = where if isinstance(where, (str, torch.device)) else next(where.parameters()).device
    return torch.Generator(device=device).manual_seed(seed)


def episode_uniforms(generator: torch.Generator | None, steps: int, rows: int, device) -> Tensor:
    """[steps, rows] uniforms in [0, 1) for an episode's draws, taken from ``generator`` on its own
    device in one call and moved to ``device`` once (the global generator of ``device`` when None).
    One draw per row and step: a seed gives the same episodes on a device type (CPU and CUDA
    generators are different algorithms), and a generator on another device costs one copy per batch,
    not per token."""
    if generator is None:
        return torch.rand((steps, rows), device=device)
    return torch.rand((steps, rows), generator=generator, device=generator.device).to(device)


def draw(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw of one column per row of ``probs`` [B, C] (non-negative, rows need not sum
    to 1) with uniforms ``u`` [B] in [0, 1): the first column whose cumulative mass exceeds
    u * total, so zero-mass columns are never drawn (rounding at the very top falls back to a column
    with mass). Returns [B] long."""
    cdf = probs.double().cumsum(-1)  # float64: tail actions below fp32's resolution keep their mass
    total = cdf[:, -1:].contiguous()
    idx = torch.searchsorted(cdf, u.double().unsqueeze(1) * total, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)
    ok = probs.gather(1, idx[:, None]).squeeze(1) > 0
    if probs.device.type == "cpu":  # a sequential sum: the cdf first reaches its total at a column with mass
        fallback = torch.searchsorted(cdf, total).squeeze(1)
    else:  # a parallel scan may round a rise onto a zero-mass column: the last column with mass, exactly
        fallback = probs.shape[1] - 1 - (probs > 0).flip(1).int().argmax(1)
    return torch.where(ok, idx, fallback)


@dataclass
class _StepDist:
    """The policy's constrained distribution at one decode step, as the sampler needs it.

    Attributes:
        scores: [B, C] logits of the candidate actions (-inf where not allowed), ⊤ as one action in
            column ``stop_col`` with logit log Σ_stop exp(x) (-inf where stopping is impossible).
        log_norm: [B] log-normaliser, so log q(action) = scores - log_norm.
    """

    scores: Tensor
    log_norm: Tensor


class _ActionSpace:
    """What the sampler precomputes once per episode batch from the :class:`Constraints`: the
    candidate columns (every id, or the allowed ids when the vocabulary is restricted, followed by
    one column for ⊤) and the masks, so that a decode step is a handful of tensor operations."""

    def __init__(self, c: Constraints, vocab_size: int, device):
        self.c = c
        self.tok_mask, self.stop_mask = c.token_mask(vocab_size, device)
        self.stop_ids = torch.as_tensor(c.stop_token_ids, device=device)
        if c.allowed_token_ids is None:  # columns are token ids; ⊤ lives in the first stop id's column
            self.cand_ids, self.stop_col = None, int(c.stop_token_ids[0])
        else:  # the allowed ids, then one column for ⊤
            self.cand_ids = torch.cat([c.token_ids(vocab_size, device), self.stop_ids[:1]])
            self.stop_col = len(self.cand_ids) - 1

    def dist(self, logits: Tensor, can_stop: Tensor, must_stop: Tensor, rule_mask: Tensor | None = None) -> _StepDist:
        """From next-token ``logits`` [B, V], the stop rule of each row ([B] bool each) and, with a
        prefix rule, the tokens it allows in each row (``rule_mask`` [B, V] bool)."""
        x = logits.float()
        if self.cand_ids is None:
            scores = x.masked_fill(~self.tok_mask, NEG_INF)
            if rule_mask is not None:
                scores.masked_fill_(~rule_mask, NEG_INF)
        else:
            scores = x.index_select(1, self.cand_ids)
            if rule_mask is not None:
                scores.masked_fill_(~rule_mask.index_select(1, self.cand_ids), NEG_INF)
            scores[:, self.stop_col] = NEG_INF
        scores.masked_fill_(must_stop[:, None], NEG_INF)
        lse_tok = torch.logsumexp(scores, dim=-1)
        stop_logit = torch.logsumexp(x.index_select(1, self.stop_ids), dim=-1).masked_fill(~can_stop, NEG_INF)
        scores[:, self.stop_col] = stop_logit
        return _StepDist(scores, torch.logaddexp(lse_tok, stop_logit))

    def token_of(self, col: Tensor) -> Tensor:
        """Token ids [B] of candidate columns [B] (a stop id for ⊤)."""
        return col if self.cand_ids is None else self.cand_ids[col]


def _behaviour(d: _StepDist, temp: Tensor, epsilon: float) -> Tensor:
    """Probabilities [B, C] of the behaviour policy: the policy tempered by ``temp`` [B, 1] (⊤ as one
    action), mixed with the uniform distribution over the allowed actions with weight ``epsilon``."""
    beh = torch.softmax(d.scores / temp, dim=-1)
    if epsilon > 0:
        allowed = torch.isfinite(d.scores).float()
        beh = (1 - epsilon) * beh + epsilon * allowed / allowed.sum(-1, keepdim=True)
    return beh


@torch.no_grad()
def sample(
    model,
    prompts: Sequence[Sequence[int]],
    prompt_index: Tensor | Sequence[int],
    constraints: Constraints,
    *,
    temperature: float | Tensor = 1.0,
    epsilon: float = 0.0,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    tool=None,
    tokenizer=None,
    max_tool_tokens: int = 0,
    prefix: PrefixCache | None = None,
    merge_adapters: bool = True,
    fast_decode: bool = True,
    compile_decoder: bool = False,
) -> Samples:
    """Sample one episode for each entry of ``prompt_index``.

    Args:
        model: a causal LM (its adapters, if any, are the policy). Put it in eval mode.
        prompts: P distinct prompts as token id lists.
        prompt_index: [B] which prompt each sample continues (e.g. ``[0]*16``).
        constraints: the action space (stop ids, lengths, allowed tokens).
        temperature: behaviour temperature, a float or a [B] tensor (per sample); ⊤ is tempered as one action.
        epsilon: probability of taking a uniformly random allowed action (ε-uniform exploration).
        pad_id: id used to pad ``tokens``.
        generator: torch random generator, on any device (:func:`episode_uniforms`). With a
            ``prefix_rule`` the rule's states are tracked on the CPU (one sync per token).
        tool: optional ``f(completion_text) -> str | None`` (e.g. :class:`gfnlm.tools.Calculator`),
            called after every action; its text is tokenised with ``tokenizer`` and appended to the
            state. Tool tokens are not actions (``action_mask`` False): they count in neither log q
            nor the length limits. At most ``max_tool_tokens`` tool tokens per episode (an output
            that does not fit is not inserted).
        prefix: optional :class:`PrefixCache` of a constant context read before every prompt
            (e.g. k solved examples); its keys and values are reused, not recomputed.
        merge_adapters: decode with LoRA updates folded into temporary weights
            (:func:`gfnlm.policy.merged_adapters`: the same policy, up to float rounding, at the cost of
            the plain model); False runs the adapter layers as they are.
        fast_decode: decode a Llama-architecture model with :class:`gfnlm.decoding.LlamaDecoder` (static
            KV cache, weights packed for the CPU's small-batch products, LoRA read from the adapters:
            the same policy up to float rounding, without merging); other models, or False, run the
            model's own forward (with ``merge_adapters``).
        compile_decoder: with the fast decoder, run its step's layers through :func:`torch.compile`
            (:meth:`gfnlm.decoding.LlamaDecoder._compiled_body`): the same policy up to float rounding,
            faster per token after a compilation of about a minute, once per process and batch size.

    Tensors are created on the model's device; only a tool's text round-trips through the CPU. The
    returned ``log_pf``/``log_pterm`` are always those of the policy itself (temperature 1, ε = 0),
    whatever behaviour policy drew the sample.
    """
    from .policy import merged_adapters

    device = next(model.parameters()).device
    check_fits(model, prompts, constraints.max_new_tokens + (max_tool_tokens if tool is not None else 0)
               + (prefix.length if prefix is not None else 0))
    if tool is not None and tokenizer is None:
        raise DataError("sampling with a tool needs the tokenizer (tokenizer=...)")
    if constraints.stop_after_tool and tool is None:
        raise DataError("stop_after_tool: episodes may stop only after a tool's output, but no tool was given")
    if constraints.prefix_rule is not None and tool is not None:
        raise DataError("a prefix rule (e.g. a regex constraint) and a tool cannot be combined: drop one of them")
    prompt_index = torch.as_tensor(prompt_index, dtype=torch.long).to(device)
    B = prompt_index.numel()
    temp = torch.as_tensor(temperature, dtype=torch.float32).to(device)
    temp = (temp.expand(B) if temp.ndim == 0 else temp)[:, None]
    decoder = LlamaDecoder.for_model(model, B, compile_decoder) if fast_decode else None
    with merged_adapters(model, merge_adapters and decoder is None) as lm:
        return _decode(lm, prompts, prompt_index, constraints, temp, epsilon, pad_id, generator, tool, tokenizer,
                       max_tool_tokens if tool is not None else 0, prefix, decoder)


def _decode(model, prompts, prompt_index: Tensor, constraints: Constraints, temp: Tensor, epsilon: float, pad_id: int,
            generator, tool, tokenizer, max_tool_tokens: int, prefix, decoder) -> Samples:
    """The decode loop of :func:`sample` (arguments checked and on the model's device; ``temp`` [B, 1];
    ``decoder`` a :class:`gfnlm.decoding.LlamaDecoder` or None for the model's forward)."""
    device = prompt_index.device
    B, N = prompt_index.numel(), constraints.max_new_tokens
    p_ids, p_mask = pad_prompts(prompts, pad_id, device)
    out, cache, full_mask = encode_prompts(model, p_ids, p_mask, prefix=prefix)
    logits = out.logits[prompt_index, -1, :]
    cache.batch_select_indices(prompt_index)
    attn = full_mask[prompt_index]
    next_pos = attn.sum(-1)  # [B] position id of the next token
    space = _ActionSpace(constraints, logits.shape[-1], device)

    S = N + max_tool_tokens  # room for actions and tool output
    kv = decoder.begin(cache, attn, S) if decoder is not None else None  # the static cache of this call
    u = episode_uniforms(generator, S, B, device)
    tokens = torch.full((B, S), pad_id, dtype=torch.long, device=device)
    action = torch.zeros((B, S), dtype=torch.bool, device=device)
    log_pf = torch.zeros((B, S), device=device)
    log_pterm = torch.full((B, S + 1), NEG_INF, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    n_act = torch.zeros(B, dtype=torch.long, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    after_tool = torch.zeros(B, dtype=torch.bool, device=device)  # the state ends with tool output
    forced = torch.zeros(B, dtype=torch.bool, device=device)  # a tool token is due at this state
    pending: list[list[int]] = [[] for _ in range(B)]  # tool tokens still to be written, per row
    tool_used = [0] * B
    rule = constraints.prefix_rule
    rule_states = [rule.start] * B if rule is not None else None
    V = logits.shape[-1]

    for t in range(S + 1):
        real = alive & ~forced  # states where the policy acts (may stop)
        rule_mask = accepting = None
        if rule is not None:  # the rule's state of each row: t actions taken (no tool with a rule)
            rule_mask = torch.stack([rule.allowed(st, N - t, V, device) for st in rule_states])
            accepting = torch.tensor([rule.accepting(st) for st in rule_states], device=device)
        can_stop, must_stop = constraints._can_stop(n_act, after_tool, accepting)
        d = space.dist(logits, can_stop, must_stop, rule_mask)
        stop_lp = d.scores[:, space.stop_col] - d.log_norm
        log_pterm[:, t] = torch.where(real, stop_lp, log_pterm[:, t])
        if t == S:
            break
        col = draw(_behaviour(d, temp, epsilon), u[t])
        choice = space.token_of(col)
        if tool is not None and forced.any():
            written = torch.tensor([q.pop(0) if q else pad_id for q in pending], device=device)
            choice = torch.where(forced, written, choice)
        stopped = (col == space.stop_col) & real
        cont = alive & ~stopped
        acted = cont & real
        tokens[:, t] = torch.where(cont, choice, tokens[:, t])
        action[:, t] = acted
        log_pf[:, t] = torch.where(acted, d.scores.gather(1, col[:, None]).squeeze(1) - d.log_norm, log_pf[:, t])
        lengths += cont.long()
        n_act += acted.long()
        after_tool = cont & ~acted  # a tool token was just written
        alive = cont
        if rule is not None:
            rule_states = [rule.advance(st, tok) if a else st
                           for st, tok, a in zip(rule_states, choice.tolist(), acted.tolist())]
        if tool is not None:
            for b in acted.nonzero().squeeze(1).tolist():
                pending[b] = tool_output(tool, tokenizer, tokens[b, : int(lengths[b])].tolist(), tool_used[b],
                                         max_tool_tokens)
                tool_used[b] += len(pending[b])
            forced = torch.tensor([bool(q) for q in pending], device=device) & alive
        if t % 8 == 7 and not alive.any():  # a device sync: checked now and then, not every token
            break
        # advance the cache by one token for every row (finished rows feed padding, ignored)
        step_ids = torch.where(alive, choice, torch.full_like(choice, pad_id))
        if decoder is not None:
            logits = decoder.step(kv, step_ids, next_pos)
            next_pos = next_pos + 1
            continue
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        out = model(input_ids=step_ids[:, None], attention_mask=attn, position_ids=next_pos[:, None], use_cache=True,
                    **cache_kwargs(model, cache))
        cache = output_cache(out)
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1

    width = int(lengths.max().item()) if B else 0
    return Samples(
        prompt_index=prompt_index,
        tokens=tokens[:, :width],
        lengths=lengths,
        log_pf=log_pf[:, :width],
        log_pterm=torch.where(
            torch.arange(width + 1, device=device)[None, :] <= lengths[:, None], log_pterm[:, : width + 1], NEG_INF
        ),
        action_mask=action[:, :width] if tool is not None else None,
    )
