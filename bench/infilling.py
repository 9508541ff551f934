"""Table 2 of the paper on the embedded model: story infilling.

Every method gets the same model (SmolLM2-135M-Instruct by default), the same split of
``../shared/data/stories/stories.jsonl`` (100 test, 100 validation, 900 training stories, seed 0),
the same prompt and action space (one sentence, ended by the stop action "."), and is evaluated on
the same test stories (``--stories``), never trained on: ``eval_samples`` middles per story at
T = 0.9 and one greedy middle, scored against the true sentence 4 with nltk BLEU-4 / GLEU-4 and
BERTScore (bert-score, all-MiniLM-L6-v2, layer 6; raw F1 and rescaled against random pairs of
training middles).

* prompting: the base model with the infill prompt;
* sft: LoRA, maximum likelihood of the true middles of the training stories;
* gfn: GFlowNet fine-tuning (modified SubTB) from the base model, reward log p(Z.|X) + log p(Y|XZ.)
  under the base model, replay seeded with the true middles;
* gfn_sft: the same, starting from the sft run's adapters;
* gfn_rlm: GFlowNet fine-tuning from the SFT policy with a reward LM first fine-tuned on the
  training stories (``reward_lm``: ``gfnlm sft --target reward``), as the paper did.

Each run writes ``<out>/infilling/<method>[-seed<k>].json``; ``--report`` combines them into
``<out>/infilling.md`` and ``<out>/infilling.json``.

    .venv/bin/python bench/infilling.py --methods prompting,sft,gfn_sft --stories 100
    .venv/bin/python bench/infilling.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ["prompting", "sft", "gfn", "gfn_sft", "reward_lm", "gfn_rlm"]
VARIANTS = ["sft", "gfn", "gfn_sft", "reward_lm", "gfn_rlm"]  # the methods a --variant may label
NAMES = {"prompting": "Prompting", "sft": "Supervised fine-tuning", "gfn": "GFlowNet fine-tuning (from base)",
         "gfn_sft": "GFlowNet fine-tuning (from SFT)", "gfn_rlm": "GFlowNet fine-tuning (from SFT, fine-tuned reward LM)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="prompting,sft,gfn_sft", help=f"comma-separated subset of {METHODS}")
    p.add_argument("--report", action="store_true", help="only combine the per-run results into the table")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stories", type=int, default=100, help="test stories evaluated")
    p.add_argument("--samples", type=int, default=4, help="middles per test story at T = 0.9")
    p.add_argument("--sft_steps", type=int, default=200)
    p.add_argument("--sft_lr", type=float, default=5e-4)
    p.add_argument("--reward_lm_steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=60, help="GFlowNet optimiser steps")
    p.add_argument("--gfn_lr", type=float, default=1e-4)
    p.add_argument("--gfn_set", action="extend", nargs="+", default=[],
                   help="extra GFNConfig fields for GFlowNet runs, name=value (one or more, flag repeatable)")
    p.add_argument("--seed", type=int, default=0, help="training seed; seeds other than 0 write <method>-seed<k>.json")
    p.add_argument("--variant", default="", help="label of a run with other settings (--steps, --gfn_set, "
                   "--reward_lm_steps, --sft_steps): written to <method>-<label>.json and its own table row; only with sft, "
                   "the GFlowNet methods and reward_lm (gfn_rlm uses the reward LM of the same variant; gfn_sft and "
                   "gfn_rlm start from the sft run named by --sft_variant)")
    p.add_argument("--sft_variant", default="", help="the --variant label of the sft run (its --sft_steps steps) that "
                   "gfn_sft and gfn_rlm start from; default: the default sft run")
    p.add_argument("--eval_steps", type=int, default=0, help="sft and reward_lm: also measure the NLL of the "
                   "validation stories every this many steps (always before the first and after the last), keeping "
                   "the best step's checkpoint")
    p.add_argument("--early_stop", default="", help="comma-separated subset of sft,reward_lm: the GFlowNet runs start "
                   "from (sft) / score with (reward_lm) that run's best validation step's checkpoint (its heldout.json, "
                   "written with --eval_steps), not its last")
    p.add_argument("--data_file", default=str(ROOT.parent / "shared" / "data" / "stories" / "stories.jsonl"))
    p.add_argument("--run_dir", default=str(ROOT / "runs" / "bench-infilling"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    args.early_stop = sorted({m.strip() for m in args.early_stop.split(",") if m.strip()})
    return args


def build(args, method: str, overrides: dict | None = None):
    import yaml

    from gfnlm.tasks import build_config

    data = {"model": args.model, "seed": args.seed, "report_to": [], "output_dir": str(run_dir(args, method)),
            "task_args": {"data_file": args.data_file, "eval_samples": args.samples}}
    if method.startswith("gfn"):
        data.update({"max_steps": args.steps, "learning_rate": args.gfn_lr, "reward_temperature_horizon": args.steps,
                     **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.gfn_set)}})
    return build_config("infilling", {**data, **(overrides or {})})


def run_dir(args, method: str, variant: str | None = None) -> Path:
    """The run's folder: ``<run_dir>/<method>[-<variant>][-seed<k>]``, with ``variant`` the run's label
    (None: ``--variant``; "": the default run)."""
    from common import slug

    label = args.variant if variant is None else variant
    name = method + (f"-{slug(label)}" if label and method in VARIANTS else "")
    return Path(args.run_dir) / (name if args.seed == 0 else f"{name}-seed{args.seed}")


def trained(args, folder: Path, steps: int, method: str) -> Path:
    """The checkpoint of an sft or reward_lm run (``method``) that GFlowNet runs use: its last
    (``steps``), or where ``--early_stop`` names the method its best validation step's (heldout.json)."""
    if method not in args.early_stop:
        return folder / f"checkpoint-{steps}"
    if not (folder / "heldout.json").is_file():
        raise SystemExit(f"--early_stop: {folder} has no heldout.json: run it again (this version writes one)")
    h = json.loads((folder / "heldout.json").read_text())
    if h["checkpoint"] is None:
        raise SystemExit(f"--early_stop: the best validation NLL of {folder} is before any fine-tuning: "
                         "there is no fine-tuned checkpoint to use")
    return Path(h["checkpoint"])


def evaluate(task, model, tok, config, cons, args) -> dict:
    import torch

    model.eval()
    with torch.no_grad():
        return task.evaluate(model, tok, config, cons, n=args.stories, seed=args.seed, progress=True)


def run_method(method: str, args) -> dict:
    from gfnlm.models import load_model
    from gfnlm.policy import base_model
    from gfnlm.sft import sft_train
    from gfnlm.tasks import get_task_class, make_trainer

    t0 = time.perf_counter()
    info: dict = {}
    result = None
    if method == "prompting":
        config = build(args, method)
        model, tok = load_model(config.model)
        task = get_task_class("infilling")(config.task_args)
        with base_model(model) as base:
            result = evaluate(task, base, tok, config, task.constraints(config, tok), args)
    elif method in ("sft", "reward_lm"):
        target = "policy" if method == "sft" else "reward"
        probe = get_task_class("infilling")(build(args, method).task_args)
        rows, completions, defaults = probe.sft_data(target)
        steps = args.sft_steps if method == "sft" else args.reward_lm_steps
        config = build(args, method, {**defaults, "max_steps": steps, "learning_rate": args.sft_lr,
                                      "task_args": {**build(args, method).task_args, **defaults.get("task_args", {})},
                                      "output_dir": str(run_dir(args, method))})
        task, trainer = make_trainer(config, with_rewards=False, dataset=rows)
        completions, skipped = trainer.collector.writable(completions)  # as gfnlm sft does
        held, _ = trainer.collector.writable(probe.heldout_completions(target))  # the validation stories
        losses = sft_train(trainer, completions, batch_size=8, heldout=held, eval_steps=args.eval_steps)
        h = json.loads((run_dir(args, method) / "heldout.json").read_text())
        info = {"target": target, "nll_first10": statistics.fmean(losses[:10]), "nll_last10": statistics.fmean(losses[-10:]),
                "valid_nll": h["curve"][-1][1], "valid_examples": sum(map(len, held.values())),
                "valid_best_step": h["best_step"], "valid_curve": h["curve"], "skipped": skipped,
                "steps": len(losses), "batch": 8, "learning_rate": args.sft_lr, "examples": len(completions),
                "train_seconds": round(time.perf_counter() - t0, 1)}
        if method == "sft":
            result = evaluate(task, trainer.model, trainer.tokenizer, config, trainer.constraints, args)
    elif method in ("gfn", "gfn_sft", "gfn_rlm"):
        over: dict = {}
        if method in ("gfn_sft", "gfn_rlm"):
            start = trained(args, run_dir(args, "sft", variant=args.sft_variant), args.sft_steps, "sft")
            if not start.is_dir():
                how = f"--variant {args.sft_variant!r}" if args.sft_variant else "no --variant"
                seed = f" and --seed {args.seed}" if args.seed else ""
                raise SystemExit(f"{method} starts from the sft run: run --methods sft first, with the same --sft_steps, "
                                 f"{how}{seed} ({start} is missing)")
            over["init_from"] = str(start)
        if method == "gfn_rlm":
            rlm = trained(args, run_dir(args, "reward_lm"), args.reward_lm_steps, "reward_lm")
            if not rlm.is_dir():
                raise SystemExit(f"gfn_rlm needs the reward LM: run --methods reward_lm first ({rlm} is missing)")
            over["task_args"] = {**build(args, method).task_args, "reward_model": str(rlm)}
        config = build(args, method, over)
        task, trainer = make_trainer(config)
        t1 = time.perf_counter()
        trainer.train()
        info["history"] = trainer.history
        info["diagnostics"] = task.diagnostics(trainer.model, trainer.tokenizer, config, trainer.constraints,
                                               k=16, seed=args.seed)
        info.update({"steps": config.max_steps, "episodes_per_step": config.samples_per_prompt * config.prompts_per_step,
                     "loss": config.loss_type, "log_z": trainer.log_z_kind(), "learning_rate": config.learning_rate,
                     "reward_temperature": [config.reward_temperature, config.reward_temperature_end],
                     "init_from": config.init_from, "reward_model": task.reward_model_name(),
                     "setup_seconds": round(t1 - t0, 1), "train_seconds": round(time.perf_counter() - t1, 1)})
        result = evaluate(task, trainer.model, trainer.tokenizer, config, trainer.constraints, args)
    else:
        raise SystemExit(f"unknown method {method!r}: choose from {METHODS}")
    return {"method": method, "result": result, "info": info, "seconds": round(time.perf_counter() - t0, 1),
            "settings": {k: v for k, v in vars(args).items() if k not in ("methods", "report")}}


def label(run: dict) -> str:
    """A run's row name: the method's name, with its variant label (``--variant``) in brackets."""
    variant = run["settings"].get("variant", "")
    return NAMES.get(run["method"], run["method"]) + (f" [{variant}]" if variant else "")


def report(args) -> str:
    from gfnlm.tasks.infilling import table2

    folder = Path(args.out) / "infilling"
    runs = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json")) if not f.stem.endswith("-history")}
    runs = dict(sorted(runs.items(), key=lambda kv: (METHODS.index(kv[1]["method"]), label(kv[1]), kv[1]["settings"]["seed"])))
    evaluated = {name: r for name, r in runs.items() if r["result"]}
    by_method: dict[str, list[dict]] = {}  # one group per method and variant, over seeds
    for name, r in evaluated.items():
        by_method.setdefault(label(r), []).append(r["result"])
    first = next(iter(evaluated.values()))["result"] if evaluated else None
    t = f"T={first['temperature']:g}" if first else "T=0.9"
    lines = [f"# Story infilling (Table 2) on {next(iter(runs.values()))['settings']['model'] if runs else '?'}", ""]
    lines.append("Each run (mean ± std over samples and stories, greedy in brackets):\n")
    lines.append(table2({label(r) + (f", seed {r['settings']['seed']}" if r["settings"]["seed"] else ""):
                         r["result"] for r in evaluated.values()}))
    metrics = ["bleu4", "gleu4", "bertscore", "bertscore_rescaled"]

    def seed_mean(method, metric, at=t):
        vals = [res[at][metric]["mean"] for res in by_method.get(method, [])]
        return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)) if vals else None

    lines += ["", f"Seed means at {t} (± std over seeds where there are several):", "",
              "| method | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for m in by_method:
        cells = [seed_mean(m, x) for x in metrics]
        lines.append(f"| {m} | {cells[0][2]} | " + " | ".join(f"{c[0]:.4f} ± {c[1]:.4f}" for c in cells) + " |")
    checks = {}
    for g in [m for m in by_method if m.startswith("GFlowNet")]:
        for base in [m for m in by_method if m.startswith(NAMES["sft"]) or m == NAMES["prompting"]]:
            for x in ("bleu4", "gleu4", "bertscore"):
                a, b = seed_mean(g, x), seed_mean(base, x)
                spread = f"; std over seeds {a[1]:.4f} ({a[2]}) / {b[1]:.4f} ({b[2]})" if max(a[2], b[2]) > 1 else ""
                checks[f"{g} > {base} on {x}"] = (f"{a[0]:.4f} vs {b[0]:.4f} ({a[0] - b[0]:+.4f}{spread})", a[0] > b[0])
    if checks:
        lines += ["", f"| target (at {t}) | measured | met |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {'yes' if ok else 'no'} |" for k, (v, ok) in checks.items()]
    lines += ["", "Runs:"]
    for name, r in runs.items():
        info = {k: v for k, v in r["info"].items() if k not in ("history",)}
        extra = "".join(f"; {k}: {r['settings'][k]}" for k in ("variant", "gfn_set") if r["settings"].get(k))
        lines.append(f"- {name}: {r['seconds']:.0f} s in all{extra}; {json.dumps(info)}")
    if first:
        lines.append(f"\nReward model: see each run; {first['bertscore']}; {first['stories']} test stories, "
                     f"{first['samples_per_story']} samples each at {t}.")
    text = "\n".join(lines).replace(f"{ROOT}/", "") + "\n"  # paths relative to the repository
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "infilling.md").write_text(text)
    (Path(args.out) / "infilling.json").write_text(json.dumps(
        {"runs": runs, "targets": {k: {"measured": v, "met": ok} for k, (v, ok) in checks.items()}}, indent=1))
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if not set(args.early_stop) <= {"sft", "reward_lm"}:
        raise SystemExit(f"--early_stop {','.join(args.early_stop)!r}: name sft, reward_lm or both (comma-separated)")
    if args.variant and not args.report and not all(m.strip() in VARIANTS for m in args.methods.split(",") if m.strip()):
        raise SystemExit(f"--variant labels SFT, GFlowNet and reward LM runs: use it with --methods among {', '.join(VARIANTS)}")
    from gfnlm.cli import _setup_runtime

    _setup_runtime()
    if not args.report:
        from common import run_methods

        run_methods("infilling", args.methods, args.seed, Path(args.out) / "infilling", run_method, args, args.variant)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
