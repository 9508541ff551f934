"""Sequential Monte Carlo baseline through genlm-control, on the same target as the GFlowNet policy.

The optional dependency ``genlm-control`` (``pip install 'gfnlm[smc]'``; part of the test set-up)
runs SMC over a product of *potentials*; this module builds them from gfnlm's own pieces so that SMC
targets exactly the distribution the policy's reward defines:

* one :class:`LMTerm` per factor p̃(Z ⊤ | context)^weight, where p̃ is the base LM (genlm's
  ``PromptedLLM`` on genlm-backend's ``AsyncTransformer``, wrapping the model object given here, so no
  download) restricted to the legal tokens of the :class:`~gfnlm.sampling.Constraints` and its stop
  ids (genlm's EOS, their probabilities summed) and renormalised over them step by step, as
  :class:`~gfnlm.rewards.LMLikelihoodReward` does with ``renormalise=True`` (length limits ignored);
* the length limits and the constraints' ``prefix_rule`` (e.g. a regex) as a 0 / -inf factor that is
  *not* renormalised: no token after ``max_new_tokens``, no stop before ``min_new_tokens``, and the
  rule's prefix weight 0 while a match stays reachable in the remaining length;
* an optional terminal predicate (e.g. keywords) as a factor that is 0 on every prefix and 0 / -inf on a
  complete sequence.

The proposal is genlm's ``direct_token_sampler`` on the whole product: each token is drawn from the
product's next-token weights renormalised (locally constrained decoding, or the token-level contrastive
rule), and the particle is weighted by the normaliser, with resampling when the ESS falls below
``ess_threshold``: the particles are properly weighted for the target, and ``log_ml`` estimates its
log Z (unbiased in Z).

Cost is counted as the rows of the LM's forward passes: one per distinct context whose next-token
distribution the backend computed (particles with the same context in one batch, e.g. all of them
before the first token or clones after resampling, are one row; a prompt's prefill is one). That is
the unit of "LM calls" elsewhere: a sample of n tokens read by a sampler costs n + 1, stop included.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import ConfigError
from .sampling import Constraints


@dataclass
class LMTerm:
    """One factor of the target, weight · log p̃(Z ⊤ | context): ``context_ids`` the token ids the base
    LM conditions on (a rendered prompt, or an unconditional context), ``weight`` its exponent;
    ``renormalise`` False scores with the LM's own softmax (p(z) · 1[z legal]), not renormalised."""

    context_ids: list[int]
    weight: float = 1.0
    renormalise: bool = True


def lm_terms(rewards, row: dict, prompt_ids: Sequence[int], tokenizer, constraints: Constraints,
             weights: Sequence[float] | None = None) -> list[LMTerm]:
    """The LM factors of a task's own reward for one row: each :class:`~gfnlm.rewards.LMLikelihoodReward`
    (of the base LM, scoring the states and the stop action, no suffix, no shared prefix, built on
    ``constraints``' action space) as an
    :class:`LMTerm` with its context and its weight times ``weights[i]`` (``config.reward_weights``).
    Any other reward is a one-line error: give its condition to :func:`run_smc` as a ``predicate``."""
    from .rewards import LMLikelihoodReward

    def space(c):
        return (sorted(c.stop_token_ids), None if c.allowed_token_ids is None else sorted(c.allowed_token_ids),
                sorted(c.forbidden_token_ids))

    out = []
    for i, r in enumerate(rewards):
        if (not isinstance(r, LMLikelihoodReward) or r.suffix is not None or r.shared_prefix
                or r.score != "state+end" or r.base_lm is None):
            raise ConfigError(f"SMC reads LM-likelihood rewards of the base LM (model=) that score the states and the stop "
                              f"action (no suffix, no shared prefix, score='state+end'); {r.name!r} is not one: pass its "
                              "condition as run_smc(predicate=...)")
        if r.constraints is None or space(r.constraints) != space(constraints):
            raise ConfigError(f"reward {r.name!r} scores another action space than SMC samples: build it with the same "
                              "constraints")
        w = r.weight * (1.0 if weights is None else float(weights[i]))
        out.append(LMTerm(r.context_ids(row, prompt_ids, r.tokenizer or tokenizer), w, r.renormalise))
    return out


@dataclass
class SMCResult:
    """One SMC run: the particles' completions (token ids, stop excluded), their final log weights, the
    log marginal-likelihood estimate log Ẑ and the rows of the LM's forward passes (its cost)."""

    completions: list[list[int]]
    log_weights: list[float]
    log_ml: float
    lm_calls: int

    def resample(self, n: int, generator: torch.Generator) -> list[list[int]]:
        """``n`` completions drawn in proportion to the weights (multinomial); [] when every weight is 0."""
        w = torch.tensor(self.log_weights, dtype=torch.float64)
        if not torch.isfinite(w).any():
            return []
        idx = torch.multinomial(torch.softmax(w, 0), n, replacement=True, generator=generator)
        return [list(self.completions[i]) for i in idx.tolist()]

    def weighted(self) -> list[tuple[list[int], float]]:
        """(completion, normalised weight) of every particle with a positive weight."""
        w = np.asarray(self.log_weights, dtype=np.float64)
        if not np.isfinite(w).any():
            return []
        p = np.exp(w - w.max())
        p /= p.sum()
        return [(list(c), float(x)) for c, x in zip(self.completions, p) if x > 0]


def _require_genlm():
    try:
        import genlm.control  # noqa: F401
    except ImportError as e:
        raise ConfigError("the SMC baseline needs genlm-control: pip install 'gfnlm[smc]' "
                          f"(import failed: {e})") from None


def _potentials():
    """The genlm classes (imported lazily: genlm-control is optional)."""
    from genlm.backend.llm import AsyncTransformer
    from genlm.control import Potential

    class CountingLM(AsyncTransformer):
        """genlm-backend's HF wrapper that counts the rows of its forward passes."""

        calls = 0

        def _evaluate_queries(self, queries):  # one forward row per distinct context (genlm's own dedup)
            self.calls += len({tuple(q.prompt) for q in queries})
            return super()._evaluate_queries(queries)

    class ActionRule(Potential):
        """The actions ``constraints`` allow, as a 0 / -inf potential over the LM's token vocabulary: the
        legal tokens; with ``limits``, the length limits too (no token after ``max_new_tokens``, no stop
        before ``min_new_tokens``) and the prefix rule (only tokens from which its match stays reachable
        in the remaining length, a stop only where it accepts)."""

        def __init__(self, vocab, constraints: Constraints, limits: bool, tables=None):
            super().__init__(vocab, tables=tables)
            self.c = constraints
            self.limits = limits
            self.rule = constraints.prefix_rule if limits else None
            self.ids = np.array([t.token_id for t in vocab])
            self.width = int(max(self.ids.max(), *constraints.stop_token_ids)) + 1
            self.legal = constraints.token_mask(self.width, "cpu")[0].numpy()[self.ids]
            self.pos = {int(i): j for j, i in enumerate(self.ids)}

        def _tokens_ok(self, t: int, state) -> np.ndarray:
            """Bool [V]: the tokens allowed after t actions in rule state ``state``."""
            if self.limits and t >= self.c.max_new_tokens:
                return np.zeros_like(self.legal)
            if self.rule is None:
                return self.legal
            return self.legal & self.rule.allowed(state, self.c.max_new_tokens - t, self.width, "cpu").numpy()[self.ids]

        def _walk(self, context) -> tuple[bool, object]:
            """Whether every token of ``context`` was a legal action, and the rule's state after it."""
            state = self.rule.start if self.rule is not None else None
            for t, tok in enumerate(context):
                j = self.pos.get(tok.token_id)
                if j is None or not self.legal[j] or (self.limits and t >= self.c.max_new_tokens):
                    return False, None
                if self.rule is not None:
                    if not self.rule.allowed(state, self.c.max_new_tokens - t, self.width, "cpu")[tok.token_id]:
                        return False, None
                    state = self.rule.advance(state, tok.token_id)
            return True, state

        def _can_stop(self, n: int, state) -> bool:
            if not self.limits:
                return True
            return n >= self.c.min_new_tokens and (self.rule is None or self.rule.accepting(state))

        async def prefix(self, context):
            return 0.0 if self._walk(context)[0] else float("-inf")

        async def complete(self, context):
            ok, state = self._walk(context)
            return 0.0 if ok and self._can_stop(len(context), state) else float("-inf")

        async def logw_next(self, context):
            ok, state = self._walk(context)
            w = np.full(len(self.vocab) + 1, float("-inf"))
            if ok:
                w[:-1][self._tokens_ok(len(context), state)] = 0.0
                if self._can_stop(len(context), state):
                    w[-1] = 0.0
            return self.make_lazy_weights(w)

    class Predicate(Potential):
        """A terminal predicate on the completion's token ids as a 0 / -inf potential: every prefix 0,
        a complete sequence 0 where ``fn`` holds. In the product it also keeps the proposal from
        stopping where the predicate fails."""

        def __init__(self, vocab, fn, tables=None):
            super().__init__(vocab, tables=tables)
            self.fn = fn

        async def prefix(self, context):
            return 0.0

        async def complete(self, context):
            return 0.0 if self.fn([t.token_id for t in context]) else float("-inf")

        async def logw_next(self, context):
            w = np.zeros(len(self.vocab) + 1)
            w[-1] = await self.complete(context)
            return self.make_lazy_weights(w)

    return CountingLM, ActionRule, Predicate


def _token_maps(llm, stop_ids: Sequence[int]):
    """genlm's token tables with exactly ``stop_ids`` as EOS (genlm's own constructor would also treat
    every other token with the same bytes as EOS)."""
    from genlm.control import Potential
    from genlm.control.potential.built_in.llm import TokenMappings, _TokenEncodeDict

    decode = llm.byte_vocab
    stops = [int(i) for i in dict.fromkeys(stop_ids)]
    eos_objs = [decode[i] for i in stops]
    vocab = [t for t in decode if t.token_id not in set(stops)]
    return TokenMappings(decode=decode, encode=_TokenEncodeDict({t: i for i, t in enumerate(decode)}),
                         eos_idxs=stops, eos_byte_strings=[t.byte_string for t in eos_objs],
                         eos_token_objs=eos_objs, potential_vocab=vocab, tables=Potential.build_tables(vocab))


def run_smc(model, tokenizer, constraints: Constraints, targets: Sequence[Sequence[LMTerm]], *, n_particles: int,
            ess_threshold: float = 0.5, predicate: Callable[[list[int]], bool] | None = None, seed: int = 0,
            progress: bool = False, desc: str = "SMC") -> list[SMCResult]:
    """SMC with ``n_particles`` particles for each target (one per prompt), on the target
    Π_terms p̃(Z ⊤ | context)^weight · c(Z) · predicate(Z).

    Args:
        model: the base causal LM (adapters off: pass it inside :func:`gfnlm.policy.base_model`).
        tokenizer: its tokenizer.
        constraints: the legal actions, stop ids, lengths and optional ``prefix_rule`` (the c factor).
        targets: per prompt, its terms (:class:`LMTerm`).
        predicate: optional terminal predicate on the completion's token ids.
        seed: seeds torch's and numpy's global generators inside this call (genlm draws from them);
            both are restored afterwards.
    Returns:
        One :class:`SMCResult` per target.
    """
    _require_genlm()
    if n_particles < 1:
        raise ConfigError(f"SMC needs at least one particle (got n_particles={n_particles})")
    if constraints.stop_after_tool:
        raise ConfigError("SMC does not run tools: it cannot sample under stop_after_tool")
    width = model.get_output_embeddings().weight.shape[0]
    if width != len(tokenizer) and constraints.allowed_token_ids is None:
        raise ConfigError(f"the model scores {width} token ids but its tokenizer has {len(tokenizer)}: SMC can only "
                          "write the tokenizer's, so list the legal ones in allowed_token_ids (or forbid the others)")
    from genlm.control import SMC, PromptedLLM, direct_token_sampler

    CountingLM, ActionRule, Predicate = _potentials()
    lm = CountingLM(model, tokenizer)
    maps = _token_maps(lm, constraints.stop_token_ids)
    vocab = maps.potential_vocab
    legal = ActionRule(vocab, constraints, limits=False, tables=maps.tables)  # what p̃ renormalises over
    limits = ActionRule(vocab, constraints, limits=True, tables=maps.tables)  # lengths and rule: not renormalised
    pred = Predicate(vocab, predicate, tables=maps.tables) if predicate is not None else None

    async def one(terms: Sequence[LMTerm]) -> SMCResult:
        target = None
        for term in terms:
            p = PromptedLLM(lm, prompt_ids=list(term.context_ids), token_maps=maps) * legal
            p = p.normalize() if term.renormalise else p
            if term.weight != 1.0:
                p = p ** term.weight
            target = p if target is None else target * p
        target = target * limits
        if pred is not None:
            target = target * pred
        before = lm.calls
        seqs = await SMC(direct_token_sampler(target))(n_particles=n_particles, ess_threshold=ess_threshold,
                                                        max_tokens=constraints.max_new_tokens + 1)
        comps = [[t.token_id for t in ctx if not _is_eos(t)] for ctx in seqs.contexts]
        out = SMCResult(comps, [float(w) for w in seqs.log_weights], float(seqs.log_ml), lm.calls - before)
        lm.clear_cache()
        return out

    async def all_targets() -> list[SMCResult]:
        from tqdm.auto import tqdm

        return [await one(t) for t in tqdm(targets, desc=desc, disable=not progress)]

    def go() -> list[SMCResult]:  # genlm draws from torch's CPU generator and numpy's global one
        torch_state, np_state = torch.get_rng_state(), np.random.get_state()
        try:
            torch.default_generator.manual_seed(seed)
            np.random.seed(seed % 2**32)
            with warnings.catch_warnings():
                # genlm-backend passes past_key_values, which transformers 5 deprecates, on every forward
                warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
                return asyncio.run(all_targets())
        finally:
            torch.set_rng_state(torch_state)
            np.random.set_state(np_state)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return go()
    from concurrent.futures import ThreadPoolExecutor  # called from a running event loop (a notebook)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(go).result()


def _is_eos(token) -> bool:
    from genlm.control.constant import EndOfSequence

    return isinstance(token, EndOfSequence)
