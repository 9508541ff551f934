"""What would a sampler that matched the infilling posterior score on Table 2's metrics?

The target is p(Z | X, Y) ∝ [p_LM(Z "." | X) p_LM(" " Y | X Z ".")]^(1/T) (the task's reward, base LM or
``--reward_model``). Every policy given is a proposal q for it: ``-k`` middles per test story from
the policy at temperature 1, with log q and log R of each, and Table 2's figures of each middle
against the story's true middle (BLEU-4, GLEU-4, BERTScore F1, length in words). Per proposal and
reward temperature T this prints and writes:

* the sampler diagnostics against the target (ELBO ± standard error, ESS, Var(log R - log q));
* for each figure, the proposal's own mean over its samples, and the self-normalised importance
  estimate of the *target's* mean (± its delta-method error, which understates the error at a small
  ESS: the estimate can only weigh the middles the proposal drew).

Different proposals estimate the same target means. Where they agree, the estimate does not rest on
one proposal's blind spots. Table 2 scores samples drawn at T = 0.9 from each policy; here every
figure is at temperature 1, the q the diagnostics are about, so the two tables are not comparable
cell for cell.

    .venv/bin/python bench/infilling_posterior.py --policy prompting \\
        --policy "SFT 400 steps=runs/bench-infilling/sft-400-steps/checkpoint-400" --temperatures 0.85,1.0
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

FIGURES = ("bleu4", "gleu4", "bertscore", "length_words")
HEADS = {"bleu4": "BLEU-4 (%)", "gleu4": "GLEU-4 (%)", "bertscore": "BERTScore F1", "length_words": "length (words)"}
SCALE = {"bleu4": 100, "gleu4": 100, "bertscore": 1, "length_words": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a proposal: 'prompting' (the base model with the infill prompt) or NAME=a checkpoint of "
                        "gfnlm sft / gfnlm train on the task (repeatable)")
    p.add_argument("--reward_model", default=None, help="a `gfnlm sft --task infilling --target reward` checkpoint "
                   "(default: the base LM)")
    p.add_argument("--temperatures", default="0.85", help="comma-separated reward temperatures T of the target")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stories", type=int, default=100, help="test stories (never trained on)")
    p.add_argument("-k", type=int, default=16, help="middles per story from each proposal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_file", default=str(ROOT.parent / "shared" / "data" / "stories" / "stories.jsonl"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--report", action="store_true", help="only write the table from the saved JSON")
    args = p.parse_args(argv)
    if not args.report and not args.policy:
        p.error("give at least one --policy (prompting, or NAME=CHECKPOINT)")
    return args


def load_policy(spec: str, args):
    """``(name, model, tokenizer, config, constraints, task)`` of one ``--policy``; the task reads
    the test stories of ``--data_file`` and scores with ``--reward_model``."""
    from gfnlm.models import load_model
    from gfnlm.tasks import build_config, get_task_class
    from gfnlm.trainer import load_trained

    task_args = {"data_file": args.data_file, "reward_model": args.reward_model}
    config = build_config("infilling", {"model": args.model, "report_to": [], "task_args": task_args})
    task = get_task_class("infilling")(config.task_args)
    if spec == "prompting":
        model, tok = load_model(config.model)
        return "Prompting (base model)", model, tok, config, task.constraints(config, tok), task
    if "=" not in spec:
        raise SystemExit(f"--policy {spec!r}: give 'prompting' or NAME=CHECKPOINT")
    name, path = spec.split("=", 1)
    model, tok, trained_config, _ = load_trained(path)
    if trained_config.model != config.model:
        raise SystemExit(f"--policy {spec!r}: trained on {trained_config.model}, not --model {config.model}")
    return name, model, tok, config, task.constraints(config, tok), task


def run(args) -> dict:
    import torch

    from gfnlm.tasks import diagnostics_at

    temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    out = {"settings": {k: v for k, v in vars(args).items() if k != "report"}, "proposals": []}
    for spec in args.policy:
        t0 = time.perf_counter()
        name, model, tok, config, cons, task = load_policy(spec, args)
        model.eval()
        with torch.no_grad():
            log_r, log_q, stats = task.scored_eval_samples(model, tok, config, cons, k=args.k, max_prompts=args.stories,
                                                           seed=args.seed, progress=True)
        out["proposals"].append({
            "name": name, "policy": spec, "reward": task.reward_model_name(), "stories": log_r.shape[0], "k": args.k,
            "at": {f"{T:g}": diagnostics_at(log_r, log_q, {f: stats[f] for f in FIGURES}, T) for T in temps},
            "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{name}: {out['proposals'][-1]['seconds']:.0f} s", flush=True)
        del model
    return out


def table(result: dict) -> str:
    from gfnlm.diagnostics import elbo_text

    props = result["proposals"]
    lines = ["| target T | proposal | ELBO | ESS | Var(log R − log q) | "
             + " | ".join(f"{HEADS[f]}: q → target" for f in FIGURES) + " |",
             "|---|---|---|---|---|" + "---|" * len(FIGURES)]
    temps = list(props[0]["at"]) if props else []
    for T in temps:
        for p in props:
            d = p["at"][T]
            cells = []
            for f in FIGURES:
                m, s = d["target_means"][f], SCALE[f]
                digits = 3 if s == 1 and f != "length_words" else 2
                cells.append(f"{s * m['sampler']:.{digits}f} → {s * m['target']:.{digits}f} ± {s * m['target_se']:.{digits}f}")
            lines.append(f"| {T} | {p['name']} | {elbo_text(d)} | {d['ess']:.3f} | {d['log_w_var']:.1f} | "
                         + " | ".join(cells) + " |")
    if props:
        s = result["settings"]
        lines.append(f"\n{props[0]['stories']} test stories x {props[0]['k']} middles per proposal at temperature 1; "
                     f"reward: {props[0]['reward']}; seed {s['seed']}. Each figure: the proposal's own mean → the "
                     "self-normalised importance estimate of the target's mean ± its delta-method error.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.out) / "infilling_posterior.json"
    if args.report:
        result = json.loads(path.read_text())
    else:
        from gfnlm.cli import _setup_runtime

        _setup_runtime()
        result = run(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    text = "# Infilling: what a sampler of the target posterior would score\n\n" + table(result) + "\n"
    text = text.replace(f"{ROOT}/", "")
    (Path(args.out) / "infilling_posterior.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
