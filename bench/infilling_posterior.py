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
DIGITS = {"bleu4": 2, "gleu4": 2, "bertscore": 3, "length_words": 2}


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
    p.add_argument("--report", action="store_true", help="only write the table from the saved JSON's samples, at "
                   "--temperatures (reweighting them; no model is loaded)")
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

    out = {"settings": {k: v for k, v in vars(args).items() if k != "report"}, "proposals": []}
    completions = []  # per proposal: [P][k] token-id lists
    for spec in args.policy:
        t0 = time.perf_counter()
        name, model, tok, config, cons, task = load_policy(spec, args)
        model.eval()
        with torch.no_grad():
            log_r, log_q, stats, comps = task.scored_eval_samples(model, tok, config, cons, k=args.k,
                                                                  max_prompts=args.stories, seed=args.seed, progress=True)
        completions.append(comps)
        out["proposals"].append({
            "name": name, "policy": spec, "reward": task.reward_model_name(), "stories": log_r.shape[0], "k": args.k,
            "samples": {"log_r": log_r.tolist(), "log_q": log_q.tolist(), **{f: stats[f] for f in FIGURES}},
            "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{name}: {out['proposals'][-1]['seconds']:.0f} s", flush=True)
        del model
    if len(args.policy) > 1:
        out["pool"] = pool(args, out["proposals"], completions)
    return out


def pool(args, proposals: list[dict], completions: list) -> dict:
    """Every proposal's samples scored under every policy: ``log_q [m, P, m k]`` (log space), the samples
    of story ``i`` in proposal order. The pooled estimate weighs them against the mixture
    ``(1/m) sum_j q_j`` (multiple importance sampling with the balance heuristic), so that a middle
    one proposal rarely draws but another draws often is weighed by both."""
    import torch

    from gfnlm.data import render_prompt
    from gfnlm.evaluation import sequence_log_probs

    t0 = time.perf_counter()
    m, P = len(proposals), proposals[0]["stories"]
    per_story = [[c for comps in completions for c in comps[i]] for i in range(P)]  # [P][m k]
    log_q = torch.zeros(m, P, m * args.k, dtype=torch.float64)
    for j, spec in enumerate(args.policy):
        _, model, tok, config, cons, task = load_policy(spec, args)
        model.eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for i, row in enumerate(task.eval_rows()[:P]):
            ids = render_prompt(tok, row["prompt"], config.chat_template)
            with torch.no_grad():
                log_q[j, i] = sequence_log_probs(model, ids, cons, per_story[i], pad_id=pad).double()
        own = torch.tensor(proposals[j]["samples"]["log_q"], dtype=torch.float64)
        gap = (log_q[j, :, j * args.k:(j + 1) * args.k] - own).abs().max().item()
        if gap > 1e-2:  # the sampler's own log q and the scoring pass must agree
            raise SystemExit(f"{spec}: rescored log q differs from the sampler's by {gap:.3g}")
        del model
    print(f"pooled: every sample scored under every policy, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"log_q": log_q.tolist(), "seconds": round(time.perf_counter() - t0, 1)}


def at_temperatures(result: dict, temperatures: str) -> dict:
    """Each proposal's diagnostics and target means against R^(1/T) for each T of ``temperatures``
    (comma-separated), from its saved samples: reweighting the same samples, no model needed; and
    with several proposals the pooled estimate (``result["pool"]``, against their mixture)."""
    import math

    import torch

    from gfnlm.tasks import diagnostics_at

    temps = [float(t) for t in temperatures.split(",") if t.strip()]
    tensor = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    for p in result["proposals"]:
        s = p["samples"]
        p["at"] = {f"{T:g}": diagnostics_at(tensor(s["log_r"]), tensor(s["log_q"]), {f: tensor(s[f]) for f in FIGURES}, T)
                   for T in temps}
    if result.get("pool"):
        props = result["proposals"]
        cat = lambda key: torch.cat([tensor(p["samples"][key]) for p in props], 1)  # noqa: E731  [P, m k]
        log_mix = torch.logsumexp(tensor(result["pool"]["log_q"]), 0) - math.log(len(props))
        result["pool"]["at"] = {f"{T:g}": diagnostics_at(cat("log_r"), log_mix, {f: cat(f) for f in FIGURES}, T)
                                for T in temps}
    return result


def table(result: dict) -> str:
    from gfnlm.diagnostics import elbo_text

    def target(m: dict, f: str) -> str:  # the target's estimate ± its error, scaled for the table
        return f"{SCALE[f] * m['target']:.{DIGITS[f]}f} ± {SCALE[f] * m['target_se']:.{DIGITS[f]}f}"

    props = result["proposals"]
    lines = ["| target T | proposal | ELBO | ESS | Var(log R − log q) | "
             + " | ".join(f"{HEADS[f]}: q → target" for f in FIGURES) + " |",
             "|---|---|---|---|---|" + "---|" * len(FIGURES)]
    temps = list(props[0]["at"]) if props else []
    for T in temps:
        for p in props:
            d = p["at"][T]
            cells = [f"{SCALE[f] * d['target_means'][f]['sampler']:.{DIGITS[f]}f} → {target(d['target_means'][f], f)}"
                     for f in FIGURES]
            lines.append(f"| {T} | {p['name']} | {elbo_text(d)} | {d['ess']:.3f} | {d['log_w_var']:.1f} | "
                         + " | ".join(cells) + " |")
        if result.get("pool"):
            d = result["pool"]["at"][T]
            cells = [f"→ {target(d['target_means'][f], f)}" for f in FIGURES]
            lines.append(f"| {T} | **all {len(props)} pooled** (their mixture) | n/a | {d['ess']:.3f} | n/a | "
                         + " | ".join(cells) + " |")
    if props:
        s = result["settings"]
        lines.append(f"\n{props[0]['stories']} test stories x {props[0]['k']} middles per proposal at temperature 1; "
                     f"reward: {props[0]['reward']}; seed {s['seed']}. Each figure: the proposal's own mean → the "
                     "self-normalised importance estimate of the target's mean ± its delta-method error"
                     + ("; the pooled row weighs all the proposals' samples against their equal mixture (multiple "
                        "importance sampling, balance heuristic), its ESS a fraction of all of them." if result.get("pool")
                        else "."))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.out) / "infilling_posterior.json"
    raw = Path(args.out) / "infilling_posterior-samples.json"  # every sample's figures, one line
    if args.report:
        result = json.loads(path.read_text())
        saved = json.loads(raw.read_text())
        for p, samples in zip(result["proposals"], saved["proposals"]):
            p["samples"] = samples
        if saved["pool_log_q"] is not None:
            result["pool"]["log_q"] = saved["pool_log_q"]
    else:
        from gfnlm.cli import _setup_runtime

        _setup_runtime()
        result = run(args)
    result = at_temperatures(result, args.temperatures)
    result["settings"]["temperatures"] = args.temperatures
    path.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"proposals": [p.pop("samples") for p in result["proposals"]],
                               "pool_log_q": result.get("pool", {}).pop("log_q", None)}) + "\n")
    path.write_text(json.dumps(result, indent=1))
    text = "# Infilling: what a sampler of the target posterior would score\n\n" + table(result) + "\n"
    text = text.replace(f"{ROOT}/", "")
    (Path(args.out) / "infilling_posterior.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
