"""Collecting episodes: the behaviour-policy mix, replay and the reward calls of one micro-batch.

For each of ``prompts_per_step`` dataset rows, ``samples_per_prompt`` episodes are split into

* replayed episodes, drawn from the row's buffer **first** (so a step never replays what it has
  just sampled), with their stored untempered log-rewards;
* on-policy episodes (temperature 1) and tempered ones (a temperature drawn uniformly from
  ``[explore_temperature_min, explore_temperature_max]``), sampled under ``no_grad``;
* with ``proposal_fraction`` > 0, proposed episodes: drawn by a :data:`Proposal` (another sampler of
  the same action space, e.g. the contrastive task's token-level sampler on the base model). The
  GFlowNet losses are off-policy, so the mix trains the same target (the policy's own episodes, at
  least one per row, keep every action in reach);

the fresh episodes are scored by the rewards and added to the buffer afterwards.  Everything
here runs without gradients: rewards are data, never part of the loss's graph.

The replay buffer is keyed by the dataset row (its index), not by the prompt text: two rows
with the same prompt but different columns (answers, labels) have different rewards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .config import GFNConfig
from .data import as_rows, render_prompt
from .errors import ConfigError, DataError
from .replay import ReplayBuffer, pad_action_masks, pad_entries
from .rewards import Reward, RewardBatch, at_stop, compute_log_rewards
from .sampling import Constraints, check_fits, device_generator, pad_right, sample, tool_output


@dataclass
class Episodes:
    """One micro-batch of episodes for the loss (CPU tensors).

    Attributes:
        prompts: P prompt token id lists; prompt_index: [B] long, the prompt of each episode.
        tokens: [B, N] long states (tool output in place); lengths: [B] long.
        log_r: untempered log R, [B, N+1] (prefix rewards) or [B] (terminal).
        action_mask: [B, N] bool, False on tool-written tokens (None without a tool).
        kind: [B] long, 0 on-policy, 1 tempered, 2 replayed, 3 proposed.
        metrics: what the step logs about these episodes.
    """

    prompts: list[list[int]]
    prompt_index: Tensor
    tokens: Tensor
    lengths: Tensor
    log_r: Tensor
    action_mask: Tensor | None
    kind: Tensor
    metrics: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])


ON_POLICY, TEMPERED, REPLAYED, PROPOSED = 0, 1, 2, 3
KIND_NAMES = {ON_POLICY: "on_policy", TEMPERED: "tempered", REPLAYED: "replayed", PROPOSED: "proposed"}

#: A proposal sampler: ``f(prompt_ids, counts, seed) -> episodes``, where ``prompt_ids`` are P prompts
#: (token id lists, as the policy reads them), ``counts`` [P] how many episodes each needs, and the result
#: holds, for each prompt, ``counts[p]`` episodes as lists of action token ids (no stop token). Each
#: episode must be one the policy could write (lengths and tokens of the constraints). ``seed`` is drawn
#: from the run's random stream; torch's global random state is restored after the call. A proposal may
#: also give ``step_logits(prompts, prompt_index, tokens, lengths, pad_id) -> [B, N+1, V]``, its
#: log-weights of the next token at every prefix (e.g. :class:`gfnlm.tasks.contrastive.TokenLevelProposal`):
#: then ``gfnlm sft --from_proposal K --soft`` distils its per-step distributions (soft labels).
Proposal = Callable[[list[list[int]], list[int], int], list[list[list[int]]]]


def require_proposal(args: GFNConfig, proposal: Proposal | None) -> None:
    """A one-line error when ``proposal_fraction`` asks for proposed episodes and there is no sampler."""
    if args.proposal_fraction > 0 and proposal is None:
        raise ConfigError(f"proposal_fraction {args.proposal_fraction:g} needs a proposal sampler: pass proposal=... to "
                          "GFNTrainer, use a task that has one (e.g. contrastive), or set proposal_fraction 0")


def episode_split(k: int, replay_fraction: float, tempered_fraction: float, can_replay: bool,
                  proposal_fraction: float = 0.0) -> tuple[int, int, int, int]:
    """(on-policy, tempered, replayed, proposed) counts of ``k`` episodes of one prompt: each count
    is rounded, the four never take more than ``k`` together, and at least one episode is sampled
    from the policy (so every row keeps exploring): replay first, then proposals, then tempering."""
    n_rep = min(round(k * replay_fraction), k - 1) if can_replay else 0
    n_prop = min(round(k * proposal_fraction), k - 1 - n_rep)
    n_temp = min(round(k * tempered_fraction), k - n_rep - n_prop)
    return k - n_rep - n_prop - n_temp, n_temp, n_rep, n_prop


class Collector:
    """Rows, prompts, rewards, replay buffer and random stream of a GFlowNet run; :meth:`collect`
    builds one micro-batch.

    Args:
        args: the run's config; tokenizer: the policy's; rows: dataset rows (each with ``prompt``).
        rewards: the rewards (log space); constraints: the action space; tool: optional tool.
        generator: the CPU random stream of the data choices: rows, replay draws, exploration
            temperatures (seeded per rank).
        sample_generator: the random stream of sampling, on the model's device (default: made on
            first use from ``generator``'s seed + 1, on the device :meth:`collect` is given).
        sample_metrics: optional ``f(prompts, completions) -> dict`` logged on on-policy episodes.
        proposal: optional :data:`Proposal`, the sampler of the ``proposal_fraction`` episodes.
    """

    def __init__(self, args: GFNConfig, tokenizer, train_dataset, rewards: Sequence[Reward], constraints: Constraints,
                 tool: Callable | None, generator: torch.Generator, sample_metrics=None,
                 sample_generator: torch.Generator | None = None, proposal: Proposal | None = None):
        self.args, self.tokenizer, self.constraints, self.tool = args, tokenizer, constraints, tool
        self.proposal = proposal
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows = as_rows(train_dataset)
        self.prompt_ids = [render_prompt(tokenizer, r["prompt"], args.chat_template) for r in self.rows]
        self.rewards = list(rewards)
        self.prefix_rewards = all(r.prefix for r in self.rewards)
        self.buffer = ReplayBuffer(args.buffer_capacity, args.buffer_priority_temperature)
        self.generator = generator
        self.sample_generator = sample_generator
        self.sample_metrics = sample_metrics
        self._row_weights: Tensor | None = None
        self.pending_seeds: dict[int, list[str]] = {}  # row -> completions to add when it is first drawn
        self.seeds_used: set[int] = set()  # rows whose lazy seeds were consumed (checkpointed)
        named = [*constraints.stop_token_ids, *(constraints.allowed_token_ids or ()), *constraints.forbidden_token_ids]
        self._vocab_size = max([len(tokenizer), *named]) + 1  # covers every id the tokenizer or the constraints name

    def fingerprint(self) -> str:
        """A digest of the dataset rows in order (the replay buffer is keyed by row index)."""
        import hashlib
        import json

        return hashlib.sha1(json.dumps(self.rows, sort_keys=True, default=str).encode()).hexdigest()

    def check_prompts_fit(self, model) -> None:
        """A one-line error naming the first prompt that leaves no room for an episode."""
        room = self.constraints.max_new_tokens + (self.args.max_tool_tokens if self.tool is not None else 0)
        for ids, row in zip(self.prompt_ids, self.rows):
            try:
                check_fits(model, [ids], room)
            except DataError as e:
                raise DataError(f"prompt {row['prompt'][:40]!r}...: {e}") from None

    # --- rewards ---------------------------------------------------------------------------
    def reward_batch(self, row_ids: Sequence[int], prompt_index: Tensor, tokens: Tensor, lengths: Tensor,
                     action_mask: Tensor | None = None) -> RewardBatch:
        """What rewards see for episodes continuing ``rows[row_ids[prompt_index]]``."""
        rows = [self.rows[row_ids[i]] for i in prompt_index.tolist()]
        completions = [self.tokenizer.decode(tokens[b, : int(lengths[b])].tolist(), skip_special_tokens=False)
                       for b in range(tokens.shape[0])]
        columns = {k: [r.get(k) for r in rows] for k in self.rows[0] if k != "prompt"}
        return RewardBatch(prompts=[r["prompt"] for r in rows], prompt_ids=[self.prompt_ids[i] for i in row_ids],
                           prompt_index=prompt_index.cpu(), tokens=tokens.cpu(), lengths=lengths.cpu(),
                           completions=completions, columns=columns, tokenizer=self.tokenizer,
                           action_mask=None if action_mask is None else action_mask.cpu())

    @torch.no_grad()
    def log_rewards(self, batch: RewardBatch) -> Tensor:
        """Untempered log R: [B, N+1] with prefix rewards, else [B] (detached, CPU)."""
        return compute_log_rewards(self.rewards, self.args.reward_weights, batch)

    # --- known completions -----------------------------------------------------------------
    def encode_completions(self, texts: Sequence[str], what: str = "completions") -> tuple[Tensor, Tensor, Tensor]:
        """Tokenise completion texts into episodes: tokens [K, N], lengths [K], action_mask [K, N].

        Lengths are checked against the constraints (error names ``what``); with a tool, its output
        is inserted as the sampler would."""
        return self.encode_actions([self.tokenizer.encode(t, add_special_tokens=False) for t in texts], what, texts)

    def encode_actions(self, actions: Sequence[Sequence[int]], what: str,
                       texts: Sequence[str] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Episodes from their actions (token id lists, no stop token), as :meth:`encode_completions`:
        each checked against the constraints (an error names ``what`` and the episode's text, ``texts``
        or the decoded ids), tool output inserted; tokens [K, N], lengths [K], action_mask [K, N]."""
        states, masks = [], []
        for i, ids in enumerate(actions):
            ids = [int(x) for x in ids]
            problem = self._problem(ids, repr(texts[i] if texts is not None else self.tokenizer.decode(ids)))
            if problem:
                raise DataError(f"{what}: {problem}")
            state, mask = self.with_tool_output(ids)
            states.append(state)
            masks.append(mask)
        if not states:
            raise DataError(f"{what}: no completions given")
        tokens, lengths = pad_right(states, self.pad_id)
        action_mask, _ = pad_right(masks, False, dtype=torch.bool)
        return tokens, lengths, action_mask

    def writable(self, completions: dict[str, list[str]]) -> tuple[dict[str, list[str]], int]:
        """The completions the policy can write (length within the limits, every token an action),
        by prompt, and how many others were left out."""
        kept, skipped = {}, 0
        for prompt, texts in completions.items():
            ok = [t for t in texts if self._problem(self.tokenizer.encode(t, add_special_tokens=False), repr(t)) is None]
            skipped += len(texts) - len(ok)
            if ok:
                kept[prompt] = ok
        return kept, skipped

    def _problem(self, ids: list[int], desc: str) -> str | None:
        """Why the policy could not take the actions ``ids`` (``desc`` names them), or None if it can: a
        length within the limits, every token an action of :meth:`Constraints.token_mask`."""
        c = self.constraints
        if len(ids) < c.min_new_tokens:
            what = "empty completion" if not ids else f"completion {desc} ({len(ids)} tokens)"
            return f"{what} is shorter than min_new_tokens={c.min_new_tokens}"
        if len(ids) > c.max_new_tokens:
            return f"completion {desc} is longer than max_new_tokens={c.max_new_tokens}"
        actions = c.token_mask(self._vocab_size, "cpu")[0]
        bad = [i for i in ids if not 0 <= i < len(actions) or not actions[i]]
        if bad:
            return (f"completion {desc} has tokens the policy may not write "
                    f"({self.tokenizer.convert_ids_to_tokens(bad[:3])}): remove them or widen the constraints")
        return None

    def with_tool_output(self, actions: list[int]) -> tuple[list[int], list[bool]]:
        """The state the sampler would build from these actions: tool output inserted after each
        action that triggers the tool (:func:`gfnlm.sampling.tool_output`, as in sampling)."""
        if self.tool is None:
            return list(actions), [True] * len(actions)
        state, mask, used = [], [], 0
        for a in actions:
            state.append(a)
            mask.append(True)
            out = tool_output(self.tool, self.tokenizer, state, used, self.args.max_tool_tokens)
            state += out
            mask += [False] * len(out)
            used += len(out)
        return state, mask

    def seed_buffer(self, completions: dict[str, list[str]] | list[tuple[str, str]], batch_size: int = 32,
                    lazy: bool = False) -> int:
        """Add known completions to the replay buffer of every row with that prompt (each row's
        own rewards, computed ``batch_size`` episodes at a time). ``completions`` maps a prompt to
        completion texts (with a tool: the policy's actions only). Returns how many entries were added.

        ``lazy``: only check and remember them; a row's completions are scored and added when the row
        is first drawn, before its replay (a run of S steps scores at most S x prompts_per_step rows'
        seeds, not the whole dataset's). The rows whose seeds were used are part of the checkpoint, so a
        resumed run does not add them again: resume stays exact. Returns how many completions wait."""
        pairs = list(completions.items()) if isinstance(completions, dict) else [(p, [c]) for p, c in completions]
        by_prompt: dict[str, list[int]] = {}
        for i, r in enumerate(self.rows):
            by_prompt.setdefault(r["prompt"], []).append(i)
        jobs: list[tuple[int, str]] = []  # (row, completion text)
        for prompt, texts in pairs:
            if prompt not in by_prompt:
                raise DataError(f"seed_buffer: prompt {prompt[:40]!r} is not in the training dataset")
            jobs += [(row, t) for row in by_prompt[prompt] for t in texts]
        if lazy:
            self.encode_completions([t for _, t in jobs], "seed_buffer")  # errors now, not at some later step
            for row, t in jobs:
                self.pending_seeds.setdefault(row, []).append(t)
            return len(jobs)
        return self._add_seeds(jobs, batch_size)

    def _add_seeds(self, jobs: list[tuple[int, str]], batch_size: int = 32) -> int:
        """Score (row, completion text) pairs and add them to the buffer."""
        added = 0
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i:i + batch_size]
            tokens, lengths, action_mask = self.encode_completions([t for _, t in chunk], "seed_buffer")
            mask = action_mask if self.tool is not None else None
            row_ids = sorted({row for row, _ in chunk})
            index = torch.tensor([row_ids.index(row) for row, _ in chunk])
            batch = self.reward_batch(row_ids, index, tokens, lengths, mask)
            added += self.buffer.add_batch([row for row, _ in chunk], tokens, lengths, self.log_rewards(batch), mask)
        return added

    def sample_kwargs(self) -> dict:
        """The keyword arguments of :func:`gfnlm.sampling.sample` that come from the config and the
        tool (the decoder's compilation; the tool, its tokenizer and budget)."""
        kw = {"compile_decoder": self.args.compile_decoder}
        if self.tool is not None:
            kw.update(tool=self.tool, tokenizer=self.tokenizer, max_tool_tokens=self.args.max_tool_tokens)
        return kw

    # --- one micro-batch ---------------------------------------------------------------------
    def draw_rows(self, n: int) -> list[int]:
        """``n`` row indices for a step: uniform, or in proportion to ``row_weight_column``."""
        col = self.args.row_weight_column
        if col is None:
            return torch.randint(len(self.rows), (n,), generator=self.generator).tolist()
        if self._row_weights is None:
            try:
                w = torch.tensor([float(r[col]) for r in self.rows])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"row_weight_column {col!r}: every dataset row needs a number there") from None
            if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
                raise DataError(f"row_weight_column {col!r}: weights must be finite, >= 0, and not all 0")
            self._row_weights = w
        return torch.multinomial(self._row_weights, n, replacement=True, generator=self.generator).tolist()

    @torch.no_grad()
    def collect(self, model, device, sampling_context=contextlib.nullcontext) -> Episodes:
        """Replay first, then sample and score fresh episodes, then add those to the buffer.
        ``sampling_context``: entered around sampling alone (the trainer's mixed-precision autocast);
        rewards are computed outside it."""
        a, g = self.args, self.generator
        row_ids = self.draw_rows(a.prompts_per_step)
        fresh_rows = [r for r in dict.fromkeys(row_ids) if r in self.pending_seeds]
        seeds = [(r, t) for r in fresh_rows for t in self.pending_seeds.pop(r) if r not in self.seeds_used]
        self.seeds_used.update(fresh_rows)
        if seeds:  # lazily seeded rows: their known completions enter the buffer before the replay draw
            self._add_seeds(seeds)
        fresh_idx, temps, kind, replayed, rep_idx, n_props = [], [], [], [], [], []
        for p, r in enumerate(row_ids):
            n_on, n_temp, n_rep, n_prop = episode_split(a.samples_per_prompt, a.replay_fraction, a.tempered_fraction,
                                                        self.buffer.size(r) > 0, a.proposal_fraction)
            got = self.buffer.sample(r, n_rep, generator=g)  # before this step's episodes are added
            replayed += got
            rep_idx += [p] * len(got)
            fresh_idx += [p] * (n_on + n_temp)
            n_props.append(n_prop)
            lo, hi = a.explore_temperature_min, a.explore_temperature_max
            temps += [1.0] * n_on + (lo + (hi - lo) * torch.rand(n_temp, generator=g)).tolist()
            kind += [ON_POLICY] * n_on + [TEMPERED] * n_temp
        prompts = [self.prompt_ids[r] for r in row_ids]
        fresh_t = torch.tensor(fresh_idx, dtype=torch.long)
        if self.sample_generator is None:
            self.sample_generator = device_generator(device, self.generator.initial_seed() + 1)
        with sampling_context():
            s = sample(model, prompts, fresh_t.to(device), self.constraints, temperature=torch.tensor(temps),
                       epsilon=a.epsilon, pad_id=self.pad_id, generator=self.sample_generator, **self.sample_kwargs())
        tokens, lengths = s.tokens.cpu(), s.lengths.cpu()
        mask = None if s.action_mask is None else s.action_mask.cpu()
        if any(n_props):
            require_proposal(a, self.proposal)  # the proposal's episodes join the fresh ones: scored, buffered and trained on alike
            p_tok, p_len, p_mask = self.propose(prompts, n_props, device)
            mask = _cat_action_masks((mask, lengths, tokens.shape[1]),
                                     (p_mask if self.tool is not None else None, p_len, p_tok.shape[1]))
            tokens, lengths = cat_padded([tokens, p_tok], self.pad_id), torch.cat([lengths, p_len])
            fresh_t = torch.cat([fresh_t, torch.tensor([p for p, n in enumerate(n_props) for _ in range(n)])])
            kind += [PROPOSED] * len(p_len)
        fresh_batch = self.reward_batch(row_ids, fresh_t, tokens, lengths, mask)
        log_r = self.log_rewards(fresh_batch)
        self.buffer.add_batch([row_ids[i] for i in fresh_t.tolist()], tokens, lengths, log_r, mask)
        ep = Episodes(prompts, fresh_t, tokens, lengths, log_r, mask, torch.tensor(kind, dtype=torch.long))
        if replayed:
            ep = _append_replayed(ep, replayed, torch.tensor(rep_idx, dtype=torch.long), self.pad_id,
                                  self.prefix_rewards)
        ep.metrics = self.episode_metrics(ep, fresh_batch)
        return ep

    def propose(self, prompts: list[list[int]], counts: list[int], device, seed: int | None = None,
                proposal: Proposal | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``counts[p]`` episodes of each prompt from the proposal (default: the run's): tokens [K, N],
        lengths [K] and action_mask [K, N] (CPU), with tool output inserted as the sampler would. The
        proposal's seed (unless given) comes from the run's random stream, and torch's global random
        state is left as it was (a resumed run draws the same proposals)."""
        if seed is None:
            seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
        cuda = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            got = (proposal or self.proposal)(prompts, list(counts), seed)
        if len(got) != len(prompts) or any(len(e) != n for e, n in zip(got, counts)):
            raise DataError(f"the proposal returned {[len(e) for e in got]} episodes per prompt, not {list(counts)}")
        return self.encode_actions([ids for episodes in got for ids in episodes], "the proposal")

    def episode_metrics(self, ep: Episodes, fresh_batch: RewardBatch) -> dict:
        """Terminal log R per kind of episode; over the episodes the policy sampled (on-policy and
        tempered), as before replay existed: mean and max log R, mean length, forced-stop fraction;
        the replayed and proposed counts; sample metrics."""
        term = at_stop(ep.log_r, ep.lengths)
        acts = ep.lengths if ep.action_mask is None else ep.action_mask.sum(1)
        fresh = (ep.kind == ON_POLICY) | (ep.kind == TEMPERED)
        m = {"reward/log_r_mean": term[fresh].mean().item(), "reward/log_r_max": term[fresh].max().item(),
             "episodes/length_mean": ep.lengths[fresh].float().mean().item(),
             "episodes/forced_stop_fraction": (acts[fresh] >= self.constraints.max_new_tokens).float().mean().item(),
             "episodes/replayed": float((ep.kind == REPLAYED).sum())}
        if self.args.proposal_fraction > 0:
            m["episodes/proposed"] = float((ep.kind == PROPOSED).sum())
        for k, name in KIND_NAMES.items():
            sel = ep.kind == k
            if sel.any():
                m[f"reward/log_r_{name}"] = term[sel].mean().item()
        on = (ep.kind[:fresh_batch.tokens.shape[0]] == ON_POLICY).nonzero().squeeze(1).tolist()
        if self.sample_metrics is not None and on:
            extra = self.sample_metrics([fresh_batch.prompts[i] for i in on], [fresh_batch.completions[i] for i in on])
            m.update({f"samples/{k}": float(v) for k, v in extra.items()})
        return m


def _cat_action_masks(*parts: tuple[Tensor | None, Tensor, int]) -> Tensor | None:
    """The action masks of episode batches stacked along rows: each part is (action_mask [B_i, N_i] or
    None when every token is an action, lengths [B_i], width N_i); None if no part has a mask."""
    if all(m is None for m, _, _ in parts):
        return None
    return cat_padded([m if m is not None else _range_mask(n, w) for m, n, w in parts], False)


def _append_replayed(ep: Episodes, entries, index: Tensor, pad_id: int, prefix_rewards: bool) -> Episodes:
    """``ep`` with replayed buffer entries appended (padding to the wider of the two)."""
    r_tok, r_len, r_prefix, r_term = pad_entries(entries, pad_id)
    r_mask = pad_action_masks(entries, r_tok.shape[1])
    mask = _cat_action_masks((ep.action_mask, ep.lengths, ep.tokens.shape[1]), (r_mask, r_len, r_tok.shape[1]))
    r_log_r = r_prefix if prefix_rewards else r_term
    log_r = cat_padded([ep.log_r, r_log_r], 0.0) if ep.log_r.ndim == 2 else torch.cat([ep.log_r, r_log_r])
    return Episodes(ep.prompts, torch.cat([ep.prompt_index, index]), cat_padded([ep.tokens, r_tok], pad_id),
                    torch.cat([ep.lengths, r_len]), log_r, mask,
                    torch.cat([ep.kind, torch.full((len(entries),), REPLAYED, dtype=torch.long)]))


def _range_mask(lengths: Tensor, width: int) -> Tensor:
    """[B, width] bool, True on the first ``lengths[b]`` columns."""
    return torch.arange(width)[None, :] < lengths[:, None]


def cat_padded(tensors: list[Tensor], pad) -> Tensor:
    """Concatenate [B_i, N_i] tensors along rows, right-padding each to the widest with ``pad``."""
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        if t.shape[1] < width:
            t = torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), pad, dtype=t.dtype)], dim=1)
        out.append(t)
    return torch.cat(out, dim=0)
