"""Table 4 of the paper on the embedded model: integer arithmetic with a calculator.

Every method gets the same model (SmolLM2-135M-Instruct by default), the same data
(``../shared/data/arithmetic``), the same action space and calculator, and is evaluated on the
same test questions (``--questions`` per operand count, test questions seen in training removed)
with the same vote (10 rationales at T = 0.1) and greedy decoding:

* k-shot CoT, k = 0, 3, 5, 10, 20: the base model after k solved examples (a reused prefix cache);
* SFT: LoRA, maximum likelihood of the labelled rationales (``gfnlm.sft``);
* RL (TRL GRPO): LoRA, correct-answer reward, the same episodes per step as GFlowNet training;
* GFlowNet fine-tuning: LoRA, the task's reward log p(Z, Y* | 3-shot, X), replay seeded with the
  labelled rationales.

Each method writes ``<out>/arithmetic/<method>.json`` when it finishes, so methods can run in
separate processes (``--methods gfn`` in one, ``--methods kshot`` in another) and be combined
with ``--report``, which writes ``<out>/arithmetic.md`` and ``<out>/arithmetic.json`` and prints
the table.

    .venv/bin/python bench/arithmetic.py --methods kshot,sft,rl,gfn   # GFlowNet: the task's 240 steps, RL 100
    .venv/bin/python bench/arithmetic.py --report
    .venv/bin/python bench/arithmetic.py --methods sft,gfn --labelled 10 --steps 240   # the 10-label table
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
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

METHODS = ["kshot", "sft", "rl", "gfn", "gfn_sft"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--report", action="store_true", help="only combine the per-method results into the table")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=50, help="test questions per operand count")
    p.add_argument("--shots", default="0,3,5,10,20")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps of GFlowNet and RL training (default: the task's 240 for GFlowNet, 100 for RL)")
    p.add_argument("--sft_steps", type=int, default=100)
    p.add_argument("--gfn_sft_steps", type=int, default=60, help="GFlowNet steps after SFT (gfn_sft)")
    p.add_argument("--gfn_sft_lr", type=float, default=2e-4)
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the LoRA adapters (SFT and RL)")
    p.add_argument("--gfn_lr", type=float, default=None,
                   help="learning rate of GFlowNet fine-tuning from the base model (default: the task's, 2e-4 with 20 "
                        "warm-up steps and cosine decay)")
    p.add_argument("--gfn_set", action="extend", nargs="+", default=[],
                   help="extra GFNConfig fields for the gfn method, as name=value (e.g. reward_temperature_end=1.0; "
                        "one or more, flag repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seeds other than 0 write <method>-seed<k>.json; --report "
                   "shows a method's seeds as mean ± std")
    p.add_argument("--labelled", type=int, default=0,
                   help="use only the first n labelled rationales (SFT data, replay seed, supervised questions; the "
                   "paper's second table: 10); results go to <out>/arithmetic-labelled<n>/ and its own table, which "
                   "takes the label-free rows (RL, k-shot with k <= n) from the main table's runs. 0: all 50")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "arithmetic"))
    p.add_argument("--run_dir", default=str(ROOT / "runs" / "bench-arithmetic"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    shots = [int(x) for x in args.shots.split(",") if x.strip()]
    if args.labelled and not args.report and "kshot" in args.methods.split(",") and max(shots, default=0) > args.labelled:
        p.error(f"--labelled {args.labelled} leaves {args.labelled} labelled examples, fewer than --shots "
                f"{args.shots} asks for: pass --shots up to {args.labelled}, or leave kshot out (the {args.labelled}-label "
                "table takes the k-shot rows up to that k from the main table)")
    if args.labelled:
        args.run_dir = f"{args.run_dir}-labelled{args.labelled}"
    return args


def folder_of(args) -> Path:
    """Where this table's per-method results live."""
    return Path(args.out) / ("arithmetic" + (f"-labelled{args.labelled}" if args.labelled else ""))


def method_dir(args, method: str) -> str:
    """The run folder of ``method``: ``<run_dir>/<method>``, with ``-seed<k>`` for seeds other than 0 (so
    that seeds never overwrite each other's checkpoints, and gfn_sft starts from its own seed's SFT)."""
    return f"{args.run_dir}/{method}" + (f"-seed{args.seed}" if args.seed else "")


def build(args, method: str, overrides: dict | None = None):
    from gfnlm.tasks import build_config

    overrides = dict(overrides or {})
    task_args = {"data_dir": args.data_dir, "labelled": args.labelled, **overrides.pop("task_args", {})}
    steps = args.steps if args.steps is not None else (100 if method == "rl" else None)
    data = {"model": args.model, "seed": args.seed, "learning_rate": args.lr, "max_steps": steps,
            "report_to": [], "output_dir": method_dir(args, method), "task_args": task_args, **overrides}
    for name in ("learning_rate", "max_steps"):
        if data[name] is None:  # the task's own
            del data[name]
    if method != "gfn":  # the task's cosine decay is GFlowNet's recipe (attempt 13); the SFT, GRPO and
        data.setdefault("lr_scheduler_type", "constant_with_warmup")  # GFN-from-SFT rows were run without it
    return build_config("arithmetic", data)


def evaluate(task, model, tok, config, cons, args, **kw) -> dict:
    import torch

    with torch.no_grad():
        return task.evaluate(model, tok, config, cons, n=args.questions, seed=args.seed, progress=True, **kw)


def run_method(method: str, args) -> dict:
    from gfnlm.cli import make_trainer
    from gfnlm.models import load_model
    from gfnlm.policy import base_model
    from gfnlm.tasks import get_task_class

    t0 = time.perf_counter()
    rows: list[tuple[str, dict]] = []
    info: dict = {}
    if method == "kshot":
        config = build(args, method)
        model, tok = load_model(config.model)
        task = get_task_class("arithmetic")(config.task_args)
        cons = task.constraints(config, tok)
        with base_model(model) as base:
            for k in [int(x) for x in args.shots.split(",")]:
                rows.append((f"k-shot CoT, k = {k}", evaluate(task, base, tok, config, cons, args, context_shots=k)))
                print(f"k = {k}: {json.dumps({l: r['vote_accuracy'] for l, r in rows[-1][1].items()})}", flush=True)
    elif method == "sft":
        from gfnlm.sft import sft_train

        config = build(args, method, {"max_steps": args.sft_steps, "task_args": {"seed_buffer": False}})
        task, trainer = make_trainer(config)
        losses = sft_train(trainer, task.supervised_completions(), batch_size=8)
        info = {"nll_first": losses[0], "nll_last": losses[-1], "steps": len(losses), "batch": 8,
                "train_seconds": round(time.perf_counter() - t0, 1)}
        trainer.model.eval()
        rows.append(("Supervised fine-tuning", evaluate(task, trainer.model, trainer.tokenizer, config,
                                                        trainer.constraints, args)))
    elif method == "rl":
        from gfnlm.rl import grpo_train

        config = build(args, method)
        model, tok = load_model(config.model)
        task = get_task_class("arithmetic")(config.task_args)
        model = grpo_train(task, model, tok, config, output_dir=config.output_dir,
                           num_generations=config.samples_per_prompt, prompts_per_step=config.prompts_per_step)
        hist = json.loads((Path(config.output_dir) / "log_history.json").read_text())
        rewards = [h["reward"] for h in hist if "reward" in h]
        info = {"steps": config.max_steps, "episodes_per_step": config.samples_per_prompt * config.prompts_per_step,
                "reward_first10": sum(rewards[:10]) / max(len(rewards[:10]), 1),
                "reward_last10": sum(rewards[-10:]) / max(len(rewards[-10:]), 1),
                "train_seconds": round(time.perf_counter() - t0, 1)}
        rows.append(("RL (TRL GRPO)", evaluate(task, model, tok, config, task.constraints(config, tok), args)))
    elif method == "gfn":
        import yaml

        lr = {"learning_rate": args.gfn_lr} if args.gfn_lr is not None else {"learning_rate": None}
        over = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.gfn_set)}
        config = build(args, method, {**lr, **over})
        task, trainer = make_trainer(config)
        trainer.train()
        info["history"] = trainer.history
        info["diagnostics"] = task.diagnostics(trainer.model, trainer.tokenizer, config, trainer.constraints,
                                               k=16, seed=args.seed)
        info.update({"steps": config.max_steps, "episodes_per_step": config.samples_per_prompt * config.prompts_per_step,
                     "loss": config.loss_type, "log_z": trainer.log_z_kind(), "learning_rate": config.learning_rate,
                     "reward_temperature": [config.reward_temperature, config.reward_temperature_end],
                     "tempered_fraction": config.tempered_fraction, "replay_fraction": config.replay_fraction,
                     "row_weight_column": config.row_weight_column,
                     "train_seconds": round(time.perf_counter() - t0, 1)})
        trainer.model.eval()
        rows.append(("GFlowNet fine-tuning", evaluate(task, trainer.model, trainer.tokenizer, config,
                                                      trainer.constraints, args)))
    elif method == "gfn_sft":
        start = Path(method_dir(args, "sft")) / f"checkpoint-{args.sft_steps}"
        if not start.is_dir():
            raise SystemExit(f"gfn_sft starts from the SFT run: run --methods sft first ({start} is missing)")
        config = build(args, method, {"init_from": str(start), "max_steps": args.gfn_sft_steps,
                                      "learning_rate": args.gfn_sft_lr, "reward_temperature_horizon": args.gfn_sft_steps})
        task, trainer = make_trainer(config)
        trainer.train()
        info = {"steps": config.max_steps, "episodes_per_step": config.samples_per_prompt * config.prompts_per_step,
                "loss": config.loss_type, "init_from": str(start), "learning_rate": config.learning_rate,
                "train_seconds": round(time.perf_counter() - t0, 1)}
        trainer.model.eval()
        rows.append(("GFlowNet fine-tuning from SFT", evaluate(task, trainer.model, trainer.tokenizer, config,
                                                               trainer.constraints, args)))
    else:
        raise SystemExit(f"unknown method {method!r}: choose from {METHODS}")
    return {"method": method, "rows": rows, "info": info, "seconds": round(time.perf_counter() - t0, 1),
            "settings": {k: v for k, v in vars(args).items() if k not in ("methods", "report")}}


def report(args) -> str:
    from gfnlm.tasks.arithmetic import table4

    folder = folder_of(args)
    results = {}  # "<method>" (seed 0) and "<method>-seed<k>": one file per run
    for m in METHODS:
        for f in [folder / f"{m}.json"] + sorted(folder.glob(f"{m}-seed*.json")):
            if f.exists() and not f.stem.endswith("-history"):  # a run's per-step figures sit beside it
                results[f.stem] = json.loads(f.read_text())
    if args.labelled:  # rows that use no rationales: taken from the main table (RL drew its questions from all 50)
        for m in ("kshot", "rl"):
            f = Path(args.out) / "arithmetic" / f"{m}.json"
            if m not in results and f.exists():
                res = json.loads(f.read_text())
                res["rows"] = [(n, r) for n, r in res["rows"]
                               if not n.startswith("k-shot") or int(n.rsplit("=", 1)[1]) <= args.labelled]
                results[f"{m} (from the main table's runs)"] = res
    grouped: dict[str, list[dict]] = {}  # a method's rows over its seeds: mean ± std in the table
    for res in results.values():
        for name, r in res["rows"]:
            grouped.setdefault(name, []).append(r)
    rows = list(grouped.items())
    table = table4(rows)
    acc = {name: {l: sum(100 * x[l]["vote_accuracy"] for x in rs) / len(rs) for l in rs[0]} for name, rs in rows}
    labels = f"the first {args.labelled} labelled rationales" if args.labelled else "all 50 labelled rationales"
    lines = [f"# Arithmetic (Table 4) on {next(iter(results.values()))['settings']['model'] if results else '?'}, "
             f"{labels}", "", table, ""]
    first = rows[0][1][0] if rows else {}
    for l, r in first.items():
        lines.append(f"- {l} operands: {r['removed_as_in_training']} test questions removed because they occur in a "
                     "training file.")
    for name, r in rows:  # every row is scored on the first n of the same (deduplicated) test questions
        counts = sorted({tuple(v["questions"] for v in x.values()) for x in r})
        lines.append(f"- {name}: the first {' or '.join('/'.join(map(str, c)) for c in counts)} questions of the "
                     f"{'/'.join(r[0])}-operand test sets; {len(r)} seed{'s' if len(r) > 1 else ''}"
                     + (" (seeds evaluated on different question counts: see each run below)." if len(counts) > 1 else "."))
    lines.append("- Cells: accuracy in % of the majority vote over 10 rationales at T = 0.1 (greedy in brackets).")
    for m, res in results.items():
        lines.append(f"- {m}: {res['seconds']:.0f} s in all; {json.dumps(res['info'])}")
    sft = acc.get("Supervised fine-tuning")
    rl = acc.get("RL (TRL GRPO)")
    checks = {}
    gfn = acc.get("GFlowNet fine-tuning")  # from the base model
    if gfn and sft:
        for l in ("3", "4"):
            checks[f"GFN within 5 points of SFT on {l} operands"] = (round(gfn[l] - sft[l], 1), gfn[l] >= sft[l] - 5)
        checks["GFN on 5 operands >= 1.5 x SFT"] = (f"{gfn['5']:.1f} vs {sft['5']:.1f}",
                                                   gfn["5"] >= 1.5 * sft["5"] and gfn["5"] > 0)
    if gfn and rl:
        for l in gfn:
            checks[f"GFN above GRPO on {l} operands"] = (f"{gfn[l]:.1f} vs {rl[l]:.1f}", gfn[l] > rl[l])
    if checks:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {'yes' if ok else 'no'} |" for k, (v, ok) in checks.items()]
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{folder.name}.md").write_text(text)
    (Path(args.out) / f"{folder.name}.json").write_text(json.dumps(
        {"results": results, "accuracy": acc, "targets": {k: {"measured": v, "met": ok} for k, (v, ok) in checks.items()}},
        indent=1))
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from gfnlm.cli import _setup_runtime

    _setup_runtime()
    if not args.report:
        from common import run_methods

        run_methods("arithmetic", args.methods, args.seed, folder_of(args), run_method, args)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
