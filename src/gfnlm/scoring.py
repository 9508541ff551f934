"""Policy scoring: one teacher-forced pass for log q of every token and of stopping.

Given prompts X and sampled (or replayed) completions z_1..z_n, one forward pass over
prompt + completion gives, for every prefix t = 0..n, the constrained distribution of the
next action, hence

* ``log_pf[b, t-1] = log q(z_t | X, z_<t)``  for t = 1..n,
* ``log_pterm[b, t] = log q(⊤ | X, z_1:t)``  for t = 0..n,

under exactly the :class:`~gfnlm.sampling.Constraints` used when sampling.  Each distinct
prompt is encoded once; its KV cache is then indexed out to all of its samples, which keeps
gradients exact (indexing is differentiable) while the prompt costs one row, not B rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .errors import ConfigError
from .sampling import (NEG_INF, Constraints, EpisodeStates, PrefixCache, cache_kwargs, check_fits, encode_prompts,
                       output_cache, pad_prompts)


@dataclass
class PolicyScores:
    """Output of :func:`score`.

    Attributes:
        log_pf: [B, N] log q(z_t | z_<t) (log space; 0 in padding).
        log_pterm: [B, N+1] log q(⊤ | z_1:t) (log space; -inf where stopping is impossible and
            beyond the length).
        prompt_hidden: [P, H] last-layer hidden state at the last prompt token (only when asked).
    """

    log_pf: Tensor
    log_pterm: Tensor
    prompt_hidden: Tensor | None = None


def completion_logits(model, prompts: Sequence[Sequence[int]], prompt_index: Tensor, tokens: Tensor, lengths: Tensor,
                      pad_id: int = 0, return_prompt_hidden: bool = False, prefix: PrefixCache | None = None):
    """Logits of the next action at every prefix t = 0..N of each completion.

    With ``prefix`` (a :class:`PrefixCache`), every prompt is read after that constant prefix,
    whose keys and values are reused instead of recomputed.

    Returns (logits [B, N+1, V], prompt_hidden [P, H] or None). Grad flows unless the caller
    disables it.
    """
    logits, hidden, _ = _completion_pass(model, prompts, prompt_index, tokens, return_prompt_hidden, prefix, pad_id)
    return logits, hidden


def _completion_pass(model, prompts, prompt_index: Tensor, tokens: Tensor, return_prompt_hidden: bool = False,
                     prefix: PrefixCache | None = None, pad_id: int = 0):
    """:func:`completion_logits` plus what a later pass needs to read on: (logits [B, N+1, V],
    prompt_hidden or None, (cache of prompt + tokens per row, prompt attention mask [B, L], position of
    each row's first token [B]))."""
    device = next(model.parameters()).device  # the model's device, whatever device the caller's tensors are on
    tokens, prompt_index = tokens.to(device), prompt_index.to(device)
    p_ids, p_mask = pad_prompts(prompts, pad_id, device)
    out, cache, full_mask = encode_prompts(model, p_ids, p_mask, output_hidden_states=return_prompt_hidden,
                                           prefix=prefix)
    hidden = out.hidden_states[-1][:, -1, :] if return_prompt_hidden else None
    first = out.logits[:, -1, :][prompt_index]  # [B, V]
    B, N = tokens.shape
    cache.batch_select_indices(prompt_index)
    ctx_mask = full_mask[prompt_index]
    start = ctx_mask.sum(-1)
    if N == 0:
        return first[:, None, :], hidden, (cache, ctx_mask, start)
    attn = torch.cat([ctx_mask, torch.ones((B, N), dtype=full_mask.dtype, device=device)], dim=1)
    positions = start[:, None] + torch.arange(N, device=device)[None, :]
    o = model(input_ids=tokens, attention_mask=attn, position_ids=positions, use_cache=True,
              **cache_kwargs(model, cache))  # logits [B, N, V]
    return torch.cat([first[:, None, :], o.logits], dim=1), hidden, (output_cache(o), ctx_mask, start)


def score(
    model,
    prompts: Sequence[Sequence[int]],
    prompt_index: Tensor,
    tokens: Tensor,
    lengths: Tensor,
    constraints: Constraints,
    *,
    pad_id: int = 0,
    return_prompt_hidden: bool = False,
    action_mask: Tensor | None = None,
) -> PolicyScores:
    """Teacher-forced log-probabilities of completions under the constrained policy.

    Args:
        model: causal LM (with adapters: the policy).
        prompts: P distinct prompts (token id lists).
        prompt_index: [B] long, prompt of each row.
        tokens: [B, N] long completions, padded (no stop token inside).
        lengths: [B] long.
        constraints: the same constraints as used for sampling.
        action_mask: [B, N] bool, False on tokens a tool wrote (see :func:`gfnlm.sampling.sample`);
            those get log_pf 0, states inside tool output cannot stop, and only actions count
            towards the length limits (with ``constraints.stop_after_tool``, only states that end
            with tool output may stop). None: every token is an action.

    Returns:
        :class:`PolicyScores` (log space).
    """
    check_fits(model, prompts, max(tokens.shape[1], 1))
    device = next(model.parameters()).device
    tokens, lengths, prompt_index = tokens.to(device), lengths.to(device), prompt_index.to(device)
    action_mask = None if action_mask is None else action_mask.to(device)
    logits, hidden = completion_logits(model, prompts, prompt_index, tokens, lengths, pad_id, return_prompt_hidden)
    B = logits.shape[0]
    st = EpisodeStates.of(lengths, tokens.shape[1], action_mask)
    next_tokens = torch.cat([tokens, tokens.new_full((B, 1), constraints.stop_token_ids[0])], dim=1)
    rule = None
    if constraints.prefix_rule is not None:  # the rule's mask and accepting flag after every prefix
        rule = constraints.rule_arrays(tokens, lengths, logits.shape[-1], device)
    tok, stop_lp = constraints.selected_log_probs(logits, st.n_act, next_tokens, st.after_tool, rule)  # [B, N+1] each
    log_pterm = torch.where(st.policy_acts, stop_lp, torch.full_like(stop_lp, NEG_INF))
    log_pf = torch.where(st.acts, tok[:, :-1], torch.zeros_like(tok[:, :-1]))
    return PolicyScores(log_pf=log_pf, log_pterm=log_pterm, prompt_hidden=hidden)


def action_log_probs(logits: Tensor, constraints: Constraints, tokens: Tensor | None = None,
                     lengths: Tensor | None = None) -> Tensor:
    """The whole constrained distribution of the next action at every prefix, from the logits of
    :func:`completion_logits` (episodes without tool output).

    Args:
        logits: [B, N+1, V] next-token logits (or any log-weights) at prefixes t = 0..N.
        constraints: the action space.
        tokens, lengths: the episodes ([B, N], [B]), needed where the constraints have a
            ``prefix_rule`` (its mask after each prefix).

    Returns:
        [B, N+1, V+1] log space, in fp32: column v < V the token v (-inf where the constraints forbid it
        at t, and for every stop id), column V the stop action ⊤ (the summed mass of the stop ids).
        Each row sums to 1. Rows beyond an episode's length are states it never visited.
    """
    if constraints.stop_after_tool:
        raise ConfigError("the whole action distribution is computed for constraints without a tool "
                          "(stop_after_tool): distil with labels instead")
    B, T, V = logits.shape
    rule = None
    if constraints.prefix_rule is not None:
        if tokens is None or lengths is None:
            raise ValueError("action_log_probs under a prefix_rule needs the episodes' tokens and lengths")
        rule = constraints.rule_arrays(tokens, lengths, V, logits.device)
    steps = torch.arange(T, device=logits.device).expand(B, T)
    logp, stop = constraints.log_probs(logits, steps, rule=rule)
    _, stop_mask = constraints.token_mask(V, logits.device)
    return torch.cat([logp.masked_fill(stop_mask, NEG_INF), stop[..., None]], dim=-1)


def continuation_log_probs(model, contexts: Sequence[Sequence[int]], context_index: Sequence[int],
                           sequences: Sequence[Sequence[int]], *, pad_id: int = 0, prefix: PrefixCache | None = None,
                           stop_token_ids: Sequence[int] | None = None, renormalise: Constraints | None = None,
                           renormalise_mask: Sequence[Sequence[bool]] | None = None,
                           max_batch_tokens: int | None = None) -> tuple[Tensor, Tensor | None]:
    """log p_LM of every token of each sequence after its context: the one teacher-forced
    likelihood pass that LM rewards, EM and evaluation share.

    Args:
        model: a causal LM, used as it is (the caller picks adapters; grad flows unless disabled).
        contexts: C distinct contexts (token id lists, each non-empty), read after ``prefix``.
        context_index: [R] the context of each sequence.
        sequences: R token id lists scored after their context (may be empty).
        prefix: optional :class:`PrefixCache` of a constant text read before every context.
        stop_token_ids: if given, also return log p(⊤) at every position: the summed probability of
            these ids.
        renormalise: optional :class:`Constraints`: the tokens where ``renormalise_mask[r]`` is True
            (default: all; the policy's actions) and ⊤ get the distribution renormalised over the
            allowed and stop ids (length limits ignored); the others (a tool's output, an answer
            outside the policy's vocabulary) are scored under the full vocabulary.
        max_batch_tokens: rows are scored in chunks of at most this many (rows × padded width)
            tokens after the context (at least one row per chunk); None: one chunk.

    Returns:
        token_logp [R, W] fp32, log p(s_k | C, s_<k) (0 beyond each length), and stop_logp
        [R, W+1] fp32, log p(⊤ | C, s_1:k) for k = 0..W (None without stop ids or ``renormalise``).
    """
    R = len(sequences)
    device = next(model.parameters()).device
    lengths_all = [len(s) for s in sequences]
    W = max(lengths_all, default=0)
    want_stop = stop_token_ids is not None or renormalise is not None
    tok_out = torch.zeros((R, W), device=device)
    stop_out = torch.full((R, W + 1), NEG_INF, device=device) if want_stop else None
    renormalise = _without_lengths(renormalise)
    for rows in _chunks(lengths_all, max_batch_tokens):
        used = sorted({int(context_index[r]) for r in rows})
        where = {c: i for i, c in enumerate(used)}
        index = torch.tensor([where[int(context_index[r])] for r in rows], device=device)
        width = max(lengths_all[r] for r in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            if lengths_all[r]:
                tokens[i, :lengths_all[r]] = torch.as_tensor(list(sequences[r]), device=device)
        lengths = torch.tensor([lengths_all[r] for r in rows], device=device)
        logits, _ = completion_logits(model, [list(contexts[c]) for c in used], index, tokens, lengths, pad_id,
                                      prefix=prefix)  # [r, width+1, V]
        inside = _inside(renormalise_mask, rows, width, device)
        tok, stop = _token_and_stop_log_probs(logits, tokens, stop_token_ids, renormalise, inside)
        valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
        sel = torch.tensor(rows, device=device)
        tok_out[sel, :width] = torch.where(valid, tok, torch.zeros_like(tok))
        if want_stop:
            stop_out[sel, :width + 1] = stop
    return tok_out, stop_out


def _without_lengths(c: Constraints | None) -> Constraints | None:
    """The constraints' vocabulary rule alone (length limits ignored), for renormalising a likelihood."""
    if c is None:
        return None
    return Constraints(stop_token_ids=list(c.stop_token_ids), min_new_tokens=0, max_new_tokens=10**9,
                       allowed_token_ids=c.allowed_token_ids, forbidden_token_ids=list(c.forbidden_token_ids))


def _inside(renormalise_mask, rows: Sequence[int], width: int, device) -> Tensor:
    """[len(rows), width] bool: where each row's tokens are renormalised (default everywhere)."""
    inside = torch.ones((len(rows), width), dtype=torch.bool, device=device)
    if renormalise_mask is not None:
        for i, r in enumerate(rows):
            m = list(renormalise_mask[r])[:width]
            inside[i] = torch.tensor(m + [False] * (width - len(m)), dtype=torch.bool, device=device)
    return inside


def _token_and_stop_log_probs(logits: Tensor, tokens: Tensor, stop_token_ids, renormalise: Constraints | None,
                              inside: Tensor) -> tuple[Tensor, Tensor | None]:
    """log p of each next token [r, w] and of ⊤ [r, w+1] from logits [r, w+1, V], in fp32: full
    softmax, or renormalised over ``renormalise``'s ids where ``inside`` [r, w] is True, and for ⊤."""
    r, w1, _ = logits.shape
    full = logits.float().log_softmax(-1)
    tok = full[:, :-1].gather(2, tokens[:, :, None]).squeeze(2)
    stop = None
    if renormalise is not None:
        steps = torch.zeros((r, w1), dtype=torch.long, device=logits.device)
        nxt = torch.cat([tokens, tokens.new_full((r, 1), renormalise.stop_token_ids[0])], dim=1)
        sel_tok, stop = renormalise.selected_log_probs(logits, steps, nxt)
        tok = torch.where(inside, sel_tok[:, :-1], tok)
    elif stop_token_ids is not None:
        stop = torch.logsumexp(full[..., torch.as_tensor(list(stop_token_ids), device=logits.device)], dim=-1)
    return tok, stop


def _chunks(lengths: Sequence[int], max_batch_tokens: int | None) -> list[list[int]]:
    """Consecutive row groups whose rows × (widest + 1) stays within ``max_batch_tokens``."""
    if not max_batch_tokens:
        return [list(range(len(lengths)))] if lengths else []
    out, cur, widest = [], [], 0
    for i, n in enumerate(lengths):
        w = max(widest, n)
        if cur and (len(cur) + 1) * (w + 1) > max_batch_tokens:
            out.append(cur)
            cur, w = [], n
        cur.append(i)
        widest = w
    if cur:
        out.append(cur)
    return out


def prefix_suffix_log_probs(model, contexts: Sequence[Sequence[int]], context_index: Sequence[int],
                            states: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
                            jobs: Sequence[tuple[int, int]], *, pad_id: int = 0, prefix: PrefixCache | None = None,
                            renormalise: Constraints | None = None,
                            renormalise_mask: Sequence[Sequence[bool]] | None = None,
                            max_batch_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """log p_LM of each state after its context, and of a suffix Y after each of several of its
    prefixes: what a reward log p(z_1:t Y | C) of every prefix t needs, in two short passes.

    One pass reads each state s_b after its context (each distinct context encoded once); then, for
    every job (b, t), one pass reads only Y_b, attending to the first t tokens of s_b through that
    pass's KV cache (the later state tokens are masked out, positions continue from t). The same
    numbers as scoring ``s_b,1:t + Y_b`` as its own sequence (:func:`continuation_log_probs`), for
    about |Y| tokens per job instead of t + |Y|.

    Args:
        contexts, context_index, prefix, pad_id: as :func:`continuation_log_probs`.
        states: B token id lists; suffixes: B non-empty token id lists, Y of each state.
        jobs: J pairs (b, t), 0 <= t <= len(states[b]).
        renormalise, renormalise_mask: the state tokens where the mask is True (default all) are
            scored renormalised over the constraints' allowed and stop ids; Y never is.
        max_batch_tokens: budget of one pass (rows × padded width), as there.

    Returns:
        state_logp [B, W] fp32, log p(s_b,k | C, s_b,<k) (0 beyond each length), and suffix_logp
        [J] fp32, log p(Y_b | C, s_b,1:t) summed over Y's tokens.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    B = len(states)
    W = max((len(s) for s in states), default=0)
    state_out = torch.zeros((B, W), device=device)
    suffix_out = torch.zeros(len(jobs), device=device)
    renormalise = _without_lengths(renormalise)
    jobs_of: dict[int, list[int]] = {}
    for j, (b, _) in enumerate(jobs):
        jobs_of.setdefault(int(b), []).append(j)
    for eps in _chunks([len(s) for s in states], max_batch_tokens):
        # pass 1: the states after their contexts
        used = sorted({int(context_index[b]) for b in eps})
        where = {c: i for i, c in enumerate(used)}
        idx = torch.tensor([where[int(context_index[b])] for b in eps], device=device)
        w = max(len(states[b]) for b in eps)
        tokens = torch.full((len(eps), w), pad_id, dtype=torch.long, device=device)
        for i, b in enumerate(eps):
            if states[b]:
                tokens[i, :len(states[b])] = torch.as_tensor(list(states[b]), device=device)
        logits, _, (cache, ctx_mask, start) = _completion_pass(model, [list(contexts[c]) for c in used], idx, tokens,
                                                               prefix=prefix, pad_id=pad_id)  # [e, w+1, V]
        inside = _inside(renormalise_mask, eps, w, device)
        tok, _ = _token_and_stop_log_probs(logits, tokens, None, renormalise, inside)
        lengths = torch.tensor([len(states[b]) for b in eps], device=device)
        valid = torch.arange(w, device=device)[None, :] < lengths[:, None]
        state_out[torch.tensor(eps, device=device), :w] = torch.where(valid, tok, torch.zeros_like(tok))
        # the first suffix token comes from pass 1's logits at prefix t (full vocabulary)
        mine = [j for b in eps for j in jobs_of.get(b, [])]
        if not mine:
            continue
        row = {b: i for i, b in enumerate(eps)}
        jr = torch.tensor([row[int(jobs[j][0])] for j in mine], device=device)
        jt = torch.tensor([int(jobs[j][1]) for j in mine], device=device)
        y0 = torch.tensor([suffixes[jobs[j][0]][0] for j in mine], device=device)
        suffix_out[torch.tensor(mine, device=device)] = logits[jr, jt].float().log_softmax(-1).gather(1, y0[:, None]).squeeze(1)
        # pass 2: the rest of each suffix, reading the state's cache up to t
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        rest = [len(suffixes[jobs[j][0]]) - 1 for j in mine]
        cached = ctx_mask.shape[1] + w  # every job row carries a copy of its state's cache
        for part in _chunks([cached + r for r in rest], max_batch_tokens):
            part = [p for p in part if rest[p] > 0]
            if not part:
                continue
            wy = max(rest[p] for p in part)
            sel, t = jr[part], jt[part]
            ys = torch.full((len(part), wy + 1), pad_id, dtype=torch.long, device=device)
            for i, p in enumerate(part):
                y = suffixes[jobs[mine[p]][0]]
                ys[i, :len(y)] = torch.as_tensor(list(y), device=device)
            attn = torch.cat([ctx_mask[sel], (torch.arange(w, device=device)[None, :] < t[:, None]).to(ctx_mask.dtype),
                              torch.ones((len(part), wy), dtype=ctx_mask.dtype, device=device)], dim=1)
            o = model(input_ids=ys[:, :wy], attention_mask=attn,
                      position_ids=(start[sel] + t)[:, None] + torch.arange(wy, device=device)[None, :], use_cache=True,
                      **cache_kwargs(model, DynamicCache(ddp_cache_data=[(k[sel], v[sel]) for k, v in layers])))
            lp = o.logits.float().log_softmax(-1).gather(2, ys[:, 1:, None]).squeeze(2)  # [p, wy]
            n = torch.tensor([rest[p] for p in part], device=device)
            lp = torch.where(torch.arange(wy, device=device)[None, :] < n[:, None], lp, torch.zeros_like(lp))
            suffix_out[torch.tensor([mine[p] for p in part], device=device)] += lp.sum(1)
    return state_out, suffix_out
