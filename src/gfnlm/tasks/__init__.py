"""Tasks: each paper experiment is one module with its data, prompts, reward and evaluation.

A task is a subclass of :class:`Task`.  The engine never imports a task by name: the
registry below maps short names to ``module:Class`` strings, and ``--task`` also accepts
any ``package.module:Class`` path, so a new task needs no change to the engine.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from ..config import GFNConfig, _coerce
from ..errors import ConfigError

REGISTRY: dict[str, str] = {
    "rng": "gfnlm.tasks.rng:RandomIntegerTask",
    "arithmetic": "gfnlm.tasks.arithmetic:ArithmeticTask",
    "subjectivity": "gfnlm.tasks.subjectivity:SubjectivityTask",
}


class Task:
    """Base class of a task.

    Subclasses define ``name``, a dataclass ``Args`` of task-specific settings (validated from
    ``config.task_args``), ``config_defaults`` (config fields the task sets unless the user does),
    and override the hooks below.
    """

    name: str = "task"

    @dataclasses.dataclass
    class Args:
        pass

    #: GFNConfig fields this task sets by default (the user's YAML/CLI values win).
    config_defaults: dict[str, Any] = {}

    def __init__(self, task_args: dict | None = None):
        self.args = parse_args(self.Args, task_args or {}, self.name)
        self._vocab: dict[int, list[int]] = {}

    def data_file(self, name: str):
        """A data file: ``name`` itself if it exists (or is absolute), else ``task_args.data_dir/name``."""
        from pathlib import Path

        p = Path(name)
        return p if p.is_absolute() or p.exists() else Path(self.args.data_dir) / name

    def tokens_where(self, tokenizer, keep, what: str) -> list[int]:
        """Ids of the tokens whose decoded text satisfies ``keep`` (computed once per tokenizer): a
        task's restricted vocabulary. ``what`` names the rule in the error when no token qualifies."""
        key = id(tokenizer)
        if key not in self._vocab:
            ids = [i for i in range(len(tokenizer)) if keep(tokenizer.decode([i]) or "")]
            if not ids:
                raise ConfigError(f"no token of this tokenizer is {what}: the task cannot run with this model")
            self._vocab[key] = ids
        return self._vocab[key]

    # hooks -------------------------------------------------------------------------------------
    def dataset(self) -> list[dict]:
        """Training rows, each with a ``prompt``."""
        raise NotImplementedError

    def reward_funcs(self, model, tokenizer, constraints, config: GFNConfig | None = None) -> list:
        """Rewards (log space) for the trainer. ``model`` is the policy, already wrapped (LoRA):
        an LM reward reads its base model through :class:`gfnlm.policy.BaseLM` (as
        :class:`gfnlm.rewards.LMLikelihoodReward` does)."""
        raise NotImplementedError

    def constraints(self, config: GFNConfig, tokenizer):
        """The action space; None uses the config's stop/allowed/forbidden tokens."""
        return None

    def tool(self):
        """Optional tool ``f(completion_text) -> str | None`` written into the state (not actions)."""
        return None

    def sample_metrics(self):
        """Optional ``f(prompts, completions) -> dict`` logged during training."""
        return None

    def supervised_completions(self) -> dict[str, list[str]]:
        """Labelled completions by prompt, for the supervised fine-tuning baseline (``gfnlm sft``)."""
        raise NotImplementedError(f"task {self.name} has no labelled completions")

    def correct_reward(self):
        """A TRL-style reward ``f(prompts, completions, **columns) -> list[float]``: 1.0 for a correct
        completion, else 0.0 (not a log-reward). Used by the RL baseline (:mod:`gfnlm.rl`)."""
        raise NotImplementedError(f"task {self.name} has no correctness reward")

    def prepare_trainer(self, trainer) -> None:
        """Called once the trainer exists (e.g. to seed the replay buffer)."""

    def train(self, trainer, resume_from_checkpoint=None):
        """Run the task's training (GFlowNet fine-tuning; a latent-variable task may run EM)."""
        return trainer.train(resume_from_checkpoint=resume_from_checkpoint)

    def evaluate(self, model, tokenizer, config: GFNConfig, constraints, **kw) -> dict:
        """Task metrics of a model."""
        raise NotImplementedError


def parse_args(cls, data: dict, task_name: str):
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown task_args field '{k}' for task {task_name}{hint}; known: {names}")
    hints = __import__("typing").get_type_hints(cls)
    values = {k: _coerce(f"task_args.{k}", v, hints[k]) for k, v in data.items()}
    return cls(**values)


def get_task_class(name: str) -> type[Task]:
    """Resolve a registered name or ``module:Class``."""
    target = REGISTRY.get(name, name)
    if ":" not in target:
        raise ConfigError(f"unknown task '{name}': choose one of {sorted(REGISTRY)} or give module:Class")
    mod, cls = target.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load task '{name}' ({e}): check the module:Class path") from None


def build_config(task: str | None, data: dict) -> GFNConfig:
    """A config whose unset fields take the task's defaults."""
    merged = dict(data)
    if task or data.get("task"):
        cls = get_task_class(task or data["task"])
        merged = {**cls.config_defaults, **data, "task": task or data["task"]}
    return GFNConfig.from_dict(merged)
