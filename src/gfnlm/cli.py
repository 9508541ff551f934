"""The ``gfnlm`` command: ``demo``, ``train``, ``sft``, ``rl``, ``sample``, ``eval``, ``models``.

Errors in the user's input are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import GFNLMError


def _setup_runtime() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


# --- building blocks used by several commands -------------------------------------------------
def make_trainer(config, model=None, tokenizer=None, with_rewards: bool = True):
    """Task + model + trainer from a config (``config.task`` must be set, or ``config.dataset``).

    The policy is wrapped (LoRA) before the task builds its rewards, so an LM reward holds the
    wrapped model and reads its base through :class:`gfnlm.policy.BaseLM`. ``with_rewards=False``
    (supervised fine-tuning) builds no reward: the trainer's reward then refuses to run."""
    from .models import load_model
    from .policy import wrap_policy
    from .rewards import NoReward
    from .tasks import get_task_class
    from .trainer import GFNTrainer, lora_config

    if config.task is None:
        raise GFNLMError("the command line needs a task (e.g. --task rng); custom rewards are set up from Python")
    task = get_task_class(config.task)(config.task_args)
    if model is None and config.init_from:
        from .trainer import load_trained

        model, tokenizer, start, _ = load_trained(config.init_from, trainable=True)
        if start.model != config.model:
            raise GFNLMError(f"init_from {config.init_from} was trained on {start.model}, not {config.model}: "
                             "set --model to match")
    if model is None:
        model, tokenizer = load_model(config.model)
    model = wrap_policy(model, config.use_peft, None, lambda: lora_config(config), config.seed)  # before any reward holds it
    constraints = task.constraints(config, tokenizer)
    rewards = task.reward_funcs(model, tokenizer, constraints, config) if with_rewards else [NoReward()]
    dataset = config.dataset or task.dataset()
    trainer = GFNTrainer(model, rewards, config, train_dataset=dataset, processing_class=tokenizer,
                         constraints=constraints, sample_metrics=task.sample_metrics(), tool=task.tool())
    task.prepare_trainer(trainer)
    return task, trainer


def format_table(rows: list[dict], columns: list[str], labels: list[str]) -> str:
    """A markdown table: one row per metric, one column per result."""
    head = "| metric | " + " | ".join(labels) + " |"
    sep = "|---|" + "---|" * len(labels)
    lines = [head, sep]
    for c in columns:
        vals = []
        for r in rows:
            v = r.get(c)
            vals.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"| {c} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


RNG_COLUMNS = ["valid_fraction", "distinct", "tv_to_uniform", "exact_tv_to_uniform", "kl_to_uniform", "exact_valid_mass"]


def _summary(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "exact_probs"}


# --- commands ---------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    """Uniform random integers on the embedded model: evaluate, train, evaluate, plot."""
    import torch

    from .models import load_model
    from .sampling import Constraints
    from .tasks import build_config
    from .tasks.rng import plot_histograms
    from .trainer import resolve_token_ids

    overrides = {"output_dir": args.output_dir, "model": args.model}
    if args.steps is not None:
        overrides["max_steps"] = args.steps
    config = build_config("rng", overrides)
    n = args.eval_samples
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"[gfnlm demo] loading {config.model} ...", flush=True)
    model, tok = load_model(config.model)
    task, trainer = make_trainer(config, model, tok)
    cons = trainer.constraints
    free = Constraints(stop_token_ids=resolve_token_ids(tok, ["eos"], "stop"), min_new_tokens=1, max_new_tokens=6)
    results = {}
    print(f"[gfnlm demo] base model, free sampling ({n} samples) ...", flush=True)
    with torch.no_grad():
        results["base (free)"] = task.evaluate(trainer.model, tok, config, free, n=n, seed=1, progress=True, desc="base free")
        print(f"[gfnlm demo] base model, digits-only sampler ({n} samples) ...", flush=True)
        results["base (digits)"] = task.evaluate(trainer.model, tok, config, cons, n=n, seed=2, progress=True,
                                                 desc="base digits")
    print(f"[gfnlm demo] GFlowNet fine-tuning, {config.max_steps} steps ...", flush=True)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    print(f"[gfnlm demo] trained model ({n} samples) ...", flush=True)
    with torch.no_grad():
        results["GFN fine-tuned"] = task.evaluate(trainer.model, tok, config, cons, n=n, seed=3, progress=True,
                                                  desc="trained")
    labels = list(results)
    table = format_table([results[k] for k in labels], RNG_COLUMNS, labels)
    png = plot_histograms(results, out / "histogram.png", title=f"{config.model}: '{task.args.prompt}'")
    total_s = time.perf_counter() - t_start
    metrics = {
        "model": config.model,
        "eval_samples": n,
        "train_steps": config.max_steps,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(total_s, 1),
        "base_free": _summary(results["base (free)"]),
        "base": _summary(results["base (digits)"]),
        "trained": _summary(results["GFN fine-tuned"]),
        "exact_probs": {k: r["exact_probs"] for k, r in results.items()},
        "checkpoint": str(out / f"checkpoint-{config.max_steps}"),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print()
    print(table)
    print()
    print("base (free): the base model as it is (any token, stop = EOS, at most 6 tokens).")
    print("base (digits) and GFN fine-tuned: the task's sampler (digit tokens and EOS, at most 3 tokens).")
    print("target: valid >= 0.99 and tv_to_uniform <= 0.08 at 4096 samples; TV over 101 integers + invalid.")
    print(f"wrote {out / 'metrics.json'}, {png}, TensorBoard logs under {out}; "
          f"training {train_s:.0f} s, total {total_s:.0f} s")
    return 0


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
    """Supervised fine-tuning baseline on the task's labelled completions."""
    from .config import merge_overrides, parse_overrides, read_yaml
    from .sft import sft_train
    from .tasks import build_config

    data = merge_overrides(read_yaml(args.config) if args.config else {}, parse_overrides(rest))
    if args.task:
        data["task"] = args.task
    data.setdefault("output_dir", f"runs/{data.get('task', 'task')}-sft")
    config = build_config(data.get("task"), data)
    task, trainer = make_trainer(config, with_rewards=False)
    losses = sft_train(trainer, task.supervised_completions(), batch_size=args.batch_size)
    if trainer.accelerator.is_main_process:
        print(f"sft: {len(losses)} steps, nll {losses[0]:.3f} -> {losses[-1]:.3f} nats per episode" if losses else "sft: 0 steps")
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


def cmd_sample(args) -> int:
    import torch

    from .data import render_prompt
    from .evaluation import sample_completions
    from .trainer import load_trained

    model, tok, config, cons = load_trained(args.checkpoint)
    prompt = args.prompt
    if prompt is None:
        if config.task:
            from .tasks import get_task_class

            rows = get_task_class(config.task)(config.task_args).dataset()
            prompt = rows[0]["prompt"]
        else:
            raise GFNLMError("no --prompt given and the checkpoint has no task: pass --prompt TEXT")
    ids = render_prompt(tok, prompt, config.chat_template)
    with torch.no_grad():
        texts = sample_completions(model, tok, ids, cons, args.n, temperature=args.temperature, seed=args.seed)
    for t in texts:
        print(json.dumps(t, ensure_ascii=False) if args.json else t)
    return 0


def cmd_eval(args, rest: list[str] | None = None) -> int:
    import torch

    from .models import load_model
    from .tasks import build_config, get_task_class
    from .trainer import load_trained

    from .config import parse_overrides

    extra = parse_overrides(rest or [])
    if set(extra) - {"task_args"}:
        raise GFNLMError(f"eval takes only --task_args.<name> overrides, not {sorted(set(extra) - {'task_args'})}")
    checkpoints = args.checkpoint or []
    if args.task == "subjectivity" or (checkpoints and not args.task and _task_of(checkpoints[0]) == "subjectivity"):
        return _eval_subjectivity(args, checkpoints, extra)
    if len(checkpoints) > 1:
        raise GFNLMError("give one --checkpoint (several are for --task subjectivity, one per training-set size)")
    args.checkpoint = checkpoints[0] if checkpoints else None
    if args.checkpoint:
        model, tok, config, cons = load_trained(args.checkpoint)
        task_name = args.task or config.task
        task = get_task_class(task_name)({**(config.task_args if task_name == config.task else {}),
                                          **extra.get("task_args", {})})
    else:
        config = build_config(args.task, {"model": args.model, **extra})
        model, tok = load_model(config.model)
        task = get_task_class(args.task)(config.task_args)
        cons = task.constraints(config, tok)
    if task.name == "arithmetic":
        return _eval_arithmetic(args, task, model, tok, config, cons)
    with torch.no_grad():
        r = task.evaluate(model, tok, config, cons, n=args.n, seed=args.seed, progress=True)
    label = args.checkpoint or config.model
    if args.task == "rng" or task.name == "rng":
        print(format_table([r], RNG_COLUMNS, [label]))
        if args.plot:
            from .tasks.rng import plot_histograms

            print(f"wrote {plot_histograms({label: r}, args.plot)}")
    else:
        print(json.dumps(_summary(r), indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(r, indent=1))
    return 0


def _eval_arithmetic(args, task, model, tok, config, cons) -> int:
    """Table 4 of the paper: vote accuracy (greedy in brackets) per operand count and method."""
    import torch

    from .rewards import base_model
    from .tasks.arithmetic import table4
    from .trainer import load_trained

    shots = [int(k) for k in args.shots.split(",") if k.strip()]
    rows: list[tuple[str, list[dict]]] = []

    with base_model(model) as base:
        for k in shots:
            with torch.no_grad():
                rows.append((f"k-shot CoT, k = {k}", [task.evaluate(base, tok, config, cons, n=args.n, seed=args.seed,
                                                                    progress=True, context_shots=k)]))
    for name, path in (("Supervised fine-tuning", args.sft_checkpoint), ("RL (TRL GRPO)", args.rl_checkpoint)):
        if path:
            with torch.no_grad():
                rows.append((name, [task.evaluate(load_trained(path)[0], tok, config, cons, n=args.n, seed=args.seed,
                                                  progress=True)]))
    if args.checkpoint:
        with torch.no_grad():
            rows.append(("GFlowNet fine-tuning", [task.evaluate(model, tok, config, cons, n=args.n, seed=args.seed,
                                                                progress=True)]))
    print(table4(rows))
    first = rows[0][1][0] if rows else {}
    for label, r in first.items():
        print(f"{label} operands: {r['questions']} questions evaluated; {r['removed_as_in_training']} test questions "
              "removed because they occur in a training file")
    print("accuracy in %: majority vote over task_args.vote_samples rationales at task_args.vote_temperature "
          "(greedy in brackets)")
    if args.output:
        Path(args.output).write_text(json.dumps({name: r[0] for name, r in rows}, indent=1))
    return 0


def _task_of(checkpoint: str) -> str | None:
    from . import checkpoint as ckpt
    from .config import GFNConfig

    path = Path(checkpoint)
    path = path if ckpt.is_complete(path) else (ckpt.latest(path) or path)
    cfg = path / "gfnlm_config.yaml"
    return GFNConfig.from_yaml(cfg).task if cfg.is_file() else None


def _eval_subjectivity(args, checkpoints: list[str], extra: dict) -> int:
    """Accuracy per method and training-set size: zero-shot, few-shot, SFT classifier (base model),
    and E-step only / E+M for each EM checkpoint (its size from its task_args.train_size)."""
    import torch

    from .models import load_model
    from .tasks import build_config
    from .tasks.subjectivity import SubjectivityTask, results_table
    from .trainer import load_trained

    rows: dict[str, dict[str, str]] = {}
    results: dict = {}
    sizes: list[int] = []
    config = build_config("subjectivity", {"model": args.model, **extra})
    for path in checkpoints:
        model, tok, cfg, cons = load_trained(path)
        task = SubjectivityTask({**cfg.task_args, **extra.get("task_args", {})})
        size = task.args.train_size
        sizes.append(size)
        config = cfg
        with torch.no_grad():
            r = task.evaluate(model, tok, cfg, cons, n=args.n, seed=args.seed, progress=True)
        results[f"EM {size}"] = r
        for name in ("E-step only", "E+M"):
            if name in r:
                rows.setdefault(name, {})[str(size)] = (f"{100 * r[name]['vote_accuracy']:.1f} "
                                                        f"({100 * r[name]['greedy_accuracy']:.1f})")
    if not sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    task = SubjectivityTask({**config.task_args, **extra.get("task_args", {})})
    base, tok = load_model(config.model)
    base_res = task.evaluate_baselines(base, tok, sizes, n=args.n, seed=args.seed, progress=True)
    results["baselines"] = base_res
    rows = {**{m: {s: f"{100 * v:.1f}" for s, v in r.items()} for m, r in base_res.items()}, **rows}
    print(results_table(rows, [str(s) for s in sizes]))
    val, excluded = task.validation()
    print(f"{min(len(val), args.n or len(val))} validation sentences (a fixed split of {task.args.pool_file}; "
          f"{excluded} training sentences excluded); accuracy in %; E rows: vote over "
          f"{task.args.vote_samples} rationales at T = {task.args.vote_temperature} (greedy rationale in brackets)")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


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

    fields = "\n".join(f"  --{f.name}: {f.metadata.get('help', '')}" for f in __import__("dataclasses").fields(GFNConfig))
    t = sub.add_parser("train", help="train from a YAML config plus --field value overrides",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config fields (YAML keys or --field value overrides):\n" + fields)
    t.add_argument("--config", default=None, help="YAML file of GFNConfig fields")
    t.add_argument("--task", default=None, help="task name (rng) or module:Class")
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint folder, or the latest in output_dir")

    s = sub.add_parser("sample", help="sample completions from a trained checkpoint")
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
    e.add_argument("-n", type=int, default=None, help="samples (rng) or questions per test set (arithmetic); default: the task's")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--plot", default=None, help="write a histogram PNG here")
    e.add_argument("--output", default=None, help="write the metrics JSON here")
    e.add_argument("--shots", default="0,3,5,10,20", help="arithmetic: k of the k-shot CoT rows")
    e.add_argument("--sft_checkpoint", default=None, help="arithmetic: a `gfnlm sft` checkpoint for the SFT row")
    e.add_argument("--sizes", default="10,20,50", help="subjectivity without --checkpoint: training-set sizes")
    e.add_argument("--rl_checkpoint", default=None, help="arithmetic: a `gfnlm rl` checkpoint for the RL (TRL) row")

    f = sub.add_parser("sft", help="supervised fine-tuning baseline on the task's labelled completions")
    f.add_argument("--config", default=None, help="YAML file of GFNConfig fields")
    f.add_argument("--task", default=None)
    f.add_argument("--batch_size", type=int, default=8)

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
    if rest and args.command not in ("train", "eval", "sft", "rl"):
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
            return cmd_sample(args)
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
