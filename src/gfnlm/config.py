"""``GFNConfig``: every setting of a GFlowNet fine-tuning run, in one documented dataclass.

A config is built in Python (``GFNConfig(max_steps=100)``), from YAML
(``GFNConfig.from_yaml("configs/rng.yaml")``) or from YAML plus command-line overrides
(``--learning_rate 1e-3`` or ``--learning_rate=1e-3``).  An unknown field is an error that
names the closest known field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

#: What PyYAML's constructors raise besides YAMLError on some malformed values (``2001-13-45``,
#: ``!!bool x``, ``!!timestamp x``, a number past Python's 4300-digit limit, deep nesting).
YAML_VALUE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, RecursionError)


def printable(text) -> str:
    """``text`` for a one-line error message: as it is when printable, else with escapes (``\\n``)."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class GFNConfig:
    """Configuration of :class:`gfnlm.GFNTrainer` (see each field's ``help``)."""

    # --- what to train -------------------------------------------------------------------------
    model: str = _f("smollm2-135m", "Policy model: an embedded name (smollm2-135m, gemma3-270m), a .gguf file, a local folder or a hub id.")
    task: str | None = _f(None, "Task that supplies prompts, reward and evaluation (e.g. 'rng', or 'package.module:TaskClass'). None when rewards and dataset are given in Python.")
    task_args: dict = _f({}, "Task-specific settings (each task documents and validates its own keys).")
    dataset: str | None = _f(None, "Path to a prompt file (.jsonl/.json/.csv with a 'prompt' column, or .txt with one prompt a line). Overrides the task's prompts.")
    output_dir: str = _f("runs/gfnlm", "Folder for checkpoints, TensorBoard logs and the final adapters.")
    seed: int = _f(0, "Random seed (model init, prompt order, sampling, replay). Rank r of a multi-process run draws its episodes from seed + 1000003 r.")
    chat_template: str = _f("auto", "Wrap prompts in the tokenizer's chat template: 'auto' (if the tokenizer has one), 'always' or 'never'.")

    # --- optimisation --------------------------------------------------------------------------
    max_steps: int = _f(100, "Number of optimiser steps.")
    learning_rate: float = _f(1e-4, "Peak learning rate of the policy parameters (LoRA adapters or the full model).")
    log_z_learning_rate: float = _f(1e-1, "Learning rate of the learned log Z (TB, or modified SubTB anchored at the empty prefix).")
    lr_scheduler_type: str = _f("constant_with_warmup", "Learning-rate schedule (transformers.get_scheduler name: linear, cosine, constant, constant_with_warmup, ...).")
    warmup_steps: int = _f(5, "Linear warm-up steps of the learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables clipping), applied to the LM's parameters and to log Z's apart (one joint norm under DeepSpeed or FSDP).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimiser step.")

    # --- objective -----------------------------------------------------------------------------
    loss_type: str = _f("modified_subtb", "GFlowNet objective: modified_subtb, tb, vargrad or modified_db (see gfnlm.losses).")
    subtb_lambda: float = _f(1.0, "Modified SubTB weight lambda^(j-i-1) of a pair (i<j); 1.0 weights all pairs equally (O(n) closed form).")
    log_z: str = _f("auto", "Learned log Z: 'none', 'scalar', 'prompt' (a linear head on the prompt's last hidden state) or 'auto' (for tb, and for modified SubTB when stopping at the empty prefix is impossible: 'prompt' when the dataset has several distinct prompts, 'scalar' for one; else none).")
    reward_temperature: float = _f(1.0, "Reward temperature T at step 0: the target is R^(1/T) (log R / T).")
    reward_temperature_end: float | None = _f(None, "Reward temperature at the end of the schedule (None: constant).")
    reward_temperature_horizon: int = _f(0, "Steps over which T moves linearly from reward_temperature to reward_temperature_end.")
    reward_weights: list | None = _f(None, "Weights of the reward functions (summed in log space); None = all 1.")

    # --- episodes ------------------------------------------------------------------------------
    prompts_per_step: int = _f(1, "Distinct prompts per micro-batch.")
    row_weight_column: str | None = _f(None, "Dataset column holding each row's relative chance of being drawn for a step (None: rows drawn uniformly). The arithmetic task draws its labelled questions 5 times as often as the pool's, as the paper does.")
    samples_per_prompt: int = _f(16, "Episodes per prompt per micro-batch (on-policy + tempered + replayed).")
    max_new_tokens: int = _f(20, "Maximum episode length; stopping is forced there.")
    min_new_tokens: int = _f(0, "Minimum episode length; stopping is impossible before it.")
    stop_tokens: list = _f(["eos"], "Tokens that mean stop: 'eos', or literal strings that are single tokens ('.', '\\n'), or integer ids.")
    allowed_tokens: list | None = _f(None, "If set, the only tokens (strings or ids) the policy may emit besides stop.")
    forbidden_tokens: list = _f([], "Tokens (strings or ids) the policy may never emit.")
    no_repeat_ngram_size: int = _f(0, "If n > 0, no n consecutive tokens may occur twice in a completion: a constraint of the target (c(Z) = 0 for such texts), masked for the policy, its reward, the generate baselines and SMC alike (gfnlm.patterns.NoRepeatRule). 0: no such rule.")
    stop_after_tool: bool = _f(False, "With a tool, episodes may stop only right after its output (e.g. after a computed result), besides the forced stop at max_new_tokens.")
    max_tool_tokens: int = _f(32, "With a tool (e.g. a calculator), at most this many tool-written tokens per episode; they are not actions.")

    # --- exploration and replay ----------------------------------------------------------------
    tempered_fraction: float = _f(0.25, "Fraction of fresh episodes drawn from a tempered policy (exploration).")
    explore_temperature_min: float = _f(0.5, "Tempered episodes use a temperature drawn uniformly from [min, max].")
    explore_temperature_max: float = _f(2.0, "See explore_temperature_min.")
    epsilon: float = _f(0.0, "Epsilon-uniform exploration: probability of a uniformly random allowed action at each step (fresh episodes).")
    compile_decoder: bool = _f(False, "Sample with the Llama decoder's step compiled by torch.compile (Llama-architecture models; others ignore it): the same policy up to float rounding, 0.2-0.5 s faster per sampling of 16 x 20 tokens on a 2-core CPU, after 73-78 s of compilation once per process and batch size (bench/step.py measures both). Worth it for long runs of long completions; it does not pay for itself on the rng demo's 3-token episodes.")
    proposal_fraction: float = _f(0.0, "Fraction of each row's episodes drawn from a proposal sampler instead of the policy (off-policy exploration, e.g. the contrastive task's token-level sampler on the base model); needs a proposal: GFNTrainer(proposal=...) or the task's. Scored, replayed and trained on like the policy's own.")
    replay_fraction: float = _f(0.25, "Fraction of each row's episodes replayed from its buffer (once it holds entries for that row); drawn before the step's fresh episodes are added.")
    buffer_capacity: int = _f(50, "Replay-buffer capacity per dataset row (distinct completions, lowest reward evicted).")
    buffer_priority_temperature: float = _f(1.0, "Replay sampling is proportional to exp(log R / this); large values approach uniform.")

    # --- LoRA (PEFT) ---------------------------------------------------------------------------
    init_from: str | None = _f(None, "Start from the policy of this checkpoint (its LoRA adapters or weights), e.g. a `gfnlm sft` run; the base model is still `model`.")
    use_peft: bool = _f(True, "Train LoRA adapters (PEFT) on a frozen base; False trains all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_target_modules: Any = _f("all-linear", "LoRA target modules (a list of names or 'all-linear').")
    mixed_precision: str = _f("no", "Precision of the policy's forward and backward: no (fp32), bf16 (autocast), or fp16 (autocast with Accelerate's loss scaling; CUDA only). LM-likelihood rewards always run in fp32, and the log q of the loss always comes from fp32 logits.")
    base_model_copy: bool = _f(False, "With full fine-tuning (use_peft false), give LM-likelihood rewards a frozen copy of the base model (one more copy of the weights in memory); without it such a run stops with an error, since the reward would move with the policy.")

    # --- logging and checkpoints ---------------------------------------------------------------
    logging_steps: int = _f(1, "Log every this many steps.")
    report_to: list = _f(["tensorboard"], "Trackers: tensorboard, wandb, or [] for none.")
    save_steps: int = _f(0, "Write a checkpoint every this many steps (0: only at the end).")
    save_total_limit: int | None = _f(2, "Keep at most this many step checkpoints (None: all).")
    disable_tqdm: bool = _f(False, "Hide the progress bar.")

    # ------------------------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check types and values; raise :class:`ConfigError` with a one-line message."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        from .losses import LOSSES

        if self.loss_type not in LOSSES:
            raise ConfigError(f"unknown loss_type '{printable(self.loss_type)}': choose one of {sorted(LOSSES)}")
        if self.log_z not in ("auto", "none", "scalar", "prompt"):
            raise ConfigError(f"unknown log_z '{printable(self.log_z)}': choose auto, none, scalar or prompt")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"unknown mixed_precision '{printable(self.mixed_precision)}': choose no, bf16 or fp16")
        if self.chat_template not in ("auto", "always", "never"):
            raise ConfigError(f"unknown chat_template '{printable(self.chat_template)}': choose auto, always or never")
        for name in ("tempered_fraction", "replay_fraction", "proposal_fraction", "epsilon"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name}={v} must be between 0 and 1")
        if self.tempered_fraction + self.replay_fraction + self.proposal_fraction > 1.0:
            raise ConfigError("tempered_fraction + replay_fraction + proposal_fraction must not exceed 1")
        for name in ("max_steps", "samples_per_prompt", "prompts_per_step", "gradient_accumulation_steps", "buffer_capacity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("reward_temperature", "explore_temperature_min", "explore_temperature_max", "buffer_priority_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.reward_temperature_end is not None and self.reward_temperature_end <= 0:
            raise ConfigError("reward_temperature_end must be positive")
        if self.learning_rate < 0:
            raise ConfigError("learning_rate must be non-negative")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be 0 (no rule) or a positive n")

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "GFNConfig":
        unknown = [k for k in data if k not in cls.field_names()]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(str(k), cls.field_names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config field '{printable(k)}' in {source}{hint}; `gfnlm train --help` lists the fields")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "GFNConfig":
        """Load a YAML file (optional), then apply ``--field value`` overrides."""
        data = merge_overrides(read_yaml(path) if path is not None else {}, parse_overrides(overrides or []))
        return cls.from_dict(data, source=str(path) if path else "overrides")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def reward_temperature_at(self, step: int) -> float:
        """Reward temperature T at optimiser step ``step`` (linear schedule)."""
        if self.reward_temperature_end is None or self.reward_temperature_horizon <= 0:
            return self.reward_temperature
        frac = min(max(step / self.reward_temperature_horizon, 0.0), 1.0)
        return self.reward_temperature + frac * (self.reward_temperature_end - self.reward_temperature)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping of config fields; one-line :class:`ConfigError` on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found: pass an existing YAML file to --config")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: fix the syntax") from None
    except YAML_VALUE_ERRORS as e:
        raise ConfigError(f"config file '{path}' holds a value YAML cannot read ({type(e).__name__}: "
                          f"{printable(' '.join(str(e).split()))}): fix it, or quote it as a string") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of field: value")
    return loaded


def merge_overrides(data: dict, overrides: dict) -> dict:
    """``data`` updated with ``overrides``; a mapping override (``--task_args.floor -30``) updates the
    file's mapping key by key instead of replacing it."""
    out = dict(data)
    for k, v in overrides.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(args: list[str]) -> dict:
    """``['--a', '1', '--b=x', '--task_args.floor', '-30']`` → ``{'a': 1, 'b': 'x', 'task_args': {'floor': -30}}``.

    Values are parsed as YAML scalars/lists (``1e-3``, ``true``, ``[a, b]``)."""
    out: dict = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument '{printable(a)}': overrides look like --field value")
        key = a[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{printable(key)} has no value: write --{printable(key)} VALUE")
            raw = args[i + 1]
            i += 2
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, *YAML_VALUE_ERRORS):  # not a YAML value: the text itself
            value = raw
        if "." in key:
            top, sub = key.split(".", 1)
            group = out.setdefault(top, {})
            if not isinstance(group, dict):
                raise ConfigError(f"--{printable(top)} and --{printable(key)} both given: set the whole value or its "
                                  "keys, not both")
            group[sub] = value
        else:
            out[key] = value
    return out


def _coerce(name: str, value, hint):
    """Check ``value`` against the field's type hint, converting ints to floats etc."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    base = origin or hint
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"config field '{name}' is too large a number: give a float") from None
    if base is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is bool and isinstance(value, bool):
        return value
    if base is str and isinstance(value, str):
        return value
    if base is list and isinstance(value, (list, tuple)):
        return list(value)
    if base is list and isinstance(value, (str, int)):
        return [value]
    if base is dict and isinstance(value, dict):
        return dict(value)
    tname = getattr(base, "__name__", str(base))
    raise ConfigError(f"config field '{name}' must be {tname}, got {value!r}")
