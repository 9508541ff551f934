"""The ``gfnlm`` command: ``demo``, ``train``, ``sft``, ``rl``, ``sample``, ``eval``, ``models``.

Errors in the user's input are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import GFNLMError
from .tasks import make_trainer  # noqa: F401  (the command line's trainer builder, defined with the tasks)


def _setup_runtime() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


# --- building blocks used by several commands -------------------------------------------------
# --- commands ---------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    """The task's demo (``--task``, by default the random-integer task): evaluate, train, evaluate, plot."""
    from .tasks import get_task_class

    task_cls = get_task_class(args.task)
    if not hasattr(task_cls, "demo"):
        raise GFNLMError(f"task {args.task} has no demo: run gfnlm train --task {args.task}")
    return task_cls.demo(args)


def cmd_train(args, rest: list[str]) -> int:
    from .config import merge_overrides, parse_overrides, read_yaml
    from .tasks import build_config

    data = merge_overrides(read_yaml(args.config) if args.config else {}, parse_overrides(rest))
    if args.task:
        data["task"] = args.task
    config = build_config(data.get("task"), data)
    task, trainer = make_trainer(config)
    task.train(trainer, args.resume if args.resume not in (None, "latest") else (True if args.resume else None))
    if trainer.accelerator.is_main_process:
        print(f"checkpoint: {Path(config.output_dir) / f'checkpoint-{trainer.step}'}")
    return 0


def cmd_sft(args, rest: list[str]) -> int:
    """Supervised fine-tuning baseline on the task's labelled completions; ``--target reward`` fine-tunes
    a task's reward LM instead (where the task has one); ``--from_proposal K`` distils the task's proposal
    sampler (K of its samples per training prompt) into the policy, a warm start for ``init_from``."""
    from .config import merge_overrides, parse_overrides, read_yaml
    from .sft import proposal_episodes, sft_train
    from .tasks import Task, build_config, get_task_class

    if args.eval_steps < 0:
        raise GFNLMError(f"--eval_steps {args.eval_steps}: use 0 (validation NLL before and after training only) or more")
    if args.from_proposal is not None and args.from_proposal < 1:
        raise GFNLMError(f"--from_proposal {args.from_proposal}: draw at least 1 proposal sample per training prompt")
    if args.soft and args.from_proposal is None:
        raise GFNLMError("--soft distils a proposal sampler's per-step distributions: give --from_proposal K too")
    if args.proposal_prompts is not None and (args.from_proposal is None or args.proposal_prompts < 1):
        raise GFNLMError(f"--proposal_prompts {args.proposal_prompts}: give a positive number, with --from_proposal K")
    data = merge_overrides(read_yaml(args.config) if args.config else {}, parse_overrides(rest))
    if args.task:
        data["task"] = args.task
    if not data.get("task"):
        raise GFNLMError("sft needs a task (e.g. --task arithmetic)")
    cls = get_task_class(data["task"])
    if args.target not in cls.sft_targets:
        raise GFNLMError(f"task {data['task']} fine-tunes --target {' or '.join(cls.sft_targets)}, not {args.target!r}")
    has_proposal = cls.proposal is not Task.proposal
    if args.from_proposal is not None:  # distil the task's proposal sampler: no labelled completions needed
        if not has_proposal:
            raise GFNLMError(f"task {data['task']} has no proposal sampler to distil: drop --from_proposal")
        if args.target != "policy":
            raise GFNLMError("--from_proposal trains the policy: leave out --target")
        if args.eval_steps:
            raise GFNLMError("--eval_steps measures labelled held-out completions, which a distilled proposal has "
                             "none of: drop --eval_steps")
        rows, completions, defaults = None, None, {}
    else:
        try:
            rows, completions, defaults = cls(data.get("task_args")).sft_data(args.target)
        except NotImplementedError:
            fix = ("distil its proposal sampler with --from_proposal K (K samples per training prompt)" if has_proposal
                   else "train it with `gfnlm train` instead")
            raise GFNLMError(f"task {data['task']} has no labelled completions: {fix}") from None
    data = merge_overrides(defaults, data)  # the user's values win over the target's defaults
    data.setdefault("output_dir", f"runs/{data['task']}-sft")
    config = build_config(data["task"], data)
    task, trainer = make_trainer(config, with_rewards=False, dataset=rows)
    if completions is None:  # every process draws the same samples, as each reads the same labelled data
        proposal = task.proposal(trainer.model, trainer.tokenizer, trainer.constraints, config)
        if args.soft and not hasattr(proposal, "step_logits"):
            raise GFNLMError(f"task {data['task']}'s proposal sampler gives no per-step distributions: drop --soft")
        completions = proposal_episodes(trainer, proposal, args.from_proposal, args.proposal_prompts, config.seed)
        what, heldout = f"{len(completions[1])} proposal samples", {}  # no labels to hold out
        if args.soft:
            what += " (soft labels: KL from the proposal's next-action distribution at every state)"
    else:
        completions, skipped = trainer.collector.writable(completions)
        if skipped and trainer.accelerator.is_main_process:
            print(f"sft: {skipped} labelled completions the policy cannot write (length outside "
                  f"{config.min_new_tokens}..{config.max_new_tokens} tokens, or a token that is not an action) left out")
        what = f"{sum(map(len, completions.values()))} labelled completions"
        heldout, _ = trainer.collector.writable(task.heldout_completions(args.target) or {})
    losses = sft_train(trainer, completions, batch_size=args.batch_size, heldout=heldout, eval_steps=args.eval_steps,
                       teacher=proposal if args.soft else None)
    if trainer.accelerator.is_main_process:
        print(f"sft ({args.target}): {len(losses)} steps on {what}, "
              f"{'kl' if args.soft else 'nll'} {losses[0]:.3f} -> {losses[-1]:.3f} nats per episode"
              if losses else "sft: 0 steps")
        if heldout:
            h = json.loads((Path(config.output_dir) / "heldout.json").read_text())
            print(f"held-out nll on {sum(map(len, heldout.values()))} validation completions (never trained on), by step: "
                  + ", ".join(f"{step} {nll:.3f}" for step, nll in h["curve"]))
            print(f"best: step {h['best_step']} ({h['checkpoint'] or 'the model before fine-tuning'})")
        print(f"checkpoint: {Path(config.output_dir) / f'checkpoint-{trainer.step}'}")
    return 0


def cmd_rl(args, rest: list[str]) -> int:
    """RL baseline (TRL's GRPO) with the task's correctness reward, the same action space and tool,
    and the same number of episodes per step as GFlowNet training (prompts_per_step x samples_per_prompt)."""
    from .config import merge_overrides, parse_overrides, read_yaml
    from .models import load_model
    from .rl import grpo_train
    from .tasks import build_config, get_task_class

    data = merge_overrides(read_yaml(args.config) if args.config else {}, parse_overrides(rest))
    if args.task:
        data["task"] = args.task
    data.setdefault("output_dir", f"runs/{data.get('task', 'task')}-rl")
    config = build_config(data.get("task"), data)
    if config.task is None:
        raise GFNLMError("rl needs a task (e.g. --task arithmetic)")
    task = get_task_class(config.task)(config.task_args)
    model, tok = load_model(config.model)
    grpo_train(task, model, tok, config, output_dir=config.output_dir, num_generations=config.samples_per_prompt,
               prompts_per_step=config.prompts_per_step, beta=args.beta,
               report_to=[r for r in config.report_to] or "none", disable_tqdm=config.disable_tqdm)
    print(f"checkpoint: {Path(config.output_dir) / f'checkpoint-{config.max_steps}'}")
    return 0


def sample_columns(rest: list[str]) -> dict[str, str]:
    """``--name TEXT`` pairs after ``gfnlm sample`` (a task's prompt columns, e.g. --beginning, --ending)."""
    if len(rest) % 2 or not all(k.startswith("--") and len(k) > 2 for k in rest[::2]):
        raise GFNLMError(f"sample takes --name TEXT pairs after its options, not {' '.join(rest)!r}")
    return {k[2:]: v for k, v in zip(rest[::2], rest[1::2])}


def cmd_sample(args, rest: list[str] | None = None) -> int:
    import torch

    from .data import render_prompt
    from .evaluation import sample_completions
    from .trainer import load_trained

    model, tok, config, cons = load_trained(args.checkpoint)
    columns = sample_columns(rest or [])
    task = None
    if config.task:
        from .tasks import get_task_class

        task = get_task_class(config.task)(config.task_args)
    prompt = args.prompt
    fields = task.prompt_fields if task is not None else ()
    unknown = [k for k in columns if k not in fields]
    if unknown:
        raise GFNLMError(f"unrecognized arguments: {' '.join('--' + k for k in unknown)}"
                         + (f" (this checkpoint's task takes {', '.join('--' + f for f in fields)})" if fields else ""))
    if columns:
        if prompt is not None:
            raise GFNLMError(f"give --prompt or the task's fields ({', '.join('--' + k for k in columns)}), not both")
        if task is None:
            raise GFNLMError("the checkpoint has no task to build a prompt from those fields: pass --prompt TEXT")
        prompt = task.prompt_of(columns)
    if prompt is None:
        if task is None:
            raise GFNLMError("no --prompt given and the checkpoint has no task: pass --prompt TEXT")
        prompt = task.dataset()[0]["prompt"]
    ids = render_prompt(tok, prompt, config.chat_template)
    with torch.no_grad():
        texts = sample_completions(model, tok, ids, cons, args.n, temperature=args.temperature, seed=args.seed)
    for t in texts:
        t = task.completion_text(t) if task is not None else t
        print(json.dumps(t, ensure_ascii=False) if args.json else t)
    return 0


def cmd_eval(args, rest: list[str] | None = None) -> int:
    """``gfnlm eval``: the task (``--task``, or the checkpoint's) runs its own evaluation entry
    (:meth:`gfnlm.tasks.Task.eval_command`)."""
    from .config import parse_overrides
    from .tasks import get_task_class

    extra = parse_overrides(rest or [])
    if set(extra) - {"task_args"}:
        raise GFNLMError(f"eval takes only --task_args.<name> overrides, not {sorted(set(extra) - {'task_args'})}")
    args.checkpoints = args.checkpoint or []
    name = args.task or (_task_of(args.checkpoints[0]) if args.checkpoints else None)
    if name is None:
        raise GFNLMError("the checkpoint names no task: pass --task")
    cls = get_task_class(name)
    if len(args.checkpoints) > 1 and not getattr(cls, "several_checkpoints", False):
        raise GFNLMError(f"give one --checkpoint (task {name} evaluates one policy)")
    args.checkpoint = args.checkpoints[0] if args.checkpoints else None
    return cls.eval_command(args, extra)


def _task_of(checkpoint: str) -> str | None:
    from . import checkpoint as ckpt
    from .config import GFNConfig

    path = Path(checkpoint)
    path = path if ckpt.is_complete(path) else (ckpt.latest(path) or path)
    cfg = path / "gfnlm_config.yaml"
    return GFNConfig.from_yaml(cfg).task if cfg.is_file() else None


def cmd_models(args) -> int:
    from .models import EMBEDDED_MODELS, cache_dir

    for name, m in EMBEDDED_MODELS.items():
        print(f"{name}: {getattr(m, 'description', '')} (package {getattr(m, 'package', '?')})")
    print(f"cache: {cache_dir()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import GFNConfig

    p = argparse.ArgumentParser(prog="gfnlm", description="GFlowNet fine-tuning of language models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train the embedded model to sample integers 0..100 uniformly (offline)")
    d.add_argument("--output_dir", default="runs/demo")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the rng task's)")
    d.add_argument("--eval_samples", type=int, default=4096)
    d.add_argument("--task", default="rng", help="the task whose demo runs (default: rng, uniform random integers)")

    fields = "\n".join(f"  --{f.name}: {f.metadata.get('help', '')}" for f in __import__("dataclasses").fields(GFNConfig))
    t = sub.add_parser("train", help="train from a YAML config plus --field value overrides",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config fields (YAML keys or --field value overrides):\n" + fields)
    t.add_argument("--config", default=None, help="YAML file of GFNConfig fields")
    t.add_argument("--task", default=None, help="task name (rng) or module:Class")
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint folder, or the latest in output_dir")

    s = sub.add_parser("sample", help="sample completions from a trained checkpoint (--prompt TEXT, or the task's "
                       "fields, e.g. infilling: --beginning TEXT --ending TEXT)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt", default=None)
    s.add_argument("-n", type=int, default=8)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print each completion as a JSON string")

    e = sub.add_parser("eval", help="evaluate a checkpoint (or a base model) on a task")
    e.add_argument("--task", default=None)
    e.add_argument("--checkpoint", action="append", default=None,
                   help="a trained checkpoint (subjectivity: one per training-set size, repeat the flag)")
    e.add_argument("--model", default="smollm2-135m", help="base model to evaluate when no --checkpoint")
    e.add_argument("-n", type=int, default=None, help="samples (rng), questions per test set (arithmetic) or test stories (infilling); default: the task's")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--plot", default=None, help="write a histogram PNG here")
    e.add_argument("--output", default=None, help="write the metrics JSON here")
    e.add_argument("--shots", default="0,3,5,10,20", help="arithmetic: k of the k-shot CoT rows")
    e.add_argument("--sft_checkpoint", default=None, help="arithmetic, infilling: a `gfnlm sft` checkpoint for the SFT row")
    e.add_argument("--sizes", default="10,20,50", help="subjectivity without --checkpoint: training-set sizes")
    e.add_argument("--rl_checkpoint", default=None, help="arithmetic: a `gfnlm rl` checkpoint for the RL (TRL) row")
    e.add_argument("--diagnostics", type=int, default=16,
                   help="sampler diagnostics (ELBO, IW bound, ESS, Var(log R - log q)) on this many samples per prompt; 0: off")
    e.add_argument("--diagnostics_prompts", type=int, default=8,
                   help="the sampler diagnostics' evaluation prompts (test rows: questions, stories, prompts)")

    f = sub.add_parser("sft", help="supervised fine-tuning on the task's labelled completions, or on its proposal sampler's samples (--from_proposal)")
    f.add_argument("--config", default=None, help="YAML file of GFNConfig fields")
    f.add_argument("--task", default=None)
    f.add_argument("--batch_size", type=int, default=8)
    f.add_argument("--eval_steps", type=int, default=0,
                   help="measure the NLL of the task's validation split every this many steps too (before the first "
                        "and after the last always), keeping the checkpoint of the best step (early stopping); 0: no others")
    f.add_argument("--from_proposal", type=int, default=None, metavar="K",
                   help="distil the task's proposal sampler (contrastive: the token-level sampler on the base model) "
                        "instead of labelled completions: K samples per training prompt; a warm start for "
                        "`gfnlm train ... init_from=<checkpoint>`")
    f.add_argument("--soft", action="store_true",
                   help="with --from_proposal: soft labels, the KL from the proposal's next-action distribution at "
                        "every state of its samples instead of their likelihood (contrastive: the token-level sampler's)")
    f.add_argument("--proposal_prompts", type=int, default=None, metavar="P",
                   help="with --from_proposal: only the first P training prompts (default: all)")
    f.add_argument("--target", default="policy",
                   help="policy (default), or reward: fine-tune the task's reward LM (infilling) by maximum likelihood")

    r = sub.add_parser("rl", help="RL baseline: GRPO through TRL with the task's correct-answer reward")
    r.add_argument("--config", default=None, help="YAML file of GFNConfig fields")
    r.add_argument("--task", default=None)
    r.add_argument("--beta", type=float, default=0.0, help="KL coefficient towards the base model")

    sub.add_parser("models", help="list the embedded models")
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_runtime()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "eval", "sft", "rl", "sample"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "train":
            return cmd_train(args, rest)
        if args.command == "sft":
            return cmd_sft(args, rest)
        if args.command == "rl":
            return cmd_rl(args, rest)
        if args.command == "sample":
            return cmd_sample(args, rest)
        if args.command == "eval":
            if not args.task and not args.checkpoint:
                raise GFNLMError("eval needs --task (e.g. --task rng) and/or --checkpoint DIR")
            return cmd_eval(args, rest)
        if args.command == "models":
            return cmd_models(args)
    except GFNLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
