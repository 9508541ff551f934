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

from .sampling import (NEG_INF, Constraints, PrefixCache, cache_kwargs, check_fits, encode_prompts, pad_prompts,
                       tool_output_ends)


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
    device = tokens.device
    p_ids, p_mask = pad_prompts(prompts, pad_id, device)
    out, cache, full_mask = encode_prompts(model, p_ids, p_mask, output_hidden_states=return_prompt_hidden,
                                           prefix=prefix)
    hidden = out.hidden_states[-1][:, -1, :] if return_prompt_hidden else None
    first = out.logits[:, -1, :][prompt_index]  # [B, V]
    B, N = tokens.shape
    if N == 0:
        return first[:, None, :], hidden
    cache.batch_select_indices(prompt_index)
    attn = torch.cat([full_mask[prompt_index], torch.ones((B, N), dtype=full_mask.dtype, device=device)], dim=1)
    start = full_mask.sum(-1)[prompt_index]
    positions = start[:, None] + torch.arange(N, device=device)[None, :]
    rest = model(input_ids=tokens, attention_mask=attn, position_ids=positions, use_cache=True,
                 **cache_kwargs(model, cache)).logits  # [B, N, V]
    return torch.cat([first[:, None, :], rest], dim=1), hidden


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
    prompt_index = prompt_index.to(tokens.device)
    logits, hidden = completion_logits(model, prompts, prompt_index, tokens, lengths, pad_id, return_prompt_hidden)
    B, N1, _ = logits.shape
    device = tokens.device
    positions = torch.arange(N1, device=device).expand(B, N1)
    in_range = positions < lengths[:, None]  # [B, N+1]: a token follows state t
    if action_mask is None:
        acts = in_range[:, :-1]
    else:
        acts = action_mask.to(device).bool() & in_range[:, :-1]
    steps = torch.cat([torch.zeros_like(lengths)[:, None], acts.long().cumsum(1)], dim=1)  # actions so far
    next_tokens = torch.cat([tokens, tokens.new_full((B, 1), constraints.stop_token_ids[0])], dim=1)
    after_tool = tool_output_ends(acts, lengths)  # where stop_after_tool allows a stop
    tok, stop_lp = constraints.selected_log_probs(logits, steps, next_tokens, after_tool)  # [B, N+1] each
    # the policy acts (and may stop) at the end and before each of its own actions, not inside tool output
    real = (positions == lengths[:, None]) | torch.cat([acts, acts.new_zeros((B, 1))], dim=1)
    log_pterm = torch.where(real, stop_lp, torch.full_like(stop_lp, NEG_INF))
    log_pf = torch.where(acts, tok[:, :-1], torch.zeros_like(tok[:, :-1]))
    return PolicyScores(log_pf=log_pf, log_pterm=log_pterm, prompt_hidden=hidden)
