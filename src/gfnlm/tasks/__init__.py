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

from ..config import GFNConfig, _coerce, printable
from ..diagnostics import elbo_text
from ..errors import ConfigError

REGISTRY: dict[str, str] = {
    "rng": "gfnlm.tasks.rng:RandomIntegerTask",
    "arithmetic": "gfnlm.tasks.arithmetic:ArithmeticTask",
    "subjectivity": "gfnlm.tasks.subjectivity:SubjectivityTask",
    "infilling": "gfnlm.tasks.infilling:InfillingTask",
    "continuation": "gfnlm.tasks.continuation:ContinuationTask",
    "contrastive": "gfnlm.tasks.contrastive:ContrastiveTask",
    "constrained": "gfnlm.tasks.constrained:ConstrainedTask",
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
        """The action space (default: the config's stop/allowed/forbidden tokens and lengths)."""
        from ..trainer import constraints_from_config

        return constraints_from_config(config, tokenizer)

    def tool(self):
        """Optional tool ``f(completion_text) -> str | None`` written into the state (not actions)."""
        return None

    def sample_metrics(self):
        """Optional ``f(prompts, completions) -> dict`` logged during training."""
        return None

    def supervised_completions(self) -> dict[str, list[str]]:
        """Labelled completions by prompt, for the supervised fine-tuning baseline (``gfnlm sft``)."""
        raise NotImplementedError(f"task {self.name} has no labelled completions")

    def heldout_completions(self, target: str = "policy") -> dict[str, list[str]] | None:
        """Labelled completions by prompt that training never sees (a validation split, never the test
        set) in the form of :meth:`sft_data`'s, for the held-out NLL ``gfnlm sft`` reports; None where
        the task has none."""
        return None

    #: What ``gfnlm sft --target`` may fine-tune: the policy, and for some tasks a reward LM.
    sft_targets: tuple[str, ...] = ("policy",)

    def sft_data(self, target: str = "policy") -> tuple[list[dict] | None, dict[str, list[str]], dict]:
        """What ``gfnlm sft --target`` trains on: (dataset rows or None for the task's own, labelled
        completions by prompt, config defaults for this target that the user's values override)."""
        if target != "policy":
            raise ConfigError(f"task {self.name} fine-tunes only --target policy, not {target!r}")
        return None, self.supervised_completions(), {}

    #: The ``gfnlm sample --<field> TEXT`` options that build this task's prompt (besides --prompt).
    prompt_fields: tuple[str, ...] = ()

    def prompt_of(self, columns: dict) -> str:
        """The policy's prompt text from ``gfnlm sample --<column> TEXT`` flags (default: ``--prompt``)."""
        if set(columns) != {"prompt"}:
            raise ConfigError(f"task {self.name} samples from --prompt TEXT, not {sorted(columns)}")
        return columns["prompt"]

    def completion_text(self, text: str) -> str:
        """The text an episode stands for (``gfnlm sample`` prints it; default: the completion as is)."""
        return text

    def correct_reward(self):
        """A TRL-style reward ``f(prompts, completions, **columns) -> list[float]``: 1.0 for a correct
        completion, else 0.0 (not a log-reward). Used by the RL baseline (:mod:`gfnlm.rl`)."""
        raise NotImplementedError(f"task {self.name} has no correctness reward")

    def proposal(self, model, tokenizer, constraints, config: GFNConfig):
        """Optional sampler of the ``proposal_fraction`` episodes (:data:`gfnlm.rollout.Proposal`),
        another behaviour policy over the policy's actions; ``model`` is the wrapped policy. Default:
        none, so a positive ``proposal_fraction`` is an error for this task."""
        return None

    def prepare_trainer(self, trainer) -> None:
        """Called once the trainer exists (e.g. to seed the replay buffer)."""

    def train(self, trainer, resume_from_checkpoint=None):
        """Run the task's training (GFlowNet fine-tuning; a latent-variable task may run EM)."""
        return trainer.train(resume_from_checkpoint=resume_from_checkpoint)

    def evaluate(self, model, tokenizer, config: GFNConfig, constraints, **kw) -> dict:
        """Task metrics of a model."""
        raise NotImplementedError

    def eval_rows(self) -> list[dict]:
        """Rows (prompt and reward columns) for the sampler diagnostics of ``gfnlm eval``: data the
        run did not train on where the task has it (default: the training rows)."""
        return self.dataset()

    def sample_statistics(self, rows: list[dict], texts: list[list[str]]) -> dict[str, list[list[float]]]:
        """Per-sample figures of ``texts[i][j]``, the ``j``-th episode's text (:meth:`completion_text`) for
        ``rows[i]``, e.g. a metric against the row's reference. :meth:`diagnostics` estimates, besides the
        sampler's own mean, what a sampler that matched the target would score on each
        (:func:`gfnlm.diagnostics.target_means`). Default: none."""
        return {}

    def scored_eval_samples(self, model, tokenizer, config: GFNConfig, constraints, *, k: int = 16,
                            max_prompts: int = 8, seed: int = 0, progress: bool = False):
        """``k`` samples of the policy for each of the first ``max_prompts`` evaluation rows
        (:func:`gfnlm.evaluation.scored_samples`): ``(log_r [P, k], log_q [P, k], statistics, completions)``,
        log R untempered, log space; ``statistics`` the :meth:`sample_statistics` of the samples' texts,
        ``completions[i]`` the ``k`` token-id lists of row ``i``."""
        from ..evaluation import scored_samples
        from ..policy import adapter_layers

        rows = self.eval_rows()[:max_prompts]
        if not rows:
            return None
        base = model
        if not adapter_layers(model):  # a fully fine-tuned policy: the target's LM is the original base model
            from ..models import load_model

            base = load_model(config.model)[0].to(next(model.parameters()).device)
        log_r, log_q, completions, _ = scored_samples(
            model, tokenizer, config, constraints, self.reward_funcs(base, tokenizer, constraints, config), rows, k=k,
            temperature=1.0, seed=seed, tool=self.tool(), progress=progress)
        texts = [[self.completion_text(tokenizer.decode(c, skip_special_tokens=True)) for c in cs] for cs in completions]
        return log_r, log_q, self.sample_statistics(rows, texts), completions

    def diagnostics(self, model, tokenizer, config: GFNConfig, constraints, *, k: int = 16, max_prompts: int = 8,
                    seed: int = 0, temperature: float | None = None, progress: bool = False) -> dict:
        """ELBO, importance-weighted bound, ESS and Var(log R - log q) of the policy's own samples
        against the task's target, with the reward tempered at ``temperature`` (default: the config's
        final reward temperature), on :meth:`scored_eval_samples`; and where the task has
        :meth:`sample_statistics`, ``target_means`` (:func:`diagnostics_at`)."""
        scored = self.scored_eval_samples(model, tokenizer, config, constraints, k=k, max_prompts=max_prompts,
                                          seed=seed, progress=progress)
        if scored is None:
            return {}
        T = temperature if temperature is not None else config.reward_temperature_at(10**9)
        return diagnostics_at(*scored[:3], T)

    def report(self, results: dict, label: str, args) -> None:
        """Print what ``gfnlm eval`` measured (default: JSON)."""
        import json

        print(json.dumps({k: v for k, v in results.items() if k != "exact_probs"}, indent=1))

    @classmethod
    def eval_command(cls, args, extra: dict) -> int:
        """``gfnlm eval`` for this task: load the checkpoint (or the base model), :meth:`evaluate`,
        :meth:`report`, then the sampler diagnostics. A task with its own table overrides this."""
        import json
        from pathlib import Path

        model, tok, config, cons, task = cls.load_for_eval(args, extra)
        import torch

        with torch.no_grad():
            r = task.evaluate(model, tok, config, cons, n=args.n, seed=args.seed, progress=True)
        task.report(r, args.checkpoint or config.model, args)
        if args.diagnostics:
            r["diagnostics"] = task.diagnostics(model, tok, config, cons, k=args.diagnostics,
                                                max_prompts=args.diagnostics_prompts, seed=args.seed, progress=True)
            print(format_diagnostics(r["diagnostics"]))
        if args.output:
            Path(args.output).write_text(json.dumps(r, indent=1))
        return 0

    @classmethod
    def load_for_eval(cls, args, extra: dict):
        """(model, tokenizer, config, constraints, task) of ``--checkpoint`` or of ``--model``."""
        from ..models import load_model
        from ..trainer import load_trained

        if args.checkpoint:
            model, tok, config, cons = load_trained(args.checkpoint)
            same = config.task in (cls.name, None)
            task = cls({**(config.task_args if same else {}), **extra.get("task_args", {})})
            return model, tok, config, cons, task
        config = build_config(cls.name if cls.name in REGISTRY else args.task, {"model": args.model, **extra})
        model, tok = load_model(config.model)
        task = cls(config.task_args)
        return model, tok, config, task.constraints(config, tok), task


def diagnostics_at(log_r, log_q, statistics: dict, temperature: float) -> dict:
    """The sampler diagnostics of samples with untempered ``log_r`` and ``log_q`` (``[P, K]``, log space)
    against the target ``R^(1/temperature)`` (:func:`gfnlm.diagnostics.sampler_diagnostics`), and, for
    per-sample ``statistics`` (``{name: [P, K]}``), ``target_means``: each one's mean over the samples and
    its self-normalised importance estimate under the target (:func:`gfnlm.diagnostics.target_means`)."""
    from ..diagnostics import sampler_diagnostics, target_means

    out = {**sampler_diagnostics(log_r / temperature, log_q), "reward_temperature": temperature}
    if statistics:
        out["target_means"] = target_means(log_r / temperature, log_q, statistics)
    return out


def format_diagnostics(d: dict) -> str:
    """One block of the sampler diagnostics, as ``gfnlm eval`` prints them."""
    if not d:
        return "sampler diagnostics: no evaluation rows"
    return (f"sampler diagnostics ({d['n_prompts']} prompts x {d['n_samples']} samples, target R^(1/T), "
            f"T = {d['reward_temperature']:.3g}; log space):\n"
            f"  ELBO E_q[log R - log q] = {elbo_text(d, 4)} (± one standard error)   IW bound = {d['iw_bound']:.4f}   "
            f"log Z (IS) = {d['log_z_is']:.4f}\n"
            f"  ESS of R/q = {d['ess']:.4f} of the samples   Var(log R - log q) = {d['log_w_var']:.4f} "
            "(0 at the optimum)\n"
            f"  target's mean log R E_p[log R] (self-normalised IS) = {d['target_mean_log_r']:.4f}"
            + "".join(f"\n  {name}: the samples' mean {m['sampler']:.4f}, the target's (self-normalised IS) "
                      f"{m['target']:.4f} ± {m['target_se']:.4f}" for name, m in d.get("target_means", {}).items()))


def parse_args(cls, data: dict, task_name: str):
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown task_args field '{printable(k)}' for task {task_name}{hint}; known: {names}")
    hints = __import__("typing").get_type_hints(cls)
    values = {k: _coerce(f"task_args.{k}", v, hints[k]) for k, v in data.items()}
    return cls(**values)


def get_task_class(name: str) -> type[Task]:
    """Resolve a registered name or ``module:Class`` (a subclass of :class:`Task`)."""
    if not isinstance(name, str):
        raise ConfigError(f"task must be a name or module:Class, got {name!r}: e.g. task: rng")
    target = REGISTRY.get(name, name)
    if ":" not in target:
        raise ConfigError(f"unknown task '{printable(name)}': choose one of {sorted(REGISTRY)} or give module:Class")
    mod, cls = target.split(":", 1)
    try:  # ValueError: an empty module name; TypeError: a relative one (".x")
        found = getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot load task '{printable(name)}' ({printable(e)}): check the module:Class path") from None
    if not (isinstance(found, type) and issubclass(found, Task)):
        raise ConfigError(f"task '{printable(name)}' is not a gfnlm.tasks.Task subclass: give module:Class of a Task")
    return found


def build_config(task: str | None, data: dict) -> GFNConfig:
    """A config whose unset fields take the task's defaults."""
    merged = dict(data)
    if task or data.get("task"):
        cls = get_task_class(task or data["task"])
        merged = {**cls.config_defaults, **data, "task": task or data["task"]}
    return GFNConfig.from_dict(merged)


def make_trainer(config, model=None, tokenizer=None, with_rewards: bool = True, dataset: list[dict] | None = None):
    """Task + model + trainer from a config (``config.task`` must be set, or ``config.dataset``).

    The policy is wrapped (LoRA) before the task builds its rewards, so an LM reward holds the
    wrapped model and reads its base through :class:`gfnlm.policy.BaseLM`. ``with_rewards=False``
    (supervised fine-tuning) builds no reward, so the trainer's reward refuses to run, and skips
    :meth:`Task.prepare_trainer` (seeding a replay buffer scores with the reward). ``dataset``
    replaces the task's rows (``config.dataset`` still wins)."""
    from ..models import load_model
    from ..policy import wrap_policy
    from ..rewards import NoReward
    from ..trainer import GFNTrainer, lora_config

    if config.task is None:
        raise ConfigError("the command line needs a task (e.g. --task rng); custom rewards are set up from Python")
    task = get_task_class(config.task)(config.task_args)
    if model is None and config.init_from:
        from ..trainer import load_trained

        model, tokenizer, start, _ = load_trained(config.init_from, trainable=True)
        if start.model != config.model:
            raise ConfigError(f"init_from {config.init_from} was trained on {start.model}, not {config.model}: "
                             "set --model to match")
    if model is None:
        model, tokenizer = load_model(config.model)
    model = wrap_policy(model, config.use_peft, None, lambda: lora_config(config), config.seed)  # before any reward holds it
    constraints = task.constraints(config, tokenizer)
    rewards = task.reward_funcs(model, tokenizer, constraints, config) if with_rewards else [NoReward()]
    dataset = config.dataset or dataset or task.dataset()
    proposal = task.proposal(model, tokenizer, constraints, config) if config.proposal_fraction > 0 else None
    if config.proposal_fraction > 0 and proposal is None:
        raise ConfigError(f"task {task.name} has no proposal sampler: set proposal_fraction 0")
    trainer = GFNTrainer(model, rewards, config, train_dataset=dataset, processing_class=tokenizer,
                         constraints=constraints, sample_metrics=task.sample_metrics(), tool=task.tool(),
                         proposal=proposal)
    if with_rewards:
        task.prepare_trainer(trainer)
    return task, trainer
