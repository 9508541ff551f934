"""The contrastive posterior on the embedded model: q(Z | X) ∝ p̃(Z "." | X)^a p̃(Z "." | U)^b.

Every method gets the same model (SmolLM2-135M-Instruct by default), the same split of
``../shared/data/openwebtext/prompts.txt`` (50 validation prompts, 950 training prompts, seed 0), the
same action space (one sentence of 1-24 legal tokens, stop ".") and the same target (a = 1.5,
b = -0.5 by default), and is evaluated on the same validation prompts (``--prompts``):

* baselines (base model, transformers' ``generate``, same constraint): plain and tempered (T = 0.8)
  sampling from p(Z|X); best-of-2n and best-of-5n reranking by R (n kept); the token-level
  contrastive sampler (classifier-free guidance, exact log q);
* gfn: GFlowNet fine-tuning (modified SubTB, LoRA) from the base model towards R.

Per method: mean log R, mean PMI, mean log p(Z|X), diversity, length, LM token evaluations per
prompt, and the ELBO on R (with the IW bound, ESS, Var) for every sampler with a tractable q. Each
run writes ``<out>/contrastive/<method>.json``; ``--report`` writes ``<out>/contrastive.md``, ``.json``
and the plot ``contrastive.png``.

    .venv/bin/python bench/contrastive.py --methods gfn,baselines
    .venv/bin/python bench/contrastive.py --report
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ["baselines", "gfn"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="gfn,baselines", help=f"comma-separated subset of {METHODS}")
    p.add_argument("--report", action="store_true", help="only combine the per-run results into the table")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=50, help="validation prompts evaluated")
    p.add_argument("--samples", type=int, default=8, help="n: samples per prompt")
    p.add_argument("--steps", type=int, default=100, help="GFlowNet optimiser steps")
    p.add_argument("--gfn_lr", type=float, default=3e-4)
    p.add_argument("--a", type=float, default=1.5)
    p.add_argument("--b", type=float, default=-0.5)
    p.add_argument("--gfn_set", action="append", default=[], help="extra GFNConfig field for the GFlowNet run, name=value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_file", default=str(ROOT.parent / "shared" / "data" / "openwebtext" / "prompts.txt"))
    p.add_argument("--run_dir", default=str(ROOT / "runs" / "bench-contrastive"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def build(args, method: str):
    import yaml

    from gfnlm.tasks import build_config

    name = method if args.seed == 0 else f"{method}-seed{args.seed}"
    data = {"model": args.model, "seed": args.seed, "report_to": [], "output_dir": f"{args.run_dir}/{name}",
            "task_args": {"data_file": args.data_file, "eval_samples": args.samples, "eval_prompts": args.prompts,
                          "a": args.a, "b": args.b}}
    if method == "gfn":
        data.update({"max_steps": args.steps, "learning_rate": args.gfn_lr, "warmup_steps": 10, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.gfn_set)}})
    return build_config("contrastive", data)


def run_method(method: str, args) -> dict:
    import torch

    from gfnlm.models import load_model
    from gfnlm.tasks import get_task_class, make_trainer

    t0 = time.perf_counter()
    info: dict = {}
    config = build(args, method)
    if method == "baselines":
        model, tok = load_model(config.model)
        task = get_task_class("contrastive")(config.task_args)
        with torch.no_grad():
            result = task.evaluate(None, tok, config, task.constraints(config, tok), n=args.prompts, seed=args.seed,
                                   progress=True, base=model)
    elif method == "gfn":
        task, trainer = make_trainer(config)
        t1 = time.perf_counter()
        trainer.train()
        info["history"] = trainer.history
        info.update({"steps": config.max_steps, "episodes_per_step": config.samples_per_prompt * config.prompts_per_step,
                     "loss": config.loss_type, "learning_rate": config.learning_rate,
                     "a": config.task_args["a"], "b": config.task_args["b"],
                     "setup_seconds": round(t1 - t0, 1), "train_seconds": round(time.perf_counter() - t1, 1)})
        trainer.model.eval()
        with torch.no_grad():
            result = task.evaluate(trainer.model, trainer.tokenizer, config, trainer.constraints, n=args.prompts,
                                   seed=args.seed, progress=True, baselines=False)
    else:
        raise SystemExit(f"unknown method {method!r}: choose from {METHODS}")
    return {"method": method, "result": result, "info": info, "seconds": round(time.perf_counter() - t0, 1),
            "settings": {k: v for k, v in vars(args).items() if k not in ("methods", "report")}}


def targets(methods: dict) -> dict:
    """The issue's targets, each (measured, met): the GFlowNet sampler has the highest ELBO of the
    samplers with a tractable q, and a higher mean log R than every best-of-n row."""
    out = {}
    for g, gr in methods.items():
        if not g.startswith("GFlowNet") or "diagnostics" not in gr:
            continue
        for b, br in methods.items():
            if b.startswith("GFlowNet"):
                continue
            if "diagnostics" in br:
                out[f"{g} ELBO > {b} ELBO"] = (f"{gr['diagnostics']['elbo']:.2f} vs {br['diagnostics']['elbo']:.2f}",
                                               gr["diagnostics"]["elbo"] > br["diagnostics"]["elbo"])
            if b.startswith("best-of"):
                out[f"{g} mean log R > {b}"] = (
                    f"{gr['mean_log_r']:.2f} vs {br['mean_log_r']:.2f} (LM token evaluations per prompt "
                    f"{gr['model_calls_per_prompt']:.0f} vs {br['model_calls_per_prompt']:.0f})",
                    gr["mean_log_r"] > br["mean_log_r"])
    return out


def report(args) -> str:
    from common import merged_report

    from gfnlm.tasks.contrastive import contrastive_plot, contrastive_table

    return merged_report("contrastive", Path(args.out), "Contrastive posterior", contrastive_table, contrastive_plot, targets)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gfnlm.cli import _setup_runtime

    _setup_runtime()
    if not args.report:
        from common import run_methods

        run_methods("contrastive", args.methods, args.seed, Path(args.out) / "contrastive", run_method, args)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
