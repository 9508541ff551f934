"""Decoding baselines through transformers' ``generate``, under the policy's own action space.

Every baseline reads the same :class:`~gfnlm.sampling.Constraints` as the GFlowNet policy and its
reward, translated into ``generate``'s own logits processors, so a baseline can write exactly the
texts the policy can write:

* the tokens that are neither allowed actions nor stop ids are suppressed (``suppress_tokens``);
* the stop ids end a sequence (``eos_token_id``), and cannot come before ``min_new_tokens``;
* after ``max_new_tokens`` actions a stop is forced (``forced_eos_token_id`` at
  ``max_new_tokens + 1``), as the policy's forced stop;
* a ``prefix_rule`` (a regex, no repeated n-gram) masks what it forbids after each prefix, and the
  stop where the text so far does not satisfy it (:class:`RuleMask`).

For the samplers (plain, tempered, nucleus) ``generate`` also returns the processed scores, so each
sample's exact log q (stop included) comes from transformers itself
(``compute_transition_scores(normalize_logits=True)``): the figure the sampler diagnostics need.
Greedy and beam search are deterministic: they have no tractable q.

Diverse beam search (Vijayakumar et al., 2016) splits the beams into groups; a group's beam search
subtracts from each token's log-probability ``diversity_penalty`` times the number of times earlier
groups chose that token at the same step (Hamming diversity). transformers 5 moved its own version
to a Hub repository that ``generate`` would download at run time, so gfnlm runs it with
``generate``'s own beam search, one group after another: group g's choices depend only on groups
before it, so this is the same search as running the groups in lockstep, except that an earlier
group's tokens stop counting from its last step on (the step where its search ends, whose running
beams are discarded; transformers 4.x counted a finished group's padding). A group of one beam
decodes greedily (``generate`` with one beam is greedy decoding), where transformers 4.x ran a
one-beam beam search with length normalisation: so k beams in k groups is *diverse greedy*
decoding and is labelled so. A :class:`HammingDiversity` logits processor applies the penalty and
records the group's choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError
from .sampling import Constraints

#: name -> what ``generate`` is asked for (``{k}``: the number of samples or beams).
METHODS = {
    "greedy": "greedy decoding (one sequence)",
    "beam": "beam search with k beams, k sequences returned",
    "nucleus": "nucleus sampling, p = 0.95",
    "sampling": "plain sampling from the LM (T = 1)",
    "tempered": "tempered sampling at the final reward temperature",
    "diverse_beam": ("diverse beam search: k beams in `groups` groups (Hamming diversity, penalty "
                     "`diversity_penalty`), the best sequence of each group"),
    "token_level": ("each token from p(z_t | X, z_<t)^a p(z_t | U, z_<t)^b renormalised (a contrastive target's "
                    "local form): classifier-free guidance a / (a + b) at temperature 1 / (a + b), U the negative prompt"),
}


@dataclass
class Decoded:
    """The completions of one prompt: token ids without the stop, and log q (stop included) where
    the method has one (samplers), else None."""

    completions: list[list[int]]
    log_q: list[float] | None = None
    calls: int = 0  # LM token evaluations that generated them (decode steps x rows; the prompt's encoding not counted)


def generate_kwargs(constraints: Constraints, vocab_size: int) -> dict:
    """``generate`` keywords that impose ``constraints`` (suppressed tokens, stop ids, min/forced stop)."""
    if constraints.stop_after_tool:
        raise ConfigError("generate baselines do not run tools: constraints with stop_after_tool have no baseline here")
    allowed, stop = constraints.token_mask(vocab_size, "cpu")
    stops = list(constraints.stop_token_ids)
    return dict(suppress_tokens=(~(allowed | stop)).nonzero().squeeze(1).tolist(), eos_token_id=stops,
                min_new_tokens=constraints.min_new_tokens, max_new_tokens=constraints.max_new_tokens + 1,
                forced_eos_token_id=stops)


def _method_kwargs(method: str, k: int, temperature: float | None, weights: tuple[float, float] | None = None) -> dict:
    if method == "greedy":
        return dict(do_sample=False, num_beams=1)
    if method == "beam":
        return dict(do_sample=False, num_beams=k, num_return_sequences=k)
    if method == "diverse_beam":
        return dict(do_sample=False)  # the beams per group: see decode
    if method in ("sampling", "tempered", "nucleus"):
        t = temperature if method == "tempered" else 1.0
        if method == "tempered" and t is None:
            raise ConfigError("the tempered baseline needs a temperature")
        return dict(do_sample=True, temperature=t, top_k=0, top_p=0.95 if method == "nucleus" else 1.0,
                    num_return_sequences=k)
    if method == "token_level":
        if weights is None or sum(weights) <= 0:
            raise ConfigError(f"the token-level baseline needs weights (a, b) with a + b > 0, not {weights}")
        a, b = weights  # a·log p(.|X) + b·log p(.|U) = (a + b)·[γ·log p(.|X) + (1 - γ)·log p(.|U)], γ = a / (a + b)
        return dict(do_sample=True, temperature=1.0 / (a + b), guidance_scale=a / (a + b), top_k=0, top_p=1.0,
                    num_return_sequences=k)
    raise ConfigError(f"unknown baseline {method!r}: choose from {sorted(METHODS)}")


def _cut(row: list[int], stops: set[int]) -> tuple[list[int], int]:
    """(tokens before the first stop id, number of generated tokens up to and including it)."""
    for i, t in enumerate(row):
        if t in stops:
            return row[:i], i + 1
    return row, len(row)


class RuleMask:
    """``generate`` logits processor for the constraints' ``prefix_rule``: in each row, the tokens the
    rule forbids after the tokens generated so far get -inf, and so do the stop ids where the text so
    far does not satisfy the rule (except at the forced stop). Rows that have stopped are left alone.
    ``prompt_len``: the width of the (left-padded) prompts."""

    def __init__(self, constraints: Constraints, prompt_len: int):
        self.c, self.rule, self.prompt_len = constraints, constraints.prefix_rule, prompt_len
        self.stops = set(constraints.stop_token_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - self.prompt_len  # actions taken so far
        V = scores.shape[-1]
        keep = torch.ones_like(scores, dtype=torch.bool, device="cpu")
        stop_ids = torch.tensor(self.c.stop_token_ids)
        for r, row in enumerate(input_ids[:, self.prompt_len:].tolist()):
            z, _ = _cut(row, self.stops)
            if len(z) < len(row):  # stopped: generate pads it from here on
                continue
            state = self.rule.walk(z)[-1]
            keep[r] = self.rule.allowed(state, self.c.max_new_tokens - t, V, "cpu")
            keep[r, stop_ids] = t >= self.c.max_new_tokens or self.rule.accepting(state)
        return scores.masked_fill(~keep.to(scores.device), float("-inf"))


class HammingDiversity:
    """``generate`` logits processor for one group of diverse beam search on one prompt: subtracts
    ``penalty`` x ``earlier[t, v]`` (times earlier groups chose token v at step t) from the
    log-probabilities at step t, and adds the tokens this group's running beams chose to ``chosen``
    ([max steps, vocab] counts, the next group's ``earlier``)."""

    def __init__(self, earlier: torch.Tensor, penalty: float, prompt_len: int):
        self.earlier, self.penalty, self.prompt_len = earlier, penalty, prompt_len
        self.chosen = torch.zeros_like(earlier)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - self.prompt_len  # the step being decided; row i's last token was chosen at t - 1
        if t > 0:
            last = input_ids[:, -1].to(self.chosen.device)
            self.chosen[t - 1].index_add_(0, last, torch.ones(last.shape[0], device=self.chosen.device))
        return scores - self.penalty * self.earlier[t].to(scores.device, scores.dtype)


def _diverse_beam(model, ids: torch.Tensor, pad: int, kw: dict, k: int, groups: int, penalty: float,
                  stops: set[int], constraints: Constraints | None = None) -> Decoded:
    """Diverse beam search on one prompt (``ids`` [1, L]): ``groups`` beam searches of k / groups beams
    run one after another, each penalised by the earlier groups' choices; the best sequence of each."""
    from transformers import LogitsProcessorList

    if groups < 1 or k % groups:
        raise ConfigError(f"diverse beam search splits {k} beams into {groups} groups: the beams must be a "
                          "multiple of the groups")
    size, steps = k // groups, kw["max_new_tokens"] + 1
    vocab = model.get_output_embeddings().weight.shape[0]
    earlier = torch.zeros(steps, vocab, device=ids.device)  # where the scores are: no copy a step
    completions, calls = [], 0
    for _ in range(groups):
        proc = HammingDiversity(earlier, penalty, ids.shape[1])
        procs = [proc] + ([RuleMask(constraints, ids.shape[1])] if constraints and constraints.prefix_rule else [])
        res = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, num_beams=size,
                             num_return_sequences=1, logits_processor=LogitsProcessorList(procs),
                             output_scores=True, return_dict_in_generate=True, **kw)
        completions.append(_cut(res.sequences[0, ids.shape[1]:].tolist(), stops)[0])
        calls += len(res.scores) * size  # every beam runs to the end of its group's search
        earlier = earlier + proc.chosen
    return Decoded(completions, None, calls=calls)


@torch.no_grad()
def decode(model, tokenizer, prompts: Sequence[Sequence[int]], constraints: Constraints, method: str, k: int, *,
           temperature: float | None = None, seed: int = 0, batch_rows: int = 64,
           weights: tuple[float, float] | None = None, negative_prompt: Sequence[int] | None = None,
           groups: int | None = None, diversity_penalty: float = 1.0) -> list[Decoded]:
    """``k`` completions of each prompt by ``method`` (see :data:`METHODS`) under ``constraints``
    (diverse beam search: ``groups`` completions, the best of each group of its ``k`` beams; default
    ``groups = k``).

    ``model`` is the LM to decode (the base model for a baseline); ``temperature`` is the tempered
    baseline's; ``weights`` (a, b) and ``negative_prompt`` (the token ids of U) the token-level
    contrastive sampler's. Prompts are left-padded and decoded together, about ``batch_rows`` rows (prompts x k)
    a call (diverse beam search: one prompt a call, so that each group's search ends with its prompt's).
    Samplers are seeded with ``seed`` (torch's global generator, which ``generate`` uses)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else constraints.stop_token_ids[0]
    kw = {**generate_kwargs(constraints, max(len(tokenizer), model.get_output_embeddings().weight.shape[0])),
          **_method_kwargs(method, k, temperature, weights)}
    if method == "token_level" and not negative_prompt:
        raise ConfigError("the token-level baseline needs the negative prompt's token ids (negative_prompt=...)")
    rows = max(kw.get("num_beams", 1), kw.get("num_return_sequences", 1))  # rows decoded per prompt
    per_call = max(1, batch_rows // rows)
    stops = set(constraints.stop_token_ids)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[Decoded] = []
    try:
        if method == "diverse_beam":
            for p in prompts:
                out.append(_diverse_beam(model, torch.tensor([list(p)], device=device), pad, kw, k, groups or k,
                                         diversity_penalty, stops, constraints))
            return out
        for i in range(0, len(prompts), per_call):
            chunk = [list(p) for p in prompts[i:i + per_call]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            extra = {}
            if method == "token_level":  # the unconditional branch: one row per generated row
                neg = torch.tensor([list(negative_prompt)] * (len(chunk) * rows), device=device)
                extra = dict(negative_prompt_ids=neg, negative_prompt_attention_mask=torch.ones_like(neg))
            if constraints.prefix_rule is not None:
                from transformers import LogitsProcessorList

                extra["logits_processor"] = LogitsProcessorList([RuleMask(constraints, width)])
            res = model.generate(ids, attention_mask=mask, pad_token_id=pad, output_scores=True,
                                 return_dict_in_generate=True, **kw, **extra)
            cut = [_cut(r, stops) for r in res.sequences[:, width:].tolist()]
            log_q = None
            if kw["do_sample"]:
                steps = model.compute_transition_scores(res.sequences, res.scores, normalize_logits=True)  # [P k, steps]
                log_q = [float(steps[b, :n].sum()) for b, (_, n) in enumerate(cut)]
            per = len(cut) // len(chunk)
            for j in range(len(chunk)):
                part = slice(j * per, (j + 1) * per)
                calls = (len(res.scores) * rows if method == "beam" else  # every beam runs to the end
                         sum(n for _, n in cut[part]) * (2 if method == "token_level" else 1))  # two branches
                out.append(Decoded([c for c, _ in cut[part]], None if log_q is None else log_q[part], calls=calls))
    finally:
        model.train(was_training)
    return out
