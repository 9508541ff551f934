"""Evaluation helpers shared by tasks: batched sampling, exact sequence probabilities, and the
diagnostics of a sampler against its target (:func:`sampler_report`)."""

from __future__ import annotations

from typing import Sequence

import torch

from .sampling import Constraints, pad_right, sample
from .scoring import score


@torch.no_grad()
def sample_completions(model, tokenizer, prompt_ids: Sequence[int], constraints: Constraints, n: int, *,
                       batch_size: int = 512, temperature: float = 1.0, seed: int = 0, progress: bool = False,
                       desc: str = "sampling", tool=None, max_tool_tokens: int = 0, prefix=None) -> list[str]:
    """Draw ``n`` completions (decoded text, stop token excluded; tool output included) for one prompt
    (read after ``prefix``, a :class:`~gfnlm.sampling.PrefixCache`, if given)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str] = []
    with tqdm(total=n, disable=not progress, desc=desc, leave=False) as bar:
        while len(out) < n:
            k = min(batch_size, n - len(out))
            s = sample(model, [list(prompt_ids)], [0] * k, constraints, temperature=temperature, pad_id=pad, generator=g,
                       tool=tool, tokenizer=tokenizer, max_tool_tokens=max_tool_tokens, prefix=prefix)
            out += [tokenizer.decode(c, skip_special_tokens=False) for c in s.completion_ids()]
            bar.update(k)
    return out


@torch.no_grad()
def sample_votes(model, tokenizer, prompts: Sequence[Sequence[int]], constraints: Constraints, k: int,
                 temperature: float, *, seed: int = 0, batch_prompts: int = 8, tool=None, max_tool_tokens: int = 0,
                 prefix=None) -> list[tuple[list[list[int]], list[int]]]:
    """What a posterior-predictive vote reads: for each prompt, ``k`` completions sampled at
    ``temperature`` and one greedy completion (token id lists; tool output included, stop excluded).

    Prompts are sampled ``batch_prompts`` at a time, k + 1 rows each; ``prefix`` (a
    :class:`~gfnlm.sampling.PrefixCache`) is a constant context read before every prompt.
    Returns ``[(sampled [k], greedy)]`` in the order of ``prompts``."""
    g = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    temps = torch.tensor([temperature] * k + [1e-4])  # the last row of each prompt: greedy
    out = []
    for i in range(0, len(prompts), batch_prompts):
        chunk = [list(p) for p in prompts[i:i + batch_prompts]]
        index = torch.arange(len(chunk)).repeat_interleave(k + 1)
        s = sample(model, chunk, index, constraints, temperature=temps.repeat(len(chunk)), pad_id=pad, generator=g,
                   tool=tool, tokenizer=tokenizer, max_tool_tokens=max_tool_tokens, prefix=prefix)
        ids = s.completion_ids()
        out += [(ids[j * (k + 1):j * (k + 1) + k], ids[j * (k + 1) + k]) for j in range(len(chunk))]
    return out


@torch.no_grad()
def sequence_log_probs(model, prompt_ids: Sequence[int], constraints: Constraints, completions: Sequence[Sequence[int]],
                       *, pad_id: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Exact log q(z ⊤ | X) of each completion (token id lists) under the constrained policy. [K], log space."""
    out = []
    for i in range(0, len(completions), batch_size):
        chunk = completions[i:i + batch_size]
        tokens, lengths = pad_right(chunk, pad_id)
        device = next(model.parameters()).device
        sc = score(model, [list(prompt_ids)], torch.zeros(len(chunk), dtype=torch.long, device=device),
                   tokens.to(device), lengths.to(device), constraints, pad_id=pad_id)
        term = sc.log_pterm.gather(1, lengths.to(device)[:, None]).squeeze(1)
        out.append((sc.log_pf.sum(1) + term).cpu())
    return torch.cat(out)


def format_table(rows: list[dict], columns: list[str], labels: list[str]) -> str:
    """A markdown table: one row per metric (``columns``), one column per result (``labels``)."""
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for c in columns:
        vals = [f"{r.get(c):.4f}" if isinstance(r.get(c), float) else str(r.get(c)) for r in rows]
        lines.append(f"| {c} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


@torch.no_grad()
def sampler_report(model, tokenizer, config, constraints: Constraints, rewards, rows, *, k: int = 16,
                   max_prompts: int = 8, temperature: float | None = None, seed: int = 0, tool=None,
                   iw_k: int | None = None) -> dict:
    """How close the policy is to its target, on its own samples: ``k`` episodes per prompt for the
    first ``max_prompts`` rows, log q of each (the policy at temperature 1, stop included) and its
    log R under ``rewards`` tempered at ``temperature`` (default: the config's final reward
    temperature, the target training ends at); then :func:`gfnlm.diagnostics.sampler_diagnostics`
    (ELBO, importance-weighted bound, log Z estimate, ESS, Var(log R - log q)).

    ``rows`` are dataset rows (each with a ``prompt`` and the columns the rewards read). Returns the
    diagnostics plus ``reward_temperature``; log space throughout."""
    from .diagnostics import sampler_diagnostics
    from .rollout import Collector

    rows = list(rows)[:max_prompts]
    g = torch.Generator().manual_seed(seed)
    col = Collector(config, tokenizer, rows, rewards, constraints, tool, g)
    device = next(model.parameters()).device
    index = torch.arange(len(rows)).repeat_interleave(k)
    s = sample(model, col.prompt_ids, index.to(device), constraints, pad_id=col.pad_id, generator=g,
               **col.tool_kwargs())
    batch = col.reward_batch(list(range(len(rows))), index, s.tokens.cpu(), s.lengths.cpu(), s.action_mask)
    log_r = col.log_rewards(batch)
    if log_r.ndim == 2:
        log_r = log_r.gather(1, batch.lengths[:, None]).squeeze(1)
    T = temperature if temperature is not None else config.reward_temperature_at(10**9)
    out = sampler_diagnostics((log_r / T).view(len(rows), k), s.log_prob.cpu().view(len(rows), k), iw_k=iw_k)
    return {**out, "reward_temperature": T}
