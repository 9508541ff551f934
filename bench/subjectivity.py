"""Subjectivity classification with EM on the embedded model, per training-set size.

Every method sees the same labelled sentences (``train.<n>.jsonl``, n = 10, 20, 50) and is scored on
the same fixed validation split of ``train.jsonl`` (training sentences excluded):

* zero-shot: p(" objective." | X) vs p(" subjective." | X) under the base model;
* few-shot: the n labelled sentences in context (a reused prefix cache), same comparison;
* SFT classifier: a LoRA adapter fitted by cross-entropy over the two labels (no rationale);
* E-step only: the GFlowNet-trained rationale policy q(Z | X), the base model as p(Y | X, Z),
  a vote over rationales Z ~ q (greedy rationale in brackets);
* E+M: the same policy, the likelihood adapter fitted in the M-step as p(Y | X, Z).

``--methods em`` and ``--methods baselines`` can run in separate processes; each writes
``<out>/subjectivity/<part>.json`` and ``--report`` combines them into ``<out>/subjectivity.md``
and ``<out>/subjectivity.json``.

    .venv/bin/python bench/subjectivity.py --sizes 10,20,50 --steps 60 --val 200
    .venv/bin/python bench/subjectivity.py --report
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="baselines,em", help="baselines, em, or both")
    p.add_argument("--report", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sizes", default="10,20,50")
    p.add_argument("--steps", type=int, default=60, help="GFlowNet (E-step) steps in all")
    p.add_argument("--em_rounds", type=int, default=1)
    p.add_argument("--val", type=int, default=200, help="validation sentences (pass the same value to --report)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--task_arg", action="append", default=[], help="extra task_args as name=value")
    p.add_argument("--variant", default="", help="name of a variant of the EM rows (e.g. with --task_arg): its "
                   "results go to em-<size>-<variant>.json and rows 'E-step only (<variant>)', 'E+M (<variant>)'")
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "subj"))
    p.add_argument("--run_dir", default=str(ROOT / "runs" / "bench-subjectivity"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def task_args(args, size: int) -> dict:
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.task_arg)}
    return {"data_dir": args.data_dir, "train_size": size, "val_size": args.val, "em_rounds": args.em_rounds, **extra}


def em_part(args, size: int) -> str:
    return f"em-{size}" + (f"-{args.variant}" if args.variant else "")


def run_em(args, size: int) -> dict:
    from gfnlm.cli import make_trainer
    from gfnlm.tasks import build_config

    t0 = time.perf_counter()
    config = build_config("subjectivity", {"model": args.model, "seed": args.seed, "max_steps": args.steps,
                                           "reward_temperature_horizon": args.steps, "report_to": [],
                                           "output_dir": f"{args.run_dir}/{em_part(args, size)}",
                                           "task_args": task_args(args, size)})
    task, trainer = make_trainer(config)
    stats = task.train(trainer)
    train_s = time.perf_counter() - t0
    hist = trainer.history
    res = task.evaluate(trainer.model, trainer.tokenizer, config, trainer.constraints, seed=args.seed, progress=True)
    # how close the E-step sampler is to its target (the fitted likelihood model's posterior), on 8
    # validation sentences x 16 rationales
    diag = task.diagnostics(trainer.model, trainer.tokenizer, config, trainer.constraints, k=16, seed=args.seed,
                            progress=True)
    return {"size": size, "variant": args.variant, "task_args": task_args(args, size), "result": res, "em": stats,
            "diagnostics": diag, "history": hist,
            "train_seconds": round(train_s, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "log_r_first5": sum(h["reward/log_r_mean"] for h in hist[:5]) / max(len(hist[:5]), 1),
            "log_r_last5": sum(h["reward/log_r_mean"] for h in hist[-5:]) / max(len(hist[-5:]), 1)}


def run_baselines(args, sizes: list[int]) -> dict:
    from gfnlm.models import load_model
    from gfnlm.tasks.subjectivity import SubjectivityTask

    t0 = time.perf_counter()
    task = SubjectivityTask(task_args(args, sizes[0]))
    model, tok = load_model(args.model)
    res = task.evaluate_baselines(model, tok, sizes, seed=args.seed, progress=True)
    return {"result": res, "seconds": round(time.perf_counter() - t0, 1)}


def report(args) -> str:
    from gfnlm.tasks.subjectivity import SubjectivityTask, results_table

    folder = Path(args.out) / "subjectivity"
    parts = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
    sizes = [str(s) for s in args.sizes.split(",")]
    rows: dict[str, dict[str, str]] = {}
    acc: dict[str, dict[str, float]] = {}
    if "baselines" in parts:
        for m, r in parts["baselines"]["result"].items():
            rows[m] = {s: f"{100 * v:.1f}" for s, v in r.items()}
            acc[m] = {s: 100 * v for s, v in r.items()}
    em_parts = sorted((kv for kv in parts.items() if kv[0].startswith("em-")),  # the default rows first
                      key=lambda kv: (bool(kv[1].get("variant")), kv[1].get("variant", ""), kv[1].get("size", 0)))
    for name, part in em_parts:  # em-<size> and em-<size>-<variant>
        if str(part.get("size")) not in sizes:
            continue
        s, variant = str(part["size"]), part.get("variant", "")
        for m in ("E-step only", "E+M"):
            if m in part["result"]:
                r = part["result"][m]
                row = f"{m} ({variant})" if variant else m
                rows.setdefault(row, {})[s] = f"{100 * r['vote_accuracy']:.1f} ({100 * r['greedy_accuracy']:.1f})"
                acc.setdefault(row, {})[s] = 100 * r["vote_accuracy"]
    val, excluded = SubjectivityTask(task_args(args, int(sizes[0]))).validation()
    lines = [f"# Subjectivity with EM on {args.model}", "", results_table(rows, sizes), "",
             f"- {len(val)} validation sentences, a fixed split of train.jsonl ({excluded} training sentences excluded).",
             "- Accuracy in %. E rows: majority vote over the task's vote_samples rationales (greedy rationale in "
             "brackets)."]
    for name, part in parts.items():
        info = {k: v for k, v in part.items() if k not in ("result", "history", "diagnostics")}
        lines.append(f"- {name}: {json.dumps(info)}")
    diag = {name: part["diagnostics"] for name, part in parts.items() if part.get("diagnostics")}
    if diag:  # runs from before the diagnostics were recorded have none
        from gfnlm.diagnostics import elbo_text

        lines += ["", "Sampler diagnostics of each EM run's final policy against its E-step target (validation "
                  "sentences x rationales, at the final reward temperature; log space):", "",
                  "| run | prompts x samples | ELBO | IW bound | ESS | Var(log R − log q) |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {d['n_prompts']} x {d['n_samples']} | {elbo_text(d, 2)} | {d['iw_bound']:.2f} | "
                  f"{d['ess']:.3f} | {d['log_w_var']:.1f} |" for name, d in diag.items()]
    checks = {}
    for row in [r for r in acc if r.startswith("E+M")]:
        for s in ("10", "20"):
            em = acc[row].get(s)
            for base in ("few-shot", "SFT classifier"):
                b = acc.get(base, {}).get(s)
                if em is not None and b is not None:
                    checks[f"{row} > {base} at {s}"] = (f"{em:.1f} vs {b:.1f}", em > b)
    if checks:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {'yes' if ok else 'no'} |" for k, (v, ok) in checks.items()]
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "subjectivity.md").write_text(text)
    (Path(args.out) / "subjectivity.json").write_text(json.dumps(
        {"parts": parts, "accuracy": acc, "targets": {k: {"measured": v, "met": ok} for k, (v, ok) in checks.items()}},
        indent=1))
    return text


def save(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(folder / f"{name}.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from gfnlm.cli import _setup_runtime

    _setup_runtime()
    sizes = [int(s) for s in args.sizes.split(",")]
    folder = Path(args.out) / "subjectivity"
    if not args.report:
        methods = [m.strip() for m in args.methods.split(",")]
        if "baselines" in methods:
            print("[bench/subjectivity] baselines ...", flush=True)
            save(folder, "baselines", run_baselines(args, sizes))
        if "em" in methods:
            for s in sizes:
                print(f"[bench/subjectivity] EM with {s} examples ...", flush=True)
                save(folder, em_part(args, s), run_em(args, s))
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
