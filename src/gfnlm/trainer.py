"""``GFNTrainer``: GFlowNet fine-tuning of a causal LM, in TRL's shape, on Accelerate.

The policy is wrapped once (:func:`gfnlm.policy.wrap_policy`); LM rewards read its base model only
through :class:`gfnlm.policy.BaseLM`. One optimiser step, for each of
``gradient_accumulation_steps`` micro-batches:

1. collect episodes (:class:`gfnlm.rollout.Collector`, no grad): draw ``prompts_per_step`` rows;
   for each, replay first from that row's buffer, then sample on-policy and tempered episodes,
   score their untempered log-rewards for every prefix, and add them to the buffer;
2. one teacher-forced pass of the policy gives log q of every token and of stopping at every
   prefix (:mod:`gfnlm.scoring`); the objective (:data:`gfnlm.losses.LOSSES`, one
   :class:`~gfnlm.losses.LossSpec` each) compares them with the tempered log-rewards; backward.

Then clip (the LM's gradient and log Z's apart), step the optimiser and the learning-rate
schedule.  The model stays in eval mode throughout, so dropout (LoRA's included) is off.

Several processes (DDP, FSDP, DeepSpeed) come from ``accelerate launch``: each rank samples
its own episodes (seed + rank) and gradients are averaged by Accelerate.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .config import GFNConfig
from .data import render_prompt
from .decoding import compile_seconds
from .errors import ConfigError, DataError, GFNLMError, first_line
from .losses import LOSSES, tempered
from .patterns import NoRepeatRule
from .policy import bind_base_models, fp32_logits, wrap_policy
from .rewards import Reward, RewardBatch, as_reward
from .rollout import Collector, Episodes, Proposal, require_proposal
from .sampling import Constraints, check_fits, device_generator, sample
from .scoring import action_log_probs, completion_logits, score


class GFNPolicy(nn.Module):
    """The trainable part: the LM (with adapters) and an optional learned log Z.

    ``forward`` is the teacher-forced scoring pass; wrapping it in one module lets DDP see one
    forward per backward.
    """

    def __init__(self, lm: nn.Module, log_z: str = "none"):
        super().__init__()
        self.lm = lm
        self.log_z_kind = log_z
        if log_z == "scalar":
            self.log_z = nn.Parameter(torch.zeros(1))
        elif log_z == "prompt":
            hidden = lm.config.get_text_config().hidden_size
            self.log_z_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.log_z_head.weight)
            nn.init.zeros_(self.log_z_head.bias)

    def forward(self, prompts, prompt_index: Tensor, tokens: Tensor, lengths: Tensor, constraints: Constraints,
                pad_id: int = 0, action_mask: Tensor | None = None, actions: bool = False):
        """Returns log_pf [B, N], log_pterm [B, N+1] and log_z [B] (or None), all log space.

        ``actions=True`` (soft-label distillation): the whole constrained distribution of the next
        action at every prefix instead, [B, N+1, V+1] log space (:func:`gfnlm.scoring.action_log_probs`)."""
        if actions:
            check_fits(self.lm, prompts, max(tokens.shape[1], 1))
            logits, _ = completion_logits(self.lm, prompts, prompt_index, tokens, lengths, pad_id)
            return action_log_probs(logits, constraints, tokens, lengths)
        sc = score(self.lm, prompts, prompt_index, tokens, lengths, constraints, pad_id=pad_id,
                   return_prompt_hidden=self.log_z_kind == "prompt", action_mask=action_mask)
        log_z = None
        if self.log_z_kind == "scalar":
            log_z = self.log_z.expand(tokens.shape[0])
        elif self.log_z_kind == "prompt":
            log_z = self.log_z_head(sc.prompt_hidden.detach().float()).squeeze(-1)[prompt_index]
        return sc.log_pf, sc.log_pterm, log_z


def resolve_token_ids(tokenizer, items: Sequence, what: str) -> list[int]:
    """Map 'eos', single-token strings or ids to token ids (error if a string is several tokens)."""
    ids: list[int] = []
    for it in items:
        if isinstance(it, int):
            ids.append(it)
        elif it == "eos":
            eos = tokenizer.eos_token_id
            if eos is None:
                raise ConfigError(f"{what}: the tokenizer has no EOS token; name the stop token explicitly")
            ids.extend(eos if isinstance(eos, list) else [eos])
        elif isinstance(it, str):
            tid = tokenizer.convert_tokens_to_ids(it) if it in tokenizer.get_vocab() else None
            if tid is None:
                enc = tokenizer.encode(it, add_special_tokens=False)
                unk = getattr(tokenizer, "unk_token_id", None)
                unknown = unk is not None and enc == [unk] and it != tokenizer.unk_token
                if len(enc) == 1 and (unknown or tokenizer.decode(enc).strip() != it.strip()):
                    raise ConfigError(f"{what}: {it!r} is not in the tokenizer's vocabulary; use a token it knows or an id")
                if len(enc) != 1:
                    raise ConfigError(f"{what}: {it!r} is {len(enc)} tokens for this tokenizer; use a single token or an id")
                tid = enc[0]
            ids.append(int(tid))
        else:
            raise ConfigError(f"{what}: {it!r} is neither a string nor a token id")
    return sorted(set(ids))


def constraints_from_config(args: GFNConfig, tokenizer, allowed_token_ids: list[int] | None = None) -> Constraints:
    """The action space a config describes (``allowed_token_ids`` overrides ``allowed_tokens``)."""
    if allowed_token_ids is None and args.allowed_tokens:
        allowed_token_ids = resolve_token_ids(tokenizer, args.allowed_tokens, "allowed_tokens")
    return Constraints(
        stop_token_ids=resolve_token_ids(tokenizer, args.stop_tokens, "stop_tokens"),
        min_new_tokens=args.min_new_tokens,
        max_new_tokens=args.max_new_tokens,
        allowed_token_ids=allowed_token_ids,
        forbidden_token_ids=resolve_token_ids(tokenizer, args.forbidden_tokens, "forbidden_tokens"),
        stop_after_tool=args.stop_after_tool,
        prefix_rule=NoRepeatRule(args.no_repeat_ngram_size) if args.no_repeat_ngram_size else None,
    )


class GFNTrainer:
    """Fine-tune ``model`` so that it samples completions with probability ∝ R.

    Args:
        model: a model id/path/embedded name (loaded with :func:`gfnlm.models.load_model`) or a
            ``PreTrainedModel`` (or a ``PeftModel``).
        reward_funcs: one reward or a list: :class:`gfnlm.rewards.Reward` objects or TRL-style
            callables ``f(prompts, completions, **columns) -> list[float]`` (log-rewards). An
            LM-likelihood reward may be built on the plain model before the trainer wraps it: it
            reads the base model through :class:`gfnlm.policy.BaseLM`, adapters off.
        args: :class:`GFNConfig` (default: ``GFNConfig()``).
        train_dataset: rows with a ``prompt`` (list of dicts/strings, ``datasets.Dataset`` or a file).
        processing_class: the tokenizer (loaded with the model if ``model`` is a string).
        peft_config: a ``peft.LoraConfig``; if None and ``args.use_peft``, one is built from the
            ``lora_*`` fields. Ignored when ``model`` is already a ``PeftModel``.
        constraints: override the action space built from the config (stop/allowed tokens, lengths).
        sample_metrics: optional ``f(prompts, completions) -> dict[str, float]`` logged on the fresh
            on-policy episodes of each step (e.g. a task's valid fraction).
        tool: optional ``f(completion_text) -> str | None`` whose output is written into the state
            after each action (e.g. :class:`gfnlm.tools.Calculator`); tool tokens are not actions.
        proposal: optional sampler of the ``proposal_fraction`` episodes of each row,
            ``f(prompt_ids, counts, seed) -> episodes`` (:data:`gfnlm.rollout.Proposal`): another
            behaviour policy over the same actions, trained on like the policy's own samples.
    """

    def __init__(
        self,
        model,
        reward_funcs,
        args: GFNConfig | None = None,
        train_dataset=None,
        processing_class=None,
        peft_config=None,
        constraints: Constraints | None = None,
        sample_metrics: Callable[[list[str], list[str]], dict] | None = None,
        tool: Callable[[str], str | None] | None = None,
        proposal: Proposal | None = None,
    ):
        from accelerate import Accelerator

        self.args = args = args or GFNConfig()
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # what `accelerate launch` / its config asked for
        if launched and launched.lower() != args.mixed_precision:
            raise ConfigError(f"accelerate launch asks for mixed precision {launched.lower()} but the config has "
                              f"mixed_precision {args.mixed_precision}: set mixed_precision: {launched.lower()} in the "
                              "gfnlm config (its field decides) or launch with the same precision")
        try:
            self.accelerator = Accelerator(log_with=list(args.report_to) or None, project_dir=args.output_dir,
                                           mixed_precision=args.mixed_precision)
        except ValueError as e:  # fp16 without a GPU, or another precision than this process's Accelerator
            why = first_line(e, 300)
            fix = ("start a new process: Accelerate keeps one precision per process" if "already been initialized" in why
                   else "use bf16 or no on this machine")
            raise ConfigError(f"mixed_precision {args.mixed_precision}: {why} ({fix})") from None
        self._check_sharding()
        if args.mixed_precision == "fp16" and self.accelerator.device.type != "cuda":
            raise ConfigError(f"mixed_precision fp16 needs a CUDA GPU (this run is on {self.accelerator.device.type}, where "
                              "Accelerate would silently train in fp32): use bf16 or no")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 and self.accelerator.num_processes != world:
            # e.g. torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: every process
            # would believe it is the only one and they would overwrite each other's checkpoints
            raise ConfigError(
                f"launched as {world} processes but Accelerate sees {self.accelerator.num_processes}: "
                "on CPU set ACCELERATE_USE_CPU=1 (e.g. ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N)"
            )
        if isinstance(model, (str, Path)):
            from .models import load_model

            model, tok = load_model(str(model))
            processing_class = processing_class or tok
        if processing_class is None:
            raise ConfigError("pass processing_class (the tokenizer) when model is not a name or path")
        self.tokenizer = processing_class
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        model = wrap_policy(model, args.use_peft, peft_config, lambda: lora_config(args), args.seed)
        disable_dropout(model)
        fp32_logits(model)
        model.eval()

        rewards: list[Reward] = [as_reward(r) for r in (reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])]
        if not rewards:
            raise ConfigError("no reward function: pass reward_funcs")
        bind_base_models(rewards, model, args.base_model_copy)
        self.loss = LOSSES[args.loss_type]
        if self.loss.prefix_rewards and not all(r.prefix for r in rewards):
            names = [r.name for r in rewards if not r.prefix]
            raise ConfigError(
                f"loss_type {args.loss_type} needs log-rewards for every prefix, but {names} give only a terminal reward: "
                "use loss_type tb or vargrad, or a prefix reward"
            )
        constraints = constraints or constraints_from_config(args, self.tokenizer)
        if constraints.stop_after_tool and tool is None:
            raise ConfigError("stop_after_tool is set but there is no tool: pass tool=... or set stop_after_tool false")
        if self.loss.adjacent_pairs_only and (why := constraints.why_empty_cannot_stop()):
            raise ConfigError(f"loss_type {args.loss_type} compares only adjacent stoppable prefixes, and with "
                              f"{why} the first tokens (or every pair) have none: use loss_type modified_subtb")
        require_proposal(args, proposal)
        rank = self.accelerator.process_index
        seed = args.seed + 1_000_003 * rank
        self.collector = Collector(args, self.tokenizer, train_dataset, rewards, constraints, tool,
                                   torch.Generator().manual_seed(seed), sample_metrics,
                                   device_generator(self.accelerator.device, seed + 1), proposal)
        self.collector.check_prompts_fit(model)

        policy = GFNPolicy(model, self.log_z_kind())
        lm_params = [p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("log_z")]
        z_params = [p for n, p in policy.named_parameters() if p.requires_grad and n.startswith("log_z")]
        groups = [{"params": lm_params, "lr": args.learning_rate, "weight_decay": args.weight_decay}]
        if z_params:
            groups.append({"params": z_params, "lr": args.log_z_learning_rate, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2))
        from transformers import get_scheduler

        self.scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                                       num_training_steps=args.max_steps)
        self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        # checkpoints are Accelerate's own state (model, optimiser, scaler, every process's torch / CUDA /
        # numpy / Python RNG) plus the schedule and the run's state; with LoRA the model part is the
        # trainable parameters only (see save_checkpoint)
        self.accelerator.register_for_checkpointing(self.scheduler, RunState(self))
        self.accelerator.register_save_state_pre_hook(self._save_trainable)
        self.accelerator.register_load_state_pre_hook(self._load_trainable)
        for r in rewards:  # a frozen base copy lives where the policy does
            if getattr(getattr(r, "base_lm", None), "frozen_copy", False):
                r.base_lm.module.to(self.accelerator.device)
        self.step = 0
        self.history: list[dict] = []
        #: extra JSON-able entries written into every checkpoint's trainer_state.json (e.g. EM progress)
        self.extra_info: dict = {}
        self._trackers_started = False
        self._warned_no_residual = False  # warned once that a whole step gave the loss nothing
        # here, not in train(): EM runs train() once per round with a smaller max_steps
        if args.reward_temperature_end is not None and args.reward_temperature_horizon > args.max_steps \
                and self.accelerator.is_main_process:
            print(f"warning: reward_temperature_horizon {args.reward_temperature_horizon} is beyond max_steps "
                  f"{args.max_steps}, so the last step trains at reward temperature "
                  f"{args.reward_temperature_at(args.max_steps - 1):.3g}, not reward_temperature_end "
                  f"{args.reward_temperature_end:g}: set reward_temperature_horizon {args.max_steps} to anneal over the whole run")

    def _check_sharding(self) -> None:
        """Refuse the launches gfnlm cannot run correctly, with the fix: FSDP and DeepSpeed ZeRO-3 shard
        the weights that the sampler and LM rewards read outside the wrapped forward (not supported yet:
        docs/scaling.md), and Accelerate turns an FSDP launch on CPU into DDP without a word."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        asked_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
        zero3 = acc.distributed_type == DistributedType.DEEPSPEED and \
            getattr(acc.state.deepspeed_plugin, "zero_stage", 0) == 3
        if asked_fsdp and acc.distributed_type != DistributedType.FSDP:
            raise ConfigError(f"accelerate launch asked for FSDP but Accelerate runs {acc.distributed_type.value} "
                              "(FSDP needs GPUs; on CPU Accelerate falls back to DDP): launch with a DDP config")
        if acc.distributed_type == DistributedType.FSDP or zero3:
            raise ConfigError("FSDP and DeepSpeed ZeRO-3 shard the weights that gfnlm's sampler and LM rewards read "
                              "outside the wrapped forward, which is not supported yet (docs/scaling.md): use DDP "
                              "or DeepSpeed ZeRO-2")

    def log_z_kind(self) -> str:
        """The learned log Z: ``args.log_z``, or with ``auto``: none when the loss needs none (or the
        empty prefix can stop, anchoring modified SubTB: see ``Constraints.why_empty_cannot_stop``),
        else one per prompt when the dataset has several prompts (Z depends on the prompt) and a scalar
        for a single prompt."""
        a, c = self.args, self.collector.constraints
        if a.log_z != "auto":
            kind = a.log_z
        else:
            needed = self.loss.log_z == "required" or (
                self.loss.log_z == "anchor" and c.why_empty_cannot_stop() is not None)
            several = len({tuple(p) for p in self.collector.prompt_ids}) > 1
            kind = ("prompt" if several else "scalar") if needed else "none"
        if self.loss.log_z == "required" and kind == "none":
            raise ConfigError(f"loss_type {a.loss_type} needs a learned log Z: set log_z to scalar or prompt")
        return kind

    # --- what the collector holds (the names users and tasks know) ---------------------------
    @property
    def model(self):
        """The policy LM (a PeftModel when LoRA is used), unwrapped from DDP."""
        return self.accelerator.unwrap_model(self.policy).lm

    rows = property(lambda self: self.collector.rows)
    prompt_ids = property(lambda self: self.collector.prompt_ids)
    buffer = property(lambda self: self.collector.buffer)
    generator = property(lambda self: self.collector.generator)
    sample_generator = property(lambda self: self.collector.sample_generator)
    rewards = property(lambda self: self.collector.rewards)
    constraints = property(lambda self: self.collector.constraints)
    tool = property(lambda self: self.collector.tool)

    def reward_batch(self, *a, **kw) -> RewardBatch:
        return self.collector.reward_batch(*a, **kw)

    def log_rewards(self, batch: RewardBatch) -> Tensor:
        """Untempered log R: [B, N+1] with prefix rewards, else [B]."""
        return self.collector.log_rewards(batch)

    def seed_buffer(self, completions, lazy: bool = False) -> int:
        """Add known completions to the replay buffer, now or (``lazy``) when their row is first drawn
        (see :meth:`gfnlm.rollout.Collector.seed_buffer`)."""
        return self.collector.seed_buffer(completions, lazy=lazy)

    def encode_completions(self, texts: Sequence[str], what: str = "completions"):
        return self.collector.encode_completions(texts, what)

    def sample(self, prompts: Sequence[str], n: int, temperature: float = 1.0) -> list[list[str]]:
        """Sample ``n`` completions (text) for each prompt from the current policy."""
        ids = [render_prompt(self.tokenizer, p, self.args.chat_template) for p in prompts]
        idx = torch.arange(len(prompts)).repeat_interleave(n)
        with self.sampling_precision():
            s = sample(self.model, ids, idx, self.constraints, temperature=temperature, pad_id=self.pad_id,
                       generator=self.sample_generator, **self.collector.sample_kwargs())
        texts = [self.tokenizer.decode(c, skip_special_tokens=False) for c in s.completion_ids()]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def diagnostics(self, k: int = 64, rows: Sequence[dict] | None = None, max_prompts: int = 8) -> dict:
        """How close the policy is to its target R^(1/T) (T: the final reward temperature), on ``k``
        of its own samples per prompt for the first ``max_prompts`` of ``rows`` (default: the
        training rows): ELBO, importance-weighted bound, log Z estimate, ESS, Var(log R - log q)
        (:func:`gfnlm.evaluation.sampler_report`; log space)."""
        from .evaluation import sampler_report

        return sampler_report(self.model, self.tokenizer, self.args, self.constraints, self.rewards,
                              rows if rows is not None else self.rows, k=k, max_prompts=max_prompts,
                              seed=self.args.seed, tool=self.tool)

    def sampling_precision(self):
        """The context sampling runs in: the policy's autocast under mixed precision (rewards and the
        loss's log q never run in it), else nothing."""
        return self.accelerator.autocast() if self.args.mixed_precision != "no" else contextlib.nullcontext()

    def _collect(self) -> Episodes:
        """One micro-batch of episodes (no grad)."""
        return self.collector.collect(self.model, self.accelerator.device, self.sampling_precision)

    # --- the loss -------------------------------------------------------------------------------
    def compute_loss(self, ep: Episodes) -> tuple[Tensor, dict]:
        """The GFlowNet loss of one micro-batch (with grad)."""
        device = self.accelerator.device
        T = self.args.reward_temperature_at(self.step)
        tokens, lengths = ep.tokens.to(device), ep.lengths.to(device)
        prompt_index = ep.prompt_index.to(device)
        mask = None if ep.action_mask is None else ep.action_mask.to(device)
        log_pf, log_pterm, log_z = self.policy(ep.prompts, prompt_index, tokens, lengths, self.constraints,
                                               self.pad_id, mask)
        if not torch.isfinite(log_pf).all():
            raise DataError("an episode contains a token the constraints forbid (e.g. a replayed or seeded completion): "
                            "check allowed_tokens/forbidden_tokens against the buffer's completions")
        loss = self.loss(log_pf, log_pterm, tempered(ep.log_r.to(device), T), lengths, log_z=log_z,
                         group=prompt_index, lamda=self.args.subtb_lambda)
        contributing = self.loss.contributing(log_pterm, lengths, log_z=log_z, group=prompt_index,
                                              lamda=self.args.subtb_lambda)
        metrics = {"reward_temperature": T, "episodes/without_residual": 1.0 - contributing.float().mean().item()}
        if log_z is not None:
            metrics["log_z"] = log_z.detach().float().mean().item()
        return loss, metrics

    # --- training ------------------------------------------------------------------------------
    def training_step(self) -> dict:
        """One optimiser step (with gradient accumulation). Returns the logged metrics."""
        a = self.args
        t0, compiling0 = time.perf_counter(), compile_seconds()
        sums: dict[str, float] = {}
        n_episodes = 0
        for micro in range(a.gradient_accumulation_steps):
            ep = self._collect()
            last = micro == a.gradient_accumulation_steps - 1
            with self.accelerator.no_sync(self.policy) if not last else contextlib.nullcontext():
                loss, m = self.compute_loss(ep)
                if not torch.isfinite(loss):
                    raise DataError(f"the loss is {loss.item()} at step {self.step}: check the rewards and the learning rate")
                self.accelerator.backward(loss / a.gradient_accumulation_steps)
            for k, v in {**ep.metrics, **m, "loss": loss.item()}.items():
                sums[k] = sums.get(k, 0.0) + v / a.gradient_accumulation_steps
            n_episodes += ep.n
        sums.update(self.clip_gradients())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        sums.update({"learning_rate": self.scheduler.get_last_lr()[0], "episodes_per_second": n_episodes / dt,
                     "time/step_seconds": dt, "buffer/size": float(len(self.buffer)), "step": self.step})
        if a.compile_decoder:  # the part of this step spent compiling the decoder (a new batch size compiles)
            sums["time/compile_seconds"] = compile_seconds() - compiling0
        if not self._warned_no_residual:
            without = torch.tensor(sums["episodes/without_residual"], device=self.accelerator.device)
            if self.accelerator.num_processes > 1:  # a step learns nothing only if no process's batch did
                without = self.accelerator.reduce(without, "mean")
            if float(without) > 1.0 - 1e-6:
                self._warn_no_residual()
        return sums

    def _warn_no_residual(self) -> None:
        """Say once per run that a step's loss was 0 because no episode gave it a residual
        (``episodes/without_residual`` in the history counts them at every step)."""
        from tqdm.auto import tqdm

        self._warned_no_residual = True
        if not self.accelerator.is_main_process:
            return
        a, spec = self.args, self.loss
        why = ("no prompt had two episodes" if spec.grouped else
               "no episode had two consecutive stoppable prefixes" if spec.adjacent_pairs_only else
               "no episode had two stoppable prefixes")
        if spec.grouped:
            fix = "sample samples_per_prompt >= 2 episodes per prompt"
        elif self.loss.log_z == "anchor" and self.log_z_kind() == "none":
            fix = "set log_z: scalar or prompt, so that every episode is anchored at log Z"
        else:
            fix = "allow stopping at more prefixes (min_new_tokens, stop rules) or use loss_type tb"
        tqdm.write(f"warning: step {self.step}: {why}, so the {a.loss_type} loss was 0 and the step learned nothing "
                   f"(episodes/without_residual in the history counts this at every step): {fix}")

    def clip_gradients(self) -> dict:
        """Clip the LM's gradient and log Z's gradient to ``max_grad_norm`` each, apart: log Z's
        gradient is in nats, often far larger than the adapters', and one shared norm would let it
        shrink the adapters' step to nothing. Gradients are unscaled once (fp16 loss scaling), then
        each group is clipped. Under DeepSpeed or FSDP, which clip sharded gradients themselves, one
        joint norm is applied (logged as ``grad_norm``). Returns the norms before clipping."""
        from accelerate.utils import DistributedType

        a, acc = self.args, self.accelerator
        if not a.max_grad_norm or a.max_grad_norm <= 0:
            return {}
        named = [(n, p) for n, p in acc.unwrap_model(self.policy).named_parameters() if p.requires_grad]
        if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            return {"grad_norm": float(acc.clip_grad_norm_(self.policy.parameters(), a.max_grad_norm))}
        acc.unscale_gradients()
        out = {}
        for key, params in (("grad_norm", [p for n, p in named if not n.startswith("log_z")]),
                            ("grad_norm_log_z", [p for n, p in named if n.startswith("log_z")])):
            if params:
                out[key] = float(torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm))
        return out

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run until ``max_steps``. ``resume_from_checkpoint``: a checkpoint folder, or True for the
        latest one in ``output_dir``. Returns the logged metrics of every step."""
        from tqdm.auto import tqdm

        a = self.args
        if resume_from_checkpoint:
            path = ckpt.latest(a.output_dir) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            if path is None:
                raise DataError(f"no complete checkpoint in {a.output_dir} to resume from")
            self.load_checkpoint(path)
        if a.report_to and not self._trackers_started:
            self.accelerator.init_trackers("gfnlm", config={k: v for k, v in a.to_dict().items()
                                                            if isinstance(v, (int, float, str, bool))})
            self._trackers_started = True
        bar = tqdm(total=a.max_steps, initial=self.step, disable=a.disable_tqdm or not self.accelerator.is_main_process,
                   desc="GFN fine-tuning", dynamic_ncols=True)
        if a.compile_decoder:  # the first steps wait for torch.compile; say why the bar stands still
            bar.set_postfix_str("compiling the decode step: a minute or so on a CPU, once per batch size")
        while self.step < a.max_steps:
            m = self.training_step()
            self.history.append(m)
            if self.step % a.logging_steps == 0:
                if a.report_to:
                    self.accelerator.log({k: v for k, v in m.items() if k != "step"}, step=self.step)
                post = {"loss": f"{m['loss']:.3g}", "logR": f"{m.get('reward/log_r_on_policy', m['reward/log_r_mean']):.3g}",
                        "eps/s": f"{m['episodes_per_second']:.1f}"}
                post.update({k.split("/")[-1]: f"{v:.3g}" for k, v in m.items() if k.startswith("samples/")})
                bar.set_postfix(post)
            bar.update(1)
            if a.save_steps and self.step % a.save_steps == 0 and self.step < a.max_steps:
                self.save_checkpoint(Path(a.output_dir) / f"checkpoint-{self.step}")
                if self.accelerator.is_main_process:
                    ckpt.rotate(a.output_dir, a.save_total_limit)
        bar.close()
        if self.accelerator.is_main_process:  # every logged figure of every step, for plots and bench results
            Path(a.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(a.output_dir) / "history.json").write_text(json.dumps(self.history, indent=0))
        self.save_checkpoint(Path(a.output_dir) / f"checkpoint-{self.step}")
        if self.accelerator.is_main_process:
            ckpt.rotate(a.output_dir, a.save_total_limit)
        self.accelerator.wait_for_everyone()
        if self._trackers_started:
            self.accelerator.end_training()
            self._trackers_started = False
        return self.history

    # --- checkpoints ---------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, Tensor]:
        pol = self.accelerator.unwrap_model(self.policy)
        return {n: p.detach().cpu().clone() for n, p in pol.named_parameters() if p.requires_grad}

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write everything needed for an exact resume, atomically (see :mod:`gfnlm.checkpoint`):
        ``accelerator.save_state`` into the temporary folder, then the policy files, then the
        ``COMPLETE`` marker and the rename, so that no crash leaves a folder resume would load.

        Accelerate writes the optimiser (sharded under FSDP / DeepSpeed), the GradScaler, every
        process's RNG states (torch, CUDA, numpy, Python) and the registered objects: the learning-rate
        schedule and :class:`RunState` (step, every rank's replay buffer and random streams). The model
        part is ``trainable.safetensors`` (the adapters and log Z; every weight under full fine-tuning)
        written by :meth:`_save_trainable`, not the frozen base model; under FSDP / DeepSpeed it is
        Accelerate's own sharded model state."""
        acc = self.accelerator
        path = Path(path)
        if acc.is_main_process:
            ckpt.begin(path)
        acc.wait_for_everyone()
        tmp = ckpt.temp_path(path)
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            info = {"step": self.step, "num_processes": acc.num_processes,
                    "log_z": self.accelerator.unwrap_model(self.policy).log_z_kind, **self.extra_info}
            write_policy_files(tmp, self.model, self.args, self.constraints, info)
            ckpt.commit(path)
        acc.wait_for_everyone()
        return path

    def _save_trainable(self, models, weights, output_dir) -> None:
        """Accelerate's save hook: the trainable parameters only, as ``trainable.safetensors`` (by the
        main process), instead of the whole model's state dict. Sharded runs keep Accelerate's own."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            return
        weights.clear()  # (empty under DeepSpeed, which saves its own model state; ZeRO-2 keeps full weights)
        if self.accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(self.trainable_state(), str(Path(output_dir) / TRAINABLE))

    def _load_trainable(self, models, input_dir) -> None:
        """Accelerate's load hook: read ``trainable.safetensors`` back into the policy (every trainable
        parameter must be there, and nothing else), then tell Accelerate the model is loaded. Under FSDP /
        DeepSpeed Accelerate loads its own model state and passes no model here."""
        if not models:
            return
        from safetensors.torch import load_file

        state = load_file(str(Path(input_dir) / TRAINABLE))
        params = {n: p for n, p in self.accelerator.unwrap_model(self.policy).named_parameters() if p.requires_grad}
        if set(state) != set(params) or any(state[n].shape != params[n].shape for n in params):
            raise DataError(f"'{input_dir}' holds other trainable parameters than this run's (another LoRA or "
                            "model setting): resume with the config that wrote it")
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)
        models.clear()

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore parameters, optimiser, schedule, scaler, buffer, step and every RNG state."""
        path = Path(path)
        if not ckpt.is_complete(path):
            raise DataError(f"'{path}' is not a complete gfnlm checkpoint (no COMPLETE marker): pick another checkpoint")
        info = read_checkpoint_json(path)
        if info.get("num_processes") != self.accelerator.num_processes:
            raise DataError(f"checkpoint was written by {info.get('num_processes')} processes, this run has "
                            f"{self.accelerator.num_processes}: resume with the same number of processes")
        try:
            self.accelerator.load_state(str(path))
        except GFNLMError:
            raise
        except Exception as e:  # a damaged file anywhere in the folder: torch / safetensors / pickle errors
            raise DataError(f"checkpoint '{path}' cannot be loaded ({type(e).__name__}: "
                            f"{first_line(e, default='damaged file')}): resume from another checkpoint or start a new "
                            "run") from None


TRAINABLE = "trainable.safetensors"


def read_checkpoint_json(path: Path) -> dict:
    """``trainer_state.json`` of a checkpoint as a dict, or a one-line :class:`DataError`."""
    try:
        info = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"checkpoint '{path}': trainer_state.json cannot be read ({type(e).__name__}): "
                        "pick another checkpoint") from None
    if not isinstance(info, dict) or not isinstance(info.get("constraints"), dict):
        raise DataError(f"checkpoint '{path}': trainer_state.json is not a gfnlm trainer state: pick another checkpoint")
    return info


class RunState:
    """What an exact resume needs besides Accelerate's own state: the step, and every rank's replay
    buffer, lazily seeded rows and random streams (rows and replay on the CPU, sampling on the
    device). Registered with ``accelerator.register_for_checkpointing``. Accelerate writes registered
    objects from the main process only, so :meth:`state_dict` gathers every rank's part (a collective
    call, made on every rank by ``save_state``) and :meth:`load_state_dict` takes this rank's."""

    def __init__(self, trainer: "GFNTrainer"):
        self.trainer = trainer

    def state_dict(self) -> dict:
        t, c = self.trainer, self.trainer.collector
        mine = {"buffer": c.buffer.state_dict(), "rows": c.fingerprint(), "seeds_used": sorted(c.seeds_used),
                "generator": c.generator.get_state(), "sample_generator": c.sample_generator.get_state()}
        if t.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            ranks = gather_object([mine])
        else:
            ranks = [mine]
        return {"step": t.step, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        t, c = self.trainer, self.trainer.collector
        mine = state["ranks"][t.accelerator.process_index]
        if mine["rows"] != c.fingerprint():
            raise DataError("the checkpoint was written for another dataset (its replay buffer is keyed by row): "
                            "resume with the same rows in the same order, or start a new run")
        c.buffer.load_state_dict(mine["buffer"])
        c.seeds_used = set(mine["seeds_used"])
        c.generator.set_state(mine["generator"])
        c.sample_generator.set_state(mine["sample_generator"])
        t.step = int(state["step"])


def lora_config(args: GFNConfig):
    """The ``peft.LoraConfig`` of the ``lora_*`` fields (dropout off), as the trainers build it."""
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=args.lora_target_modules, task_type="CAUSAL_LM")


def write_policy_files(folder: str | Path, lm, args: GFNConfig, constraints: Constraints, info: dict) -> None:
    """Write what :func:`load_trained` reads into a checkpoint folder being written (see
    :mod:`gfnlm.checkpoint`): ``adapter/`` when ``lm`` is a PeftModel, ``gfnlm_config.yaml`` and
    ``trainer_state.json`` (``info`` plus the ``constraints``)."""
    folder = Path(folder)
    if getattr(lm, "peft_config", None):
        lm.save_pretrained(folder / "adapter")
    args.to_yaml(folder / "gfnlm_config.yaml")
    info = dict(info, constraints={"stop_token_ids": constraints.stop_token_ids,
                                   "min_new_tokens": constraints.min_new_tokens,
                                   "max_new_tokens": constraints.max_new_tokens,
                                   "allowed_token_ids": constraints.allowed_token_ids,
                                   "forbidden_token_ids": constraints.forbidden_token_ids,
                                   "stop_after_tool": constraints.stop_after_tool})
    rule = constraints.prefix_rule
    if rule is not None:  # a rule of gfnlm.patterns is saved as its spec and rebuilt by load_trained
        info["prefix_rule"] = rule.spec() if hasattr(rule, "spec") else {"type": type(rule).__name__}
    (folder / "trainer_state.json").write_text(json.dumps(info, indent=1))


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (the paper's code left it on during GFN training)."""
    names = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        # attention modules copy their rate from the config at init (e.g. Llama's attention_dropout)
        for name in names:
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    cfg = getattr(model, "config", None)
    for name in names:
        if cfg is not None and hasattr(cfg, name) and isinstance(getattr(cfg, name), float):
            setattr(cfg, name, 0.0)


def load_trained(path: str | Path, trainable: bool = False):
    """Load a checkpoint written by :class:`GFNTrainer` (or ``gfnlm sft`` / ``gfnlm rl``).

    Returns ``(model, tokenizer, config, constraints)``; the model is in eval mode. ``trainable``:
    its policy adapter (or weights) can be trained further (e.g. GFlowNet fine-tuning from SFT).
    A missing or damaged file is a one-line :class:`DataError`, never a silently untrained model."""
    from .models import load_model

    path = Path(path)
    if not ckpt.is_complete(path):
        latest = ckpt.latest(path) if path.is_dir() else None
        if latest is None:
            raise DataError(f"'{path}' is not a complete gfnlm checkpoint: pass a checkpoint-<step> folder written by training")
        path = latest
    info = read_checkpoint_json(path)
    try:
        config = GFNConfig.from_yaml(path / "gfnlm_config.yaml")
        constraints = Constraints(**info["constraints"])
    except (GFNLMError, TypeError) as e:
        raise DataError(f"checkpoint '{path}': its config or constraints cannot be read ({first_line(e)}): "
                        "pick another checkpoint") from None
    model, tok = load_model(config.model)
    try:
        if (path / "adapter").is_dir():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path / "adapter"), is_trainable=trainable)
            for extra in sorted((path / "adapter").iterdir()):  # further named adapters (e.g. an EM likelihood model)
                if (extra / "adapter_config.json").is_file():
                    model.load_adapter(str(extra), adapter_name=extra.name)
            model.set_adapter("default")
        elif config.use_peft:
            raise DataError(f"checkpoint '{path}' has no adapter/ folder although it was trained with LoRA: "
                            "pick another checkpoint")
        else:
            _load_full_weights(model, path)
    except GFNLMError:
        raise
    except Exception as e:  # damaged adapter or weight files: peft / safetensors / json errors
        raise DataError(f"checkpoint '{path}': its weights cannot be loaded ({type(e).__name__}: "
                        f"{first_line(e, default='damaged file')}): pick another checkpoint") from None
    model.eval()
    rule = info.get("prefix_rule")
    if isinstance(rule, dict):
        from .patterns import rule_from_spec

        constraints.prefix_rule = rule_from_spec(rule, tok, constraints)
    if rule is not None and constraints.prefix_rule is None:
        raise DataError(f"checkpoint '{path}' was trained under a custom prefix rule ({rule}) that cannot be rebuilt "
                        "from the folder: load it in Python and set constraints.prefix_rule yourself")
    return model, tok, config, constraints


def _load_full_weights(model, path: Path) -> None:
    """The policy weights of a full fine-tuning checkpoint (``trainable.safetensors``, keys ``lm.*``),
    every one of the model's weights required."""
    from safetensors.torch import load_file

    f = path / TRAINABLE
    if not f.is_file():
        raise DataError(f"checkpoint '{path}' has neither adapter/ nor {TRAINABLE}: pick another checkpoint")
    state = {k[len("lm."):]: v for k, v in load_file(str(f)).items() if k.startswith("lm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise DataError(f"checkpoint '{path}': {TRAINABLE} does not match the model {type(model).__name__} "
                        f"(missing {sorted(set(missing) - tied)[:2]}, unexpected {sorted(unexpected)[:2]}): pick another checkpoint")
