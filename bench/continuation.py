"""Figure 3 of the paper on the embedded model: next-sentence continuation.

Every method gets the same model (SmolLM2-135M-Instruct by default), the same split of
``../shared/data/openwebtext/prompts.txt`` (50 validation prompts, 950 training prompts, seed 0), the
same action space (one sentence of 1-24 legal tokens, ended by the stop action ".") and is evaluated
on the same validation prompts (``--prompts``), never trained on:

* baselines: the base model through transformers' ``generate`` under the same constraint: greedy,
  beam search (n and 5n beams, n returned), nucleus p = 0.95, plain sampling and tempered sampling at
  the final reward temperature, each sampler at n and 5n samples per prompt;
* gfn: GFlowNet fine-tuning (modified SubTB, LoRA) from the base model towards p̃(Z "." | X)^(1/T),
  T annealed 1.0 -> ``--t_end`` over the run; evaluated on n samples per prompt.

Per method: max and mean log p̃(Z "." | X) over the samples of a prompt, diversity (1 - mean pairwise
cosine of all-MiniLM-L6-v2 embeddings), length; averaged over prompts; diagnostics against
p̃^(1/T_end) for every sampler with a tractable q. Each run writes ``<out>/continuation/<method>.json``;
``--report`` writes ``<out>/continuation.md``, ``.json`` and the plot ``continuation.png``.

    .venv/bin/python bench/continuation.py --methods gfn,baselines
    .venv/bin/python bench/continuation.py --report
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
SAMPLERS = ("nucleus", "sampling", "tempered")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="gfn,baselines", help=f"comma-separated subset of {METHODS}")
    p.add_argument("--report", action="store_true", help="only combine the per-run results into the table")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=50, help="validation prompts evaluated")
    p.add_argument("--samples", type=int, default=8, help="n: samples per prompt")
    p.add_argument("--steps", type=int, default=120, help="GFlowNet optimiser steps")
    p.add_argument("--gfn_lr", type=float, default=3e-4)
    p.add_argument("--t_end", type=float, default=0.8, help="final reward temperature")
    p.add_argument("--gfn_set", action="append", default=[], help="extra GFNConfig field for the GFlowNet run, name=value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_file", default=str(ROOT.parent / "shared" / "data" / "openwebtext" / "prompts.txt"))
    p.add_argument("--run_dir", default=str(ROOT / "runs" / "bench-continuation"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def build(args, method: str):
    import yaml

    from gfnlm.tasks import build_config

    name = method if args.seed == 0 else f"{method}-seed{args.seed}"
    data = {"model": args.model, "seed": args.seed, "report_to": [], "output_dir": f"{args.run_dir}/{name}",
            "reward_temperature_end": args.t_end,
            "task_args": {"data_file": args.data_file, "eval_samples": args.samples, "eval_prompts": args.prompts}}
    if method == "gfn":
        data.update({"max_steps": args.steps, "learning_rate": args.gfn_lr, "reward_temperature_horizon": args.steps,
                     "warmup_steps": 10, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.gfn_set)}})
    return build_config("continuation", data)


def run_method(method: str, args) -> dict:
    import torch

    from gfnlm.models import load_model
    from gfnlm.tasks import get_task_class, make_trainer

    t0 = time.perf_counter()
    info: dict = {}
    config = build(args, method)
    if method == "baselines":
        model, tok = load_model(config.model)
        task = get_task_class("continuation")(config.task_args)
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
                     "reward_temperature": [config.reward_temperature, config.reward_temperature_end],
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
    """The issue's targets, each (measured, met), for every GFlowNet row against every baseline."""
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
            if b.startswith("beam"):
                out[f"{g} beats {b} on diversity"] = (f"{gr['diversity']:.3f} vs {br['diversity']:.3f}",
                                                      gr["diversity"] > br["diversity"])
    return out


def report(args) -> str:
    from common import merged_report

    from gfnlm.tasks.continuation import figure3_plot, figure3_table

    return merged_report("continuation", Path(args.out), "Next-sentence continuation (Figure 3)", figure3_table, figure3_plot, targets)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gfnlm.cli import _setup_runtime

    _setup_runtime()
    if not args.report:
        from common import run_methods

        run_methods("continuation", args.methods, args.seed, Path(args.out) / "continuation", run_method, args)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
