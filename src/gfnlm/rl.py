"""RL baseline: GRPO (TRL's ``GRPOTrainer``) on a gfnlm :class:`~gfnlm.tasks.Task`.

The RL policy has the GFlowNet policy's action space and tool: episodes are drawn by gfnlm's own
sampler (:func:`gfnlm.sampling.sample`) with the task's constraints (allowed tokens, stop tokens,
min/max length) and its tool (e.g. the calculator), through TRL's ``rollout_func``; the
tool-written tokens get ``env_mask`` 0, so they are part of the state but not of the loss.  The
reward is the task's correctness (``task.correct_reward()``, 1.0 or 0.0; :func:`answer_reward`),
LoRA comes from the same ``lora_*`` fields as GFlowNet training (dropout off), and the result is
a checkpoint that :func:`gfnlm.trainer.load_trained` loads like a GFlowNet one.

What TRL receives per episode (one per generation; TRL's sampler already repeats each prompt
``num_generations`` times, consecutively, before calling ``rollout_func``):

* ``prompt_ids``: the prompt rendered with :func:`gfnlm.data.render_prompt`;
* ``completion_ids``: the episode's state (actions and tool output) followed by one stop token
  (the tokenizer's EOS if it is a stop token, else the first stop id);
* ``logprobs``: the sampler's log q of each action under the constrained policy (0 for tool
  tokens), then log q(⊤) for the stop token;
* ``env_mask``: 1 on actions, 0 on tool-written tokens and on a *forced* stop (at
  ``max_new_tokens`` the policy has no choice);
* ``gfnlm_completion``: the state as text (decoded as gfnlm decodes it for rewards); reward
  functions receive it as ``completions`` (TRL's own decoding skips special tokens).

Log-probabilities in the loss: TRL's log-probs are recomputed by :class:`GFNGRPOTrainer` over the
task's restricted vocabulary (allowed tokens and stop tokens; the others' logits are pushed 50 nats
below the row's minimum), so they equal the sampler's except where the *length* rules apply
(before ``min_new_tokens`` stopping is impossible for the sampler but keeps its mass in TRL's
normaliser; a task's ``stop_after_tool`` rule is switched off for RL, as TRL's pass cannot see
which tokens a tool wrote); the stop token's log-prob is that of the stop action (the sum over all stop ids, as
in the sampler), and forced stops are masked out. Entropies (logged) are over tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import checkpoint as ckpt
from .config import GFNConfig
from .data import as_rows, render_prompt
from .errors import ConfigError
from .sampling import Constraints, check_fits, device_generator, sample

#: extra rollout field holding the state text; the reward wrappers pass it on as ``completions``
STATE_FIELD = "gfnlm_completion"


# --- reward -------------------------------------------------------------------------------------
def answer_reward(task) -> Callable[..., list[float]]:
    """The task's correctness reward ``f(prompts, completions, **columns) -> list[float]`` (1.0 if
    correct, else 0.0): ``task.correct_reward()``; a task without one needs ``reward_funcs``."""
    try:
        return task.correct_reward()
    except (NotImplementedError, AttributeError):
        raise ConfigError(f"task {getattr(task, 'name', task)!r} has no correct_reward(): "
                          "pass reward_funcs to grpo_train") from None


def on_states(fn: Callable) -> Callable:
    """Wrap a TRL-style reward so that ``completions`` is gfnlm's state text (tool output included,
    stop token excluded, special tokens kept) when the rollout provides it."""

    def reward(prompts, completions, **kw):
        states = kw.pop(STATE_FIELD, None)
        return fn(prompts=prompts, completions=states if states is not None else completions, **kw)

    reward.__name__ = getattr(fn, "__name__", type(fn).__name__)
    return reward


# --- rollouts -----------------------------------------------------------------------------------
class GFNRollout:
    """TRL ``rollout_func`` drawing episodes with gfnlm's sampler (constraints, tool, temperature 1).

    ``rollout(model, prompts)`` (P prompt strings, one per episode; repeated prompts are encoded
    once) returns a dict of per-episode lists: ``prompt_ids`` [P][Lp], ``completion_ids`` [P][n+1],
    ``logprobs`` [P][n+1] (floats, log space), ``env_mask`` [P][n+1] (0/1) and ``gfnlm_completion``
    [P] (str). ``last_samples`` keeps the :class:`~gfnlm.sampling.Samples` of the last call (rows in
    the order of ``prompts``). Calling the object as ``f(prompts, trainer)`` samples from the
    trainer's (unwrapped) model with the generator seeded ``seed + 1_000_003 * rank``.
    """

    def __init__(self, tokenizer, constraints: Constraints, *, chat_template: str = "auto", tool=None,
                 max_tool_tokens: int = 0, seed: int = 0, temperature: float = 1.0):
        self.tokenizer = tokenizer
        self.constraints = constraints
        self.chat_template = chat_template
        self.tool = tool
        self.max_tool_tokens = max_tool_tokens if tool is not None else 0
        self.seed = seed
        self.temperature = temperature
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = tokenizer.eos_token_id
        stops = constraints.stop_token_ids
        self.stop_id = eos if isinstance(eos, int) and eos in stops else stops[0]
        self.generator: torch.Generator | None = None
        self.last_samples = None
        self._rendered: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._rendered:
            self._rendered[prompt] = render_prompt(self.tokenizer, prompt, self.chat_template)
        return self._rendered[prompt]

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.generator is None:
            rank = trainer.accelerator.process_index
            self.generator = device_generator(model, self.seed + 1_000_003 * rank)
        return self.rollout(model, prompts)

    @torch.no_grad()
    def rollout(self, model, prompts: Sequence[str], generator: torch.Generator | None = None) -> dict[str, list]:
        if any(not isinstance(p, str) for p in prompts):
            raise ConfigError("the GRPO baseline takes text prompts (rendered with the config's chat_template), "
                              "not conversations")
        g = generator if generator is not None else self.generator
        uniq = list(dict.fromkeys(prompts))
        index = [uniq.index(p) for p in prompts]
        ids = [self.prompt_ids(p) for p in uniq]
        tool_kw = {"tool": self.tool, "tokenizer": self.tokenizer, "max_tool_tokens": self.max_tool_tokens} \
            if self.tool is not None else {}
        s = sample(model, ids, index, self.constraints, temperature=self.temperature, pad_id=self.pad_id,
                   generator=g, **tool_kw)
        self.last_samples = s
        tokens, lengths, log_pf = s.tokens.cpu(), s.lengths.cpu(), s.log_pf.float().cpu()
        stop_lp = s.log_pterm.float().cpu().gather(1, lengths[:, None]).squeeze(1)
        mask = s.action_mask.cpu() if s.action_mask is not None else torch.ones_like(tokens, dtype=torch.bool)
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [], STATE_FIELD: []}
        for b, p in enumerate(index):
            n = int(lengths[b])
            state = tokens[b, :n].tolist()
            acts = mask[b, :n].tolist()
            forced = sum(acts) >= self.constraints.max_new_tokens  # no choice but to stop
            out["prompt_ids"].append(list(ids[p]))
            out["completion_ids"].append(state + [self.stop_id])
            out["logprobs"].append(log_pf[b, :n].tolist() + [float(stop_lp[b])])
            out["env_mask"].append([int(a) for a in acts] + [0 if forced else 1])
            out[STATE_FIELD].append(self.tokenizer.decode(state, skip_special_tokens=False))
        return out


# --- the trainer ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Hide transformers' deprecation notices about (gradient|activation) checkpointing names that
    TRL's internals trigger; gfnlm never turns checkpointing on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(gradient|activation)_checkpointing.*", category=FutureWarning)
        yield


_TRAINER_CLASS = None


def _grpo_trainer_class():
    """``GRPOTrainer`` whose token log-probs are taken over the constrained vocabulary (built lazily:
    trl is an optional dependency)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    from trl import GRPOTrainer

    class GFNGRPOTrainer(GRPOTrainer):
        """TRL's GRPO with log-probs over the task's allowed and stop tokens (see :mod:`gfnlm.rl`)."""

        gfnlm_constraints: Constraints | None = None

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False, **extra):
            cons = self.gfnlm_constraints
            if cons is None or compute_aux_loss or any(v is not None for v in extra.values()):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
            batch_size = batch_size or input_ids.size(0)
            logps, entropies = [], []
            for start in range(0, input_ids.size(0), batch_size):
                ids = input_ids[start:start + batch_size]
                with self.accelerator.autocast():
                    logits = model(input_ids=ids, attention_mask=attention_mask[start:start + batch_size],
                                   logits_to_keep=logits_to_keep + 1).logits
                logits = logits[:, :-1].float() / self.temperature
                tok, stop = cons.token_mask(logits.shape[-1], logits.device)
                floor = logits.detach().amin(-1, keepdim=True) - 50.0
                logp = torch.where(tok | stop, logits, floor).log_softmax(-1)
                target = ids[:, -logits_to_keep:]
                token_lp = logp.gather(-1, target[..., None]).squeeze(-1)
                # a stop id is the stop action, whose probability is the sum over all stop ids
                stop_lp = logp[..., stop].logsumexp(-1)
                logps.append(torch.where(stop[target], stop_lp, token_lp))
                if compute_entropy:
                    entropies.append(-(logp.exp() * logp).sum(-1).detach())
            return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    _TRAINER_CLASS = GFNGRPOTrainer
    return GFNGRPOTrainer


def make_grpo_trainer(task, model, tokenizer, config: GFNConfig, *, output_dir: str | Path,
                      max_steps: int | None = None, num_generations: int = 8, prompts_per_step: int = 2,
                      learning_rate: float | None = None, beta: float = 0.0, seed: int | None = None,
                      report_to: str | list[str] = "none", logging_steps: int = 1,
                      reward_funcs: Callable | list[Callable] | None = None, dataset=None,
                      disable_tqdm: bool | None = None, **grpo_args):
    """Build the ``GRPOTrainer`` that :func:`grpo_train` runs (see there for the arguments).

    Returns ``(trainer, rollout, constraints, config)``: the trainer (``trainer.model`` is the policy),
    its :class:`GFNRollout`, the action space, and the GFNConfig describing the run (written with
    the checkpoint)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl import GRPOConfig

    from .trainer import disable_dropout, lora_config

    max_steps = config.max_steps if max_steps is None else max_steps
    learning_rate = config.learning_rate if learning_rate is None else learning_rate
    seed = config.seed if seed is None else seed
    if isinstance(model, (str, Path)):
        from .models import load_model

        model, tok = load_model(str(model))
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ConfigError("pass the tokenizer when model is not a name or path")
    if num_generations < 2:
        raise ConfigError("GRPO needs num_generations >= 2 (advantages are relative to the prompt's group)")
    constraints = task.constraints(config, tokenizer)
    # TRL's log-prob pass sees token ids only, not which tokens a tool wrote, so it cannot apply a
    # state-dependent stop rule: the RL policy may stop anywhere (its correct-answer reward is 0
    # for a rationale without a result anyway)
    constraints = dataclasses.replace(constraints, stop_after_tool=False)
    tool = task.tool()
    rows = as_rows(dataset if dataset is not None else (config.dataset or task.dataset()))
    rollout = GFNRollout(tokenizer, constraints, chat_template=config.chat_template, tool=tool,
                         max_tool_tokens=config.max_tool_tokens, seed=seed)
    room = constraints.max_new_tokens + rollout.max_tool_tokens
    check_fits(model, [rollout.prompt_ids(r["prompt"]) for r in rows], room)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    train_dataset = Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])

    funcs = reward_funcs if reward_funcs is not None else answer_reward(task)
    funcs = [on_states(f) for f in (funcs if isinstance(funcs, (list, tuple)) else [funcs])]

    disable_dropout(model)
    peft_config = None
    if not getattr(model, "peft_config", None):
        if config.use_peft:
            peft_config = lora_config(config)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
    on_gpu = torch.cuda.is_available() and not grpo_args.pop("use_cpu", False)
    # TRL turns gradient checkpointing on by default; transformers 5 calls it activation checkpointing
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    no_ckpt = {"activation_checkpointing": False} if "activation_checkpointing" in fields else {"gradient_checkpointing": False}
    args = GRPOConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=prompts_per_step * num_generations,
        gradient_accumulation_steps=1,
        num_generations=num_generations,
        learning_rate=learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm,
        beta=beta,
        temperature=1.0,
        max_completion_length=room + 1,
        seed=seed,
        report_to=report_to,
        logging_steps=logging_steps,
        save_strategy="no",
        use_cpu=not on_gpu,
        bf16=False,
        fp16=False,
        remove_unused_columns=False,
        disable_tqdm=config.disable_tqdm if disable_tqdm is None else disable_tqdm,
        **{**no_ckpt, **grpo_args},
    )
    with _quiet():
        trainer = _grpo_trainer_class()(model=model, reward_funcs=funcs, args=args, train_dataset=train_dataset,
                                        processing_class=tokenizer, peft_config=peft_config, rollout_func=rollout)
    trainer.gfnlm_constraints = constraints
    run_config = dataclasses.replace(config, output_dir=str(output_dir), max_steps=max_steps,
                                     learning_rate=learning_rate, seed=seed)
    return trainer, rollout, constraints, run_config


def grpo_train(task, model, tokenizer, config: GFNConfig, *, output_dir: str | Path, max_steps: int | None = None,
               num_generations: int = 8, prompts_per_step: int = 2, learning_rate: float | None = None,
               beta: float = 0.0, seed: int | None = None, report_to: str | list[str] = "none",
               logging_steps: int = 1, reward_funcs=None, dataset=None, disable_tqdm: bool | None = None,
               **grpo_args):
    """GRPO fine-tuning of ``model`` on ``task`` (the RL baseline); returns the trained model (eval mode).

    Each step takes ``prompts_per_step`` prompts of the task's dataset and samples ``num_generations``
    episodes for each (a batch of B = prompts_per_step * num_generations episodes, one optimiser
    step, on-policy) with gfnlm's sampler at temperature 1, under the task's constraints and with its
    tool; the reward of an episode is ``reward_funcs`` (default: the task's correctness, 1.0/0.0) of
    its state text; advantages are standardised within each prompt's group (TRL).

    Args:
        task: a :class:`gfnlm.tasks.Task` (``dataset()``, ``constraints()``, ``tool()``,
            ``correct_reward()``).
        model: a ``PreTrainedModel`` (LoRA from ``config.lora_*`` unless ``config.use_peft`` is false;
            a ``PeftModel`` is trained as it is) or a name/path for :func:`gfnlm.models.load_model`.
        tokenizer: its tokenizer (may be None when ``model`` is a name).
        config: the task's :class:`GFNConfig` (model, chat_template, lengths, max_tool_tokens, lora_*,
            learning-rate schedule, warm-up, weight decay, Adam betas, gradient clipping).
        output_dir: TRL's logs and ``log_history.json``; the result is ``output_dir/checkpoint-<max_steps>``.
        max_steps, learning_rate, seed: default to the config's.
        num_generations: episodes per prompt (G of GRPO; at least 2).
        prompts_per_step: distinct prompts per step.
        beta: KL coefficient towards the base model (adapters off); 0 loads no reference.
        report_to, logging_steps: TRL/transformers logging ("none", "tensorboard", ...).
        reward_funcs: TRL-style ``f(prompts, completions, **columns) -> list[float]`` (rewards, not
            log-rewards), or a list; ``completions`` are gfnlm state texts.
        dataset: rows with a ``prompt`` (default: ``config.dataset`` or ``task.dataset()``).
        **grpo_args: further ``trl.GRPOConfig`` fields (e.g. ``loss_type``, ``scale_rewards``).

    Shapes per step: prompts [B] (each prompt repeated num_generations times, consecutively);
    completions [B] of n_b + 1 tokens (state and stop); rewards and advantages [B].
    """
    trainer, rollout, constraints, run_config = make_grpo_trainer(
        task, model, tokenizer, config, output_dir=output_dir, max_steps=max_steps, num_generations=num_generations,
        prompts_per_step=prompts_per_step, learning_rate=learning_rate, beta=beta, seed=seed, report_to=report_to,
        logging_steps=logging_steps, reward_funcs=reward_funcs, dataset=dataset, disable_tqdm=disable_tqdm,
        **grpo_args)
    with _quiet():
        trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    if trainer.accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        save_rl_checkpoint(Path(output_dir) / f"checkpoint-{run_config.max_steps}", model, run_config, constraints,
                           step=trainer.state.global_step,
                           info={"method": "grpo", "num_generations": num_generations,
                                 "prompts_per_step": prompts_per_step, "beta": beta,
                                 "loss_type": trainer.args.loss_type,
                                 "num_processes": trainer.accelerator.num_processes})
    trainer.accelerator.wait_for_everyone()
    return model


def save_rl_checkpoint(path: str | Path, model, config: GFNConfig, constraints: Constraints, *, step: int,
                       info: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint that :func:`gfnlm.trainer.load_trained` loads like a GFlowNet one,
    atomically (:mod:`gfnlm.checkpoint`): ``adapter/`` (or ``trainable.safetensors`` without LoRA),
    ``gfnlm_config.yaml`` and ``trainer_state.json`` with the constraints. Call on one process."""
    from .trainer import write_policy_files

    path = Path(path)
    tmp = ckpt.begin(path)
    if not getattr(model, "peft_config", None):
        from safetensors.torch import save_file

        from .trainer import TRAINABLE

        save_file({f"lm.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(tmp / TRAINABLE))
    write_policy_files(tmp, model, config, constraints, {"step": step, **(info or {})})
    return ckpt.commit(path)
