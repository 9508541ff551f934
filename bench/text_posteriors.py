"""The text posteriors on the embedded model: next-sentence continuation (the paper's Figure 3) and
the contrastive posterior.

Every method gets the same model (SmolLM2-135M-Instruct by default), the same split of
``../shared/data/openwebtext/prompts.txt`` (50 validation prompts, 950 training prompts, seed 0), the
same action space (one sentence of 1-24 legal tokens, ended by the stop action ".") and is evaluated
on the same validation prompts (``--prompts``), never trained on.

``--task continuation``, target p̃(Z "." | X)^(1/T) with T annealed 1.0 -> ``--t_end``:

* baselines: the base model through transformers' ``generate`` under the same constraint: greedy,
  beam search (n and 5n beams, n returned), diverse beam search (n and 5n beams in n groups, penalty
  1.0, the best of each group; n beams in n groups is diverse greedy), nucleus p = 0.95, plain
  sampling and tempered sampling at the final reward temperature, each sampler at n and 5n samples
  per prompt;
* diverse: only the diverse beam search rows (to add them to an earlier baselines run);
* gfn: GFlowNet fine-tuning (modified SubTB, LoRA) from the base model, n samples per prompt.

Per method: max and mean log p̃(Z "." | X) over the samples of a prompt, diversity (1 - mean pairwise
cosine of all-MiniLM-L6-v2 embeddings), length; averaged over prompts; diagnostics against
p̃^(1/T_end) for every sampler with a tractable q.

``--task contrastive``, target p̃(Z "." | X)^a p̃(Z "." | U)^b (``--a`` 1.5, ``--b`` -0.5):

* baselines (base model, ``generate``, same constraint): plain and tempered (T = 0.8) sampling from
  p(Z|X); best-of-2n and best-of-5n reranking by R (n kept); the token-level contrastive sampler
  (classifier-free guidance, exact log q);
* gfn: GFlowNet fine-tuning from the base model towards R;
* smc: SMC with genlm-control on R (the reward's two terms), ``--smc_particles`` particles per prompt
  (default n), n samples resampled, with its log Ẑ;
* distil: the token-level sampler distilled into the policy (LoRA, maximum likelihood of
  ``--distil_samples`` of its samples for each of ``--distil_prompts`` training prompts, ``gfnlm sft
  --from_proposal``), or with ``--distil_soft`` the KL from its next-action distribution at every state of
  those samples (soft labels, ``gfnlm sft --from_proposal K --soft``), evaluated as a sampler;
  ``--distil_init`` continues an earlier distillation from its checkpoint, on fresh samples drawn with
  ``--distil_seed``; a GFlowNet run starts from its checkpoint with
  ``--gfn_set init_from=runs/bench-contrastive/distil/checkpoint-<steps>``.

Per method: mean log R, mean PMI, mean log p(Z|X), diversity, length, LM token evaluations per
prompt, and the ELBO on R (with the IW bound, ESS, Var) for every sampler with a tractable q.

Each run writes ``<out>/<task>/<method>.json``; ``--report`` writes ``<out>/<task>.md``, ``.json`` and
the plot ``<task>.png``.

    .venv/bin/python bench/text_posteriors.py --task continuation --methods gfn,baselines
    .venv/bin/python bench/text_posteriors.py --task contrastive --methods gfn,baselines
    .venv/bin/python bench/text_posteriors.py --task continuation --report
    .venv/bin/python bench/text_posteriors.py --task contrastive --methods gfn --variant "log_z none" \
        --gfn_set log_z=none     # another GFlowNet row beside the default one
    .venv/bin/python bench/text_posteriors.py --task contrastive --methods baselines --baselines token_level \
        --samples 32 --variant "token-level, 32 samples"   # one baseline with more samples: a tighter ELBO
    .venv/bin/python bench/text_posteriors.py --task contrastive --methods gfn --samples 32 \
        --eval_checkpoint runs/bench-contrastive/gfn/checkpoint-100 --variant "32 samples"   # the same, trained run

Every ELBO is reported with its standard error from the evaluation's sampling (``elbo_se`` of
:func:`gfnlm.diagnostics.sampler_diagnostics`); a target "higher ELBO" is met only by a difference of
more than two standard errors (:func:`gfnlm.diagnostics.elbo_difference`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("continuation", "contrastive")
METHODS = ["baselines", "diverse", "gfn", "smc", "distil"]
SAMPLERS = ("nucleus", "sampling", "tempered")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--methods", default="gfn,baselines", help=f"comma-separated subset of {METHODS}")
    p.add_argument("--report", action="store_true", help="only combine the per-run results into the table")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=50, help="validation prompts evaluated")
    p.add_argument("--samples", type=int, default=8, help="n: samples per prompt")
    p.add_argument("--steps", type=int, default=None, help="GFlowNet optimiser steps (default 120 continuation, 100 contrastive)")
    p.add_argument("--gfn_lr", type=float, default=3e-4)
    p.add_argument("--t_end", type=float, default=0.8, help="continuation: final reward temperature")
    p.add_argument("--a", type=float, default=1.5, help="contrastive: exponent of p(Z|X)")
    p.add_argument("--b", type=float, default=-0.5, help="contrastive: exponent of p(Z)")
    p.add_argument("--gfn_set", action="extend", nargs="+", default=[],
                   help="extra GFNConfig fields for the GFlowNet run, name=value (one or more, flag repeatable)")
    p.add_argument("--eval_checkpoint", default=None, help="gfn: evaluate this finished run's checkpoint-<step> folder "
                   "instead of training (its history.json is read from the run folder; e.g. after a crash in evaluation)")
    p.add_argument("--variant", default="", help="a label for a run with other settings (e.g. 'log_z none'), with one "
                   "method: its file is <method>-<variant>.json, beside the default run's; a gfn row is 'GFlowNet "
                   "fine-tuning (<variant>)' (baseline rows keep their names, which carry n)")
    p.add_argument("--baselines", default=None, help="the baselines method's samplers, comma-separated (default: "
                   "contrastive sampling,tempered,best_of,token_level; continuation the task's default set); with a "
                   "subset, give a --variant so the run does not replace the full baselines file")
    p.add_argument("--distil_prompts", type=int, default=800, help="contrastive distil: training prompts sampled")
    p.add_argument("--distil_samples", type=int, default=1, help="contrastive distil: proposal samples per prompt")
    p.add_argument("--distil_steps", type=int, default=200, help="contrastive distil: SFT steps of 16 episodes")
    p.add_argument("--distil_lr", type=float, default=5e-4)
    p.add_argument("--distil_soft", action="store_true",
                   help="contrastive distil: soft labels (KL from the token-level sampler's next-action distribution "
                        "at every state of its samples, `gfnlm sft --from_proposal K --soft`) instead of their likelihood")
    p.add_argument("--distil_init", default=None,
                   help="contrastive distil: start from this checkpoint (an earlier distillation, `init_from`)")
    p.add_argument("--distil_seed", type=int, default=None,
                   help="contrastive distil: seed of the proposal samples (default --seed); a continued "
                        "distillation draws fresh ones with another")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smc_particles", type=int, default=0, help="contrastive smc: particles per prompt (0: n)")
    p.add_argument("--data_file", default=str(ROOT.parent / "shared" / "data" / "openwebtext" / "prompts.txt"))
    p.add_argument("--run_dir", default=None, help="default: runs/bench-<task>")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.variant and not args.report and len([m for m in args.methods.split(",") if m.strip()]) != 1:
        p.error("--variant labels one run: use it with one method (--methods gfn, or --methods baselines)")
    if args.eval_checkpoint and args.samples != p.get_default("samples") and not args.variant:
        p.error(f"--eval_checkpoint with --samples other than {p.get_default('samples')}: give a --variant so its "
                "row and file are its own")
    args.steps = args.steps or {"continuation": 120, "contrastive": 100}[args.task]
    args.run_dir = args.run_dir or str(ROOT / "runs" / f"bench-{args.task}")
    if args.variant:
        from common import slug

        args.run_dir = f"{args.run_dir}-{slug(args.variant)}"
    return args


def build(args, method: str):
    import yaml

    from gfnlm.tasks import build_config

    name = method if args.seed == 0 else f"{method}-seed{args.seed}"
    data = {"model": args.model, "seed": args.seed, "report_to": [], "output_dir": f"{args.run_dir}/{name}",
            "task_args": {"data_file": args.data_file, "eval_samples": args.samples, "eval_prompts": args.prompts}}
    if args.task == "continuation":
        data["reward_temperature_end"] = args.t_end
        if method == "diverse":
            data["task_args"]["baselines"] = "diverse_beam"
    else:
        data["task_args"].update(a=args.a, b=args.b)
        if method in ("baselines", "smc"):  # SMC is its own run
            data["task_args"]["baselines"] = "smc" if method == "smc" else "sampling,tempered,best_of,token_level"
            data["task_args"]["smc_particles"] = args.smc_particles
    if method == "baselines" and args.baselines:  # a chosen subset, either task
        data["task_args"]["baselines"] = args.baselines
    if method == "distil":
        data.update({"max_steps": args.distil_steps, "learning_rate": args.distil_lr, "warmup_steps": 10,
                     "lr_scheduler_type": "cosine", **({"init_from": args.distil_init} if args.distil_init else {})})
    if method == "gfn":
        data.update({"max_steps": args.steps, "learning_rate": args.gfn_lr, "warmup_steps": 10,
                     **({"reward_temperature_horizon": args.steps} if args.task == "continuation" else {}),
                     **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.gfn_set)}})
    return build_config(args.task, data)


def run_method(method: str, args) -> dict:
    import torch

    from gfnlm.models import load_model
    from gfnlm.tasks import get_task_class, make_trainer

    t0 = time.perf_counter()
    info: dict = {}
    config = build(args, method)
    if method == "smc" and args.task != "contrastive":
        raise SystemExit("smc: only --task contrastive has an SMC baseline")
    if method == "diverse" and args.task != "continuation":
        raise SystemExit("diverse: only --task continuation has diverse beam search rows")
    if method in ("baselines", "diverse", "smc"):
        model, tok = load_model(config.model)
        task = get_task_class(args.task)(config.task_args)
        with torch.no_grad():
            result = task.evaluate(None, tok, config, task.constraints(config, tok), n=args.prompts, seed=args.seed,
                                   progress=True, base=model)
    elif method == "gfn":
        if args.eval_checkpoint:  # a run trained earlier: its saved config, policy and history
            from gfnlm.trainer import load_trained, read_checkpoint_json

            ckpt = Path(args.eval_checkpoint)
            model, tok, config, cons = load_trained(ckpt)
            task = get_task_class(args.task)({**config.task_args, "eval_samples": args.samples})  # n of this evaluation
            info["history"] = json.loads((ckpt.parent / "history.json").read_text())
            info["evaluated_checkpoint"] = str(ckpt)
            step = read_checkpoint_json(ckpt)["step"]
            if step != config.max_steps:
                raise SystemExit(f"{ckpt} is step {step} of a {config.max_steps}-step run: evaluate the run's last checkpoint")
        else:
            task, trainer = make_trainer(config)
            t1 = time.perf_counter()
            trainer.train()
            info["history"] = trainer.history
            info.update(setup_seconds=round(t1 - t0, 1), train_seconds=round(time.perf_counter() - t1, 1))
            model, tok, cons = trainer.model, trainer.tokenizer, trainer.constraints
        info.update({"steps": config.max_steps, "episodes_per_step": config.samples_per_prompt * config.prompts_per_step,
                     "loss": config.loss_type, "learning_rate": config.learning_rate,
                     "reward_temperature": [config.reward_temperature, config.reward_temperature_end],
                     **({k: config.task_args[k] for k in ("a", "b")} if args.task == "contrastive" else {})})
        model.eval()
        with torch.no_grad():
            result = task.evaluate(model, tok, config, cons, n=args.prompts, seed=args.seed, progress=True,
                                   baselines=False)
        if args.variant:
            result["methods"] = {f"{k} ({args.variant})": v for k, v in result["methods"].items()}
    elif method == "distil":  # the token-level sampler distilled into the policy: a warm start for gfn (init_from)
        from gfnlm.sft import proposal_episodes, sft_train

        if args.task != "contrastive":
            raise SystemExit("distil: only --task contrastive has a proposal sampler (the token-level one)")
        task, trainer = make_trainer(config, with_rewards=False)
        t_sample = time.perf_counter()  # sampling time without the set-up
        proposal = task.proposal(trainer.model, trainer.tokenizer, trainer.constraints, config)
        sample_seed = args.seed if args.distil_seed is None else args.distil_seed
        episodes = proposal_episodes(trainer, proposal, args.distil_samples, args.distil_prompts, seed=sample_seed)
        t1 = time.perf_counter()
        losses = sft_train(trainer, episodes, batch_size=16, teacher=proposal if args.distil_soft else None)
        loss_name = "kl" if args.distil_soft else "nll"
        info.update(sample_seconds=round(t1 - t_sample, 1), train_seconds=round(time.perf_counter() - t1, 1),
                    episodes=len(episodes[1]), steps=len(losses), batch=16, learning_rate=config.learning_rate,
                    soft_labels=args.distil_soft, sample_seed=sample_seed, init_from=config.init_from,
                    **{f"{loss_name}_first": losses[0], f"{loss_name}_last": losses[-1]},
                    checkpoint=str(Path(config.output_dir) / f"checkpoint-{trainer.step}"))
        model = trainer.model
        model.eval()
        with torch.no_grad():
            result = task.evaluate(model, trainer.tokenizer, config, trainer.constraints, n=args.prompts,
                                   seed=args.seed, progress=True, baselines=False)
        label = "KL distillation of the token-level sampler" if args.distil_soft else "SFT on token-level samples"
        result["methods"] = {label + (f" ({args.variant})" if args.variant else ""): v
                             for v in result["methods"].values()}
    else:
        raise SystemExit(f"unknown method {method!r}: choose from {METHODS}")
    return {"method": method, "result": result, "info": info, "seconds": round(time.perf_counter() - t0, 1),
            "settings": {k: v for k, v in vars(args).items() if k not in ("methods", "report")}}


def continuation_targets(methods: dict) -> dict:
    """The issue's targets, each (measured, met), for every GFlowNet row against every baseline: no
    baseline better on both axes; GFlowNet beats every sampler on max log p and every beam on diversity."""
    out = {}
    for g, gr in methods.items():
        if not g.startswith("GFlowNet"):
            continue
        for b, br in methods.items():
            if b.startswith("GFlowNet") or b == "greedy":
                continue
            both = br["max_log_p"] > gr["max_log_p"] and br["diversity"] > gr["diversity"]
            out[f"{b} not better than {g} on both axes"] = (
                f"max log p {br['max_log_p']:.2f} vs {gr['max_log_p']:.2f}; diversity {br['diversity']:.3f} vs "
                f"{gr['diversity']:.3f}", not both)
            if b.split()[0] in SAMPLERS:
                out[f"{g} beats {b} on max log p"] = (f"{gr['max_log_p']:.2f} vs {br['max_log_p']:.2f}",
                                                      gr["max_log_p"] > br["max_log_p"])
            if b.startswith(("beam", "diverse")):
                out[f"{g} beats {b} on diversity"] = (f"{gr['diversity']:.3f} vs {br['diversity']:.3f}",
                                                      gr["diversity"] > br["diversity"])
    return out


def contrastive_targets(methods: dict) -> dict:
    """The issue's targets, each (measured, met): the GFlowNet sampler has the highest ELBO of the
    samplers with a tractable q, and a higher mean log R than every best-of-n row. "Higher ELBO" is
    met only where the difference exceeds two standard errors of the evaluation's sampling noise
    (``gfnlm.diagnostics.elbo_difference``, the two samplers' samples being independent on the same
    prompts): a difference inside that is not shown to be one. Rows of different seeds are compared
    alike (a GFlowNet seed against a baseline of another seed: same prompts, independent samples)."""
    from gfnlm.diagnostics import elbo_difference, elbo_text

    out = {}
    for g, gr in methods.items():
        if not g.startswith("GFlowNet") or "diagnostics" not in gr:
            continue
        for b, br in methods.items():
            if b.startswith("GFlowNet"):
                continue
            if "diagnostics" in br:
                diff, se = elbo_difference(gr["diagnostics"], br["diagnostics"])
                out[f"{g} ELBO > {b} ELBO"] = (
                    f"{elbo_text(gr['diagnostics'])} vs {elbo_text(br['diagnostics'])}: difference {diff:.2f} ± "
                    f"{se:.2f} ({diff / se:+.1f} standard errors)", diff > 2 * se)
            if b.startswith("best-of"):
                snis = gr["diagnostics"].get("target_mean_log_r")
                out[f"{g} mean log R > {b}"] = (
                    f"{gr['mean_log_r']:.2f} vs {br['mean_log_r']:.2f} (LM token evaluations per prompt "
                    f"{gr['model_calls_per_prompt']:.0f} vs {br['model_calls_per_prompt']:.0f}"
                    + ("" if snis is None else f"; the target's own mean log R, estimated on the GFlowNet samples "
                       f"by self-normalised importance sampling: {snis:.2f}") + ")",
                    gr["mean_log_r"] > br["mean_log_r"])
    return out


def report(args) -> str:
    from common import merged_report

    from gfnlm.tasks import get_task_class

    task = get_task_class(args.task)()
    title, targets = {"continuation": ("Next-sentence continuation (Figure 3)", continuation_targets),
                      "contrastive": ("Contrastive posterior", contrastive_targets)}[args.task]
    return merged_report(args.task, Path(args.out), title, task.table, task.plot, targets)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gfnlm.cli import _setup_runtime

    _setup_runtime()
    if not args.report:
        from common import run_methods

        run_methods(args.task, args.methods, args.seed, Path(args.out) / args.task, run_method, args, args.variant)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
