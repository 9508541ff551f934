"""Per-prompt replay buffer, prioritised by reward and deduplicated.

Each key (the trainer uses the dataset row's index) has its own buffer of at most ``capacity`` *distinct*
completions.  An entry keeps the completion's token ids and its **untempered** log-rewards
(one per prefix when the reward gives prefix rewards, plus the terminal one), so replayed
episodes are never re-scored by the reward.  When a buffer is full, a new entry replaces the
lowest-reward entry if it is better.  Sampling draws entries with probability proportional
to ``exp(log R / priority_temperature)`` (with replacement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .sampling import pad_right


@dataclass
class Entry:
    tokens: tuple[int, ...]
    log_r_terminal: float
    log_r_prefix: Tensor | None  # [n+1] untempered log R of every prefix, or None
    action_mask: tuple[bool, ...] | None = None  # False on tool-written tokens; None: all actions


class ReplayBuffer:
    def __init__(self, capacity: int = 50, priority_temperature: float = 1.0):
        if capacity < 1:
            raise ValueError("buffer capacity must be at least 1")
        self.capacity = capacity
        self.priority_temperature = priority_temperature
        self._data: dict = {}  # key (a dataset row's index) -> {tokens: Entry}

    def __len__(self) -> int:
        return sum(len(v) for v in self._data.values())

    def clear(self) -> None:
        """Forget every entry (e.g. when the reward changes, as after an EM M-step)."""
        self._data.clear()

    def size(self, key) -> int:
        return len(self._data.get(key, {}))

    def entries(self, key) -> list[Entry]:
        return list(self._data.get(key, {}).values())

    def add(self, key, tokens: Sequence[int], log_r_terminal: float, log_r_prefix: Tensor | None = None,
            action_mask: Sequence[bool] | None = None) -> bool:
        """Insert one completion; returns True if the buffer changed."""
        tokens = tuple(int(t) for t in tokens)
        bucket = self._data.setdefault(key, {})
        entry = Entry(tokens, float(log_r_terminal), None if log_r_prefix is None else log_r_prefix.detach().float().cpu().clone(),
                      None if action_mask is None else tuple(bool(a) for a in action_mask))
        if tokens in bucket:  # duplicate: keep the latest reward (rewards can change, e.g. in EM)
            bucket[tokens] = entry
            return False
        if len(bucket) >= self.capacity:
            worst = min(bucket.values(), key=lambda e: e.log_r_terminal)
            if worst.log_r_terminal >= entry.log_r_terminal:
                return False
            del bucket[worst.tokens]
        bucket[tokens] = entry
        return True

    def add_batch(self, keys: Sequence, tokens: Tensor, lengths: Tensor, log_r: Tensor,
                  action_mask: Tensor | None = None) -> int:
        """Insert B episodes. ``log_r`` is [B, N+1] (prefix) or [B] (terminal), untempered;
        ``action_mask`` [B, N] marks policy actions when a tool wrote some tokens."""
        added = 0
        for b, key in enumerate(keys):
            n = int(lengths[b])
            mask = None if action_mask is None else action_mask[b, :n].tolist()
            if log_r.ndim == 2:
                added += self.add(key, tokens[b, :n].tolist(), float(log_r[b, n]), log_r[b, : n + 1], mask)
            else:
                added += self.add(key, tokens[b, :n].tolist(), float(log_r[b]), None, mask)
        return added

    def sample(self, key, k: int, generator: torch.Generator | None = None) -> list[Entry]:
        """Draw ``k`` entries of ``key`` with replacement, prioritised by reward."""
        bucket = self.entries(key)
        if not bucket or k <= 0:
            return []
        logits = torch.tensor([e.log_r_terminal for e in bucket]) / self.priority_temperature
        probs = torch.softmax(logits, 0)
        idx = torch.multinomial(probs, k, replacement=True, generator=generator)
        return [bucket[i] for i in idx.tolist()]

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "priority_temperature": self.priority_temperature,
            "data": {k: [(e.tokens, e.log_r_terminal, e.log_r_prefix, e.action_mask) for e in v.values()]
                     for k, v in self._data.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.priority_temperature = state["priority_temperature"]
        self._data = {k: {tuple(e[0]): Entry(tuple(e[0]), *e[1:]) for e in v} for k, v in state["data"].items()}


def pad_entries(entries: Sequence[Entry], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Stack entries: tokens [K, N], lengths [K], prefix log R [K, N+1] (or None), terminal log R [K]."""
    tokens, lengths = pad_right([e.tokens for e in entries], pad_id)
    n = tokens.shape[1]
    have_prefix = all(e.log_r_prefix is not None for e in entries)
    prefix = torch.zeros(len(entries), n + 1) if have_prefix else None
    if prefix is not None:
        for i, e in enumerate(entries):
            prefix[i, : len(e.tokens) + 1] = e.log_r_prefix
    terminal = torch.tensor([e.log_r_terminal for e in entries])
    return tokens, lengths, prefix, terminal


def pad_action_masks(entries: Sequence[Entry], width: int) -> Tensor | None:
    """[K, width] bool action masks of entries (True where a token is an action), or None if no
    entry has tool-written tokens."""
    if all(e.action_mask is None for e in entries):
        return None
    mask = torch.zeros(len(entries), width, dtype=torch.bool)
    for i, e in enumerate(entries):
        mask[i, : len(e.tokens)] = torch.tensor(e.action_mask if e.action_mask is not None else [True] * len(e.tokens),
                                                dtype=torch.bool)
    return mask
