"""The constrained posterior where every string can be enumerated: exact TV and KL of each sampler.

Setting (SmolLM2-135M-Instruct, the embedded model): after the prompt ``--prompt`` the policy writes 1
to 4 of six word tokens (" cat", " dog", " sat", " on", " a", " mat"), then the stop action "."; the
constraint is the regex ``( (cat|dog|sat|on|a))* mat``: the sentence ends with " mat" (156 of the 1,554
strings). Target: π(Z) ∝ p̃(Z "." | X) c(Z), p̃ the base LM renormalised over the six words and the
stop. Every sampler's exact distribution over the 156 strings comes from scoring all of them:

* **GFlowNet fine-tuning** (modified SubTB, LoRA, the regex as a prefix-aware action mask shared by
  sampler, scoring and reward), before training (= locally constrained decoding: zero-initialised
  adapters) and after ``--steps`` steps;
* **locally constrained decoding**: the base LM under the same mask, renormalised token by token;
* **rejection sampling** from p̃ (the six words, no mask, proposals of up to five tokens, those of at
  most four that match kept, so each ended with a real stop): exactly π, at 1 / P(c) proposals per
  accepted sample (its distribution computed, not assumed);
* **SMC with genlm-control** (:mod:`gfnlm.smc`, the same target: p̃ renormalised over the six words
  and the stop, the regex and lengths as hard factors) with N particles (``--smc_particles``), one
  sample drawn from each run's weighted particles. Its distribution is not tractable: it is estimated
  from ``--smc_runs`` runs as the mean of each run's normalised weights (the law of the drawn
  sample), and the table gives the TV that the same number of exact draws from π would show
  (the estimate's noise floor; KL(π‖q) of an estimate is infinite wherever a string was never
  drawn). With one particle the drawn sample is the proposal's, so its law is computed exactly
  (it is locally constrained decoding's) and the runs only check that and count the LM calls.

Per sampler: KL(π || q), KL(q || π), TV(π, q), the exact ELBO E_q[log R - log q] (log Z - KL(q || π)),
satisfaction, and the LM calls per sample (tokens read, stop included; rejection: per accepted
sample; SMC: rows of the LM's forward passes per run, one sample returned per run).

A picture of the table, ``constrained.png``: each sampler's TV to π against its LM calls per sample.

    .venv/bin/python bench/constrained.py            # ~15 min on 2 CPU cores
    .venv/bin/python bench/constrained.py --report   # only redraw constrained.png from constrained.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

WORDS = [" cat", " dog", " sat", " on", " a", " mat"]
PATTERN = "( (cat|dog|sat|on|a))* mat"


def exact(model, tok, prompt, cons, strings) -> torch.Tensor:
    """log q(z ⊤ | X) of every string (token id lists) under ``cons`` (the mask included). [K]"""
    from gfnlm.evaluation import sequence_log_probs

    return sequence_log_probs(model, prompt, cons, strings, pad_id=tok.pad_token_id or 0).double().cpu()


def compare(log_pi: torch.Tensor, log_q: torch.Tensor, log_r: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Exact figures of a sampler q against π on the valid strings (q's mass outside them is 1 - Σq)."""
    pi, q = log_pi.exp(), log_q.exp()
    mass = float(q.sum())
    inside = q > 0
    kl_pq = float((pi * (log_pi - log_q)).sum()) if bool(inside.all()) else math.inf
    kl_qp = float((q[inside] * (log_q[inside] - log_pi[inside])).sum()) if mass > 0.999 else math.inf
    tv = 0.5 * (float((pi - q).abs().sum()) + max(0.0, 1.0 - mass))
    elbo = float((q[inside] * (log_r[inside] - log_q[inside])).sum()) if mass > 0.999 else -math.inf
    return {"kl_target_to_q": kl_pq, "kl_q_to_target": kl_qp, "tv": tv, "elbo": elbo, "satisfaction": mass,
            "lm_calls_per_sample": float((q * (lengths + 1)).sum() / max(mass, 1e-30))}


def smc_estimates(model, tok, prompt, masked, valid, log_pi, args) -> dict:
    """SMC (genlm-control) with each particle count: the law of one sample drawn from a run's weighted
    particles, estimated over ``args.smc_runs`` runs, against π; and the TV of as many exact draws."""
    from gfnlm.smc import LMTerm, run_smc

    index = {tuple(s): i for i, s in enumerate(valid)}
    pi = log_pi.exp()
    g = torch.Generator().manual_seed(args.seed)
    out = {}
    for n in [int(x) for x in args.smc_particles.split(",") if x.strip()]:
        t = time.perf_counter()
        runs = run_smc(model, tok, masked, [[LMTerm(prompt)]] * args.smc_runs, n_particles=n, ess_threshold=0.5,
                       seed=args.seed + n, progress=True, desc=f"SMC, {n} particles")
        q = torch.zeros(len(valid), dtype=torch.float64)
        for r in runs:
            for z, w in r.weighted():
                q[index[tuple(z)]] += w / len(runs)
        draws = torch.multinomial(pi, args.smc_runs, replacement=True, generator=g)
        floor = 0.5 * float((pi - torch.bincount(draws, minlength=len(valid)).double() / args.smc_runs).abs().sum())
        extra = {}
        if n == 1:  # one particle: the drawn sample is the proposal's (locally constrained decoding), exactly
            law = exact(model, tok, prompt, masked, valid).exp()
            extra = {"estimate_tv_to_exact_law": 0.5 * float((law - q).abs().sum())}
            print(f"SMC 1: estimated law vs the proposal's exact law: TV {extra['estimate_tv_to_exact_law']:.4f} "
                  f"(noise floor about {floor:.4f})", flush=True)
            q, floor = law, 0.0
        inside = q > 0
        out[f"SMC, genlm-control ({n} particles)"] = {**extra,
            "kl_target_to_q": float((pi * (log_pi - q.log())).sum()) if bool(inside.all()) else math.inf,
            "kl_q_to_target": float((q[inside] * (q[inside].log() - log_pi[inside])).sum()),
            "tv": 0.5 * float((pi - q).abs().sum()), "elbo": math.nan, "satisfaction": float(q.sum()),
            "lm_calls_per_sample": sum(r.lm_calls for r in runs) / len(runs), "tv_noise_floor": floor,
            "log_z_smc": sum(r.log_ml for r in runs) / len(runs), "runs": len(runs), "particles": n,
            "seconds": time.perf_counter() - t}
        print(f"SMC {n}: TV {out[f'SMC, genlm-control ({n} particles)']['tv']:.4f} (floor {floor:.4f})", flush=True)
    return out


def smc_target(gfn: dict, smc: dict) -> dict:
    """KL(π‖q) of GFlowNet within 2x of SMC's, at the SMC particle count whose LM calls per sample are
    closest to GFlowNet's."""
    if not smc:
        return {"KL within 2x of SMC at equal model calls": ("SMC not run", False)}
    name, r = min(smc.items(), key=lambda kv: abs(kv[1]["lm_calls_per_sample"] - gfn["lm_calls_per_sample"]))
    return {f"KL(π‖q) GFlowNet within 2x of SMC at equal model calls ({name})":
            (f"{gfn['kl_target_to_q']:.4f} vs {r['kl_target_to_q']:.4f} ({gfn['lm_calls_per_sample']:.1f} vs "
             f"{r['lm_calls_per_sample']:.1f} LM calls per sample)", gfn["kl_target_to_q"] <= 2 * r["kl_target_to_q"])}


def plot(data: dict, path: Path) -> None:
    """TV(π, q) against LM calls per sample, one point per sampler of ``data`` (constrained.json)."""
    from gfnlm.evaluation import scatter_plot

    points = []
    for name, r in data["samplers"].items():
        if name == "GFlowNet, before training" or r.get("particles") == 1:  # both have local decoding's law
            continue
        gfn = name.startswith("GFlowNet")
        if name == "locally constrained decoding":
            name += " (= SMC with 1 particle, = GFlowNet before training)"
        floor = f", noise floor {r['tv_noise_floor']:.3f}" if r.get("tv_noise_floor") else ""
        points.append({"label": f"{name}: TV {r['tv']:.3f}{floor}, {r['lm_calls_per_sample']:.1f} calls",
                       "tv": r["tv"], "calls": r["lm_calls_per_sample"], "marker": "*" if gfn else "o",
                       **({"color": "tab:red"} if gfn else {})})
    scatter_plot(points, path, x="calls", y="tv",
                 xlabel="LM calls per sample (tokens read; rejection: per accepted sample; GFlowNet training not counted)",
                 ylabel="TV(π, q) (exact; SMC: estimated from its runs)",
                 title=f"Constrained posterior `{data['pattern']}` after {data['settings']['prompt']!r}: "
                       "distance to the target against cost")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="The cat sat on the")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smc_particles", default="1,4,16,64", help="SMC particle counts, comma-separated")
    ap.add_argument("--smc_runs", type=int, default=200, help="SMC runs per particle count (one sample each)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--report", action="store_true", help="only redraw constrained.png from <out>/constrained.json")
    args = ap.parse_args(argv)
    if args.report:
        plot(json.loads((Path(args.out) / "constrained.json").read_text()), Path(args.out) / "constrained.png")
        print(f"wrote {Path(args.out) / 'constrained.png'}")
        return 0
    torch.set_num_threads(2)
    t0 = time.perf_counter()

    from gfnlm.config import GFNConfig
    from gfnlm.models import load_model
    from gfnlm.patterns import RegexRule
    from gfnlm.rewards import LMLikelihoodReward, RewardBatch
    from gfnlm.sampling import Constraints
    from gfnlm.trainer import GFNTrainer

    model, tok = load_model(args.model)
    word_ids = [tok.encode(w, add_special_tokens=False) for w in WORDS]
    if any(len(w) != 1 for w in word_ids):
        raise SystemExit(f"each of {WORDS} must be one token of {args.model}")
    word_ids = [w[0] for w in word_ids]
    stop = tok.encode(".", add_special_tokens=False)[0]
    prompt = tok.encode(args.prompt, add_special_tokens=False)
    free = Constraints(stop_token_ids=[stop], min_new_tokens=1, max_new_tokens=4, allowed_token_ids=sorted(word_ids))
    masked = Constraints(stop_token_ids=[stop], min_new_tokens=1, max_new_tokens=4, allowed_token_ids=sorted(word_ids))
    masked.prefix_rule = RegexRule(PATTERN, tok, masked)
    everything = [list(s) for n in range(1, 5) for s in itertools.product(word_ids, repeat=n)]
    valid = [s for s in everything if masked.prefix_rule.matches(s)]
    lengths = torch.tensor([len(s) for s in valid], dtype=torch.float64)
    print(f"{len(everything)} strings, {len(valid)} match {PATTERN!r}", flush=True)

    # the target: log R = log p̃(Z "." | X) on the valid strings, from the task's own reward object
    reward = LMLikelihoodReward(model, tok, prefixes="terminal", constraints=free, renormalise=True)
    width = max(len(s) for s in valid)
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in valid])
    batch = RewardBatch(prompts=[args.prompt], prompt_ids=[prompt], prompt_index=torch.zeros(len(valid), dtype=torch.long),
                        tokens=tokens, lengths=lengths.long(), completions=[tok.decode(s) for s in valid], tokenizer=tok)
    log_r = reward(batch).double()
    log_z = float(torch.logsumexp(log_r, 0))
    log_pi = log_r - log_z

    rows = {}
    # rejection sampling from p̃ (no mask) with proposals of up to 5 tokens, those of at most 4 that match
    # kept (each ended with a real stop): its exact distribution, acceptance and cost per accepted sample
    proposal = Constraints(stop_token_ids=[stop], min_new_tokens=1, max_new_tokens=5, allowed_token_ids=sorted(word_ids))
    longer = everything + [list(s) for s in itertools.product(word_ids, repeat=5)]
    log_prop = exact(model, tok, prompt, proposal, longer)
    index = {tuple(s): i for i, s in enumerate(longer)}
    log_kept = log_prop[[index[tuple(s)] for s in valid]]
    p_valid = float(log_kept.exp().sum())
    calls = float((log_prop.exp() * (torch.tensor([len(s) for s in longer], dtype=torch.float64) + 1)).sum())
    rows["rejection sampling from p̃"] = dict(compare(log_pi, log_kept - math.log(p_valid), log_r, lengths),
                                             acceptance_rate=p_valid, lm_calls_per_sample=calls / p_valid)
    rows["locally constrained decoding"] = compare(log_pi, exact(model, tok, prompt, masked, valid), log_r, lengths)
    smc_rows = smc_estimates(model, tok, prompt, masked, valid, log_pi, args)
    rows.update(smc_rows)

    cfg = GFNConfig(model=args.model, max_steps=args.steps, learning_rate=args.lr, warmup_steps=10,
                    samples_per_prompt=16, prompts_per_step=1, replay_fraction=0.25, tempered_fraction=0.25,
                    chat_template="never", report_to=[], disable_tqdm=True, seed=args.seed, save_steps=0,
                    output_dir=str(Path("runs") / "bench-constrained"), min_new_tokens=1, max_new_tokens=4)
    train_reward = LMLikelihoodReward(model, tok, prefixes="stoppable", constraints=masked, renormalise=True,
                                      invalid_log_reward=-100.0)
    trainer = GFNTrainer(model, train_reward, cfg, train_dataset=[args.prompt], processing_class=tok,
                         constraints=masked)
    rows["GFlowNet, before training"] = compare(log_pi, exact(trainer.model, tok, prompt, masked, valid), log_r, lengths)
    t_train = time.perf_counter()
    history = trainer.train()
    t_train = time.perf_counter() - t_train
    rows[f"GFlowNet fine-tuning ({args.steps} steps)"] = compare(
        log_pi, exact(trainer.model, tok, prompt, masked, valid), log_r, lengths)

    head = ["KL(π‖q)", "KL(q‖π)", "TV", "ELBO", "satisfaction", "LM calls per sample", "TV noise floor"]
    keys = ["kl_target_to_q", "kl_q_to_target", "tv", "elbo", "satisfaction", "lm_calls_per_sample", "tv_noise_floor"]
    lines = [f"# Constrained posterior, enumerable: {args.model}", "",
             f"Prompt {args.prompt!r}; 1-4 of {len(WORDS)} words {WORDS}, stop \".\"; constraint `{PATTERN}` "
             f"({len(valid)} of {len(everything)} strings); target π ∝ p̃(Z . | X) c(Z), log Z = {log_z:.3f}; "
             f"P_p̃(c) = {p_valid:.4f}. Exact figures from scoring every string.", "",
             "| sampler | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join("exact" if k not in r else "n/a" if math.isnan(r[k]) else f"{r[k]:.4f}"
                                                 for k in keys) + " |")
    gfn = rows[f"GFlowNet fine-tuning ({args.steps} steps)"]
    local = rows["locally constrained decoding"]
    targets = {"100% satisfaction (GFlowNet)": (f"{gfn['satisfaction']:.4f}", gfn["satisfaction"] > 0.9999),
               "KL(π‖q) GFlowNet < locally constrained decoding":
                   (f"{gfn['kl_target_to_q']:.4f} vs {local['kl_target_to_q']:.4f}",
                    gfn["kl_target_to_q"] < local["kl_target_to_q"]),
               **smc_target(gfn, smc_rows)}
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {'yes' if ok else 'no'} |" for k, (v, ok) in targets.items()]
    lines += ["", f"Training: {args.steps} steps of 16 episodes (lr {args.lr}, seed {args.seed}) in {t_train:.0f} s; "
              f"loss {history[0]['loss']:.3g} -> {history[-1]['loss']:.3g}. Rejection sampling's cost is per accepted "
              f"sample (acceptance {p_valid:.4f}); each GFlowNet sample costs one policy pass."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "constrained.md").write_text(text)
    data = {"settings": vars(args), "pattern": PATTERN, "words": WORDS, "log_z": log_z, "p_valid": p_valid,
            "samplers": rows, "targets": {k: {"measured": v, "met": ok} for k, (v, ok) in targets.items()},
            "history": [{k: h[k] for k in ("loss", "reward/log_r_mean") if k in h} for h in history],
            "seconds": time.perf_counter() - t0}
    (out / "constrained.json").write_text(json.dumps(data, indent=1))
    plot(data, out / "constrained.png")
    print(f"wrote {out / 'constrained.md'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
