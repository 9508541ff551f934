"""Constrained posterior: the next sentence of a text under a hard constraint, q(Z | X) ∝ p_LM(Z "." | X) c(Z).

Same data, episode (one sentence, stop ".") and legal-token rule as :mod:`gfnlm.tasks.continuation`;
the constraint c comes in one of two forms:

* ``regex`` (default ``[^eE]+``: a lipogram, a sentence without the letter e): a pattern the whole
  sentence (without its full stop) must match. It is compiled to a prefix-aware action mask
  (:class:`gfnlm.patterns.RegexRule`) that the policy, the scoring pass and the reward share: after
  every prefix only the tokens from which a match stays reachable within the remaining length may be
  taken, and stopping is allowed only where the text matches. The policy never spends a sample where
  c = 0 (100% satisfaction by construction), and log q stays exact.
* ``keywords`` ("word1,word2"): a Python predicate on the finished text, every keyword present
  (case-insensitive). It cannot mask prefixes: log R = log p + 0 where it holds, else a floor far
  below any sentence's log-likelihood, at every prefix where the policy may stop.

Reward: log R(z_1:t ⊤) = log p̃_LM(z_1:t "." | X) + log c(z_1:t) at every prefix where the policy may
stop, p̃ the base LM renormalised over the legal tokens only (never over what c allows: locally
renormalising over c is the biased baseline below). Reward temperature 1: the target is the posterior
itself.

Evaluation (``gfnlm eval --task constrained``): on the validation prompts, n sentences per prompt from
the GFlowNet policy and from baselines on the base model: **locally constrained decoding** (the
base LM sampled under the same action mask, the LM's tokens renormalised step by step: every sample
satisfies c, but the distribution is p̃ with its mass pushed locally, not p̃ · c / Z), and **rejection
sampling** from p̃ (up to ``rejection_factor`` · n proposals per prompt, the first n accepted kept:
exactly the target, at the cost reported as LM token evaluations per accepted sample, with the
acceptance rate). Per method: constraint satisfaction (checked on the text with Python's ``re`` or the
predicate, independently of the mask), mean log p̃, diversity, length, cost, and where q is tractable
the ELBO, ESS and Var(log R - log q) against the target; and **SMC** with genlm-control
(:mod:`gfnlm.smc`) on the reward's own target, ``smc_particles`` particles per prompt (default n), n
samples resampled from them, with its log Ẑ. With keywords SMC's target treats a missing keyword as
c = 0 where the reward puts a floor of -(L log V) - 20: the same distribution up to that floor's mass.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

from ..diagnostics import elbo_text
from ..errors import ConfigError
from ..rewards import LMLikelihoodReward, PrefixRuleReward
from ..sampling import Constraints
from .continuation import ContinuationArgs, ContinuationTask


@dataclass
class ConstrainedArgs(ContinuationArgs):
    regex: str | None = "[^eE]+"  # the whole sentence (without its full stop) must match; ignored with keywords
    keywords: str | None = None  # "w1,w2": a terminal predicate instead of the regex
    baselines: str = "local,rejection,smc"
    rejection_factor: int = 20  # rejection sampling: up to this many times n proposals per prompt
    smc_particles: int = 0  # SMC (genlm-control): particles per prompt; 0 = n (about the LM calls of n samples)
    smc_ess_threshold: float = 0.5  # SMC resamples when the ESS falls below this fraction of the particles


class ConstrainedTask(ContinuationTask):
    name = "constrained"
    Args = ConstrainedArgs
    config_defaults = {**ContinuationTask.config_defaults, "task": "constrained", "reward_temperature": 1.0,
                       "reward_temperature_end": None, "reward_temperature_horizon": 0, "max_steps": 100,
                       "output_dir": "runs/constrained"}

    def __init__(self, task_args: dict | None = None):
        super().__init__(task_args)
        a = self.args
        if a.keywords is not None:
            self.words = [w.strip().lower() for w in str(a.keywords).split(",") if w.strip()]
            if not self.words:
                raise ConfigError("task_args.keywords is empty: give words separated by commas, or unset it for the regex")
        elif not a.regex:
            raise ConfigError("the constrained task needs task_args.regex (a pattern) or task_args.keywords (words)")
        else:
            self.words = None
            from ..patterns import compile_pattern

            compile_pattern(a.regex)  # a bad pattern stops here, before any model is loaded

    # --- the constraint ---------------------------------------------------------------------------
    def satisfied(self, text: str) -> bool:
        """c(Z) on a sentence's text (without its full stop), checked with Python's ``re`` or the
        keyword predicate: independent of the action mask."""
        if self.words is not None:
            low = text.lower()
            return all(w in low for w in self.words)
        return re.fullmatch(self.args.regex, text, flags=re.ASCII) is not None  # interegular's classes are ASCII

    def constraints(self, config, tokenizer) -> Constraints:
        """The continuation's sentence constraint, plus the regex as a prefix-aware mask (not with keywords)."""
        from ..patterns import RegexRule

        c = super().constraints(config, tokenizer)
        if self.words is None:
            if c.prefix_rule is not None:
                raise ConfigError("a regex constraint and no_repeat_ngram_size cannot be combined (one prefix rule a "
                                  "run): set no_repeat_ngram_size 0, or constrain with keywords")
            c.prefix_rule = RegexRule(self.args.regex, tokenizer, c)
        return c

    def floor(self, constraints: Constraints, tokenizer) -> float:
        """log R where c = 0: below any sentence's log p̃ (-(L log V) - 20)."""
        v = len(constraints.allowed_token_ids or tokenizer) + 1
        return -(constraints.max_new_tokens * math.log(v)) - 20.0

    def reward_funcs(self, model, tokenizer, constraints, config=None) -> list:
        """log R(z_1:t ⊤) = log p̃(z_1:t "." | X) + log c(z_1:t) at every stoppable prefix (with the regex
        only the prefixes that match are stoppable; with keywords a floor where they are missing)."""
        floor = self.floor(constraints, tokenizer)
        lm = LMLikelihoodReward(model, tokenizer, prefixes="stoppable", constraints=constraints, renormalise=True,
                                invalid_log_reward=floor, name="sentence_likelihood")
        if self.words is None:
            return [lm]

        def keywords_present(prompt: str, text: str) -> float:
            return 0.0 if self.satisfied(text) else floor

        return [lm, PrefixRuleReward(keywords_present, name="keywords_present")]

    # --- evaluation -------------------------------------------------------------------------------
    def baseline_specs(self, config, names: list[str]) -> list[dict]:
        n = self.args.eval_samples
        specs = []
        for m in names:
            if m == "local" and self.words is None:
                specs.append({"label": "locally constrained decoding", "method": "local", "k": n, "marker": "o"})
            elif m == "rejection":
                specs.append({"label": f"rejection sampling (<= {self.args.rejection_factor * n} proposals)",
                              "method": "rejection", "k": n, "marker": "s"})
            elif m == "smc":
                specs.append({"label": f"SMC, genlm-control ({self.args.smc_particles or n} particles)", "method": "smc",
                              "k": n, "marker": "P"})
            elif m != "local":
                raise ConfigError(f"unknown constrained baseline {m!r}: choose from local, rejection, smc")
        return specs

    def _samplers(self, model, base, tokenizer, config, constraints, rows, specs, *, seed: int, progress: bool) -> dict:
        """The policy's samples (``model``), locally constrained decoding (``base`` under the same mask)
        and rejection sampling (``base`` without the constraint, the first n accepted kept)."""
        from ..data import render_prompt
        from ..evaluation import sample_per_prompt
        from ..policy import base_model

        n = self.args.eval_samples
        prompts = [render_prompt(tokenizer, r["prompt"], config.chat_template) for r in rows]
        out: dict[str, dict] = {}

        def run(lm, cons, k, desc):
            got = sample_per_prompt(lm, tokenizer, prompts, cons, k, seed=seed, batch_prompts=4, progress=progress,
                                    desc=desc)
            return [s for s, _, _ in got], [q for _, q, _ in got]

        def per_sample(comps):  # LM token evaluations per sample: its tokens and the stop
            return statistics.fmean(len(c) + 1 for cs in comps for c in cs)

        if model is not None:
            comps, log_q = run(model, constraints, n, "GFlowNet policy")
            out["GFlowNet fine-tuning"] = {"completions": comps, "log_q": log_q, "k": n, "marker": "*",
                                           "model_calls": per_sample(comps)}
        # rejection proposals may run one token past max_new_tokens: a proposal kept (at most max_new_tokens
        # tokens) then ended with a real stop, so it has probability p̃(Z "." | X), exactly the target's
        N = constraints.max_new_tokens
        free = Constraints(stop_token_ids=constraints.stop_token_ids, min_new_tokens=constraints.min_new_tokens,
                           max_new_tokens=N + 1, allowed_token_ids=constraints.allowed_token_ids,
                           forbidden_token_ids=constraints.forbidden_token_ids)
        with base_model(base) as b:
            for sp in specs:
                if sp["method"] == "local":
                    comps, log_q = run(b, constraints, n, sp["label"])
                    out[sp["label"]] = {"completions": comps, "log_q": log_q, "k": n, "marker": sp["marker"],
                                        "model_calls": per_sample(comps)}
                    continue
                if sp["method"] == "smc":  # the reward's LM term; the keywords as a terminal predicate
                    funcs = self.reward_funcs(b, tokenizer, constraints, config)
                    lm = [(f, w) for f, w in zip(funcs, config.reward_weights or [1.0] * len(funcs))
                          if isinstance(f, LMLikelihoodReward)]
                    m = self._smc(b, tokenizer, config, constraints, rows, [f for f, _ in lm], [w for _, w in lm],
                                  seed=seed, progress=progress,
                                  label=sp["label"], predicate=None if self.words is None else
                                  (lambda ids: self.accepts(tokenizer, constraints, ids)))
                    m["model_calls"] = sum(m.pop("calls")) / max(1, sum(len(c) for c in m["completions"]))
                    out[sp["label"]] = m
                    continue
                proposals, _ = run(b, free, self.args.rejection_factor * n, sp["label"])
                kept, cost, flags = [], 0, []
                for ps in proposals:
                    ok = [len(p) <= N and self.accepts(tokenizer, constraints, p) for p in ps]
                    flags += ok
                    mine = []
                    for p, good in zip(ps, ok):  # proposals drawn until the n-th acceptance (or the budget)
                        if len(mine) == n:
                            break
                        cost += len(p) + 1
                        if good:
                            mine.append(p)
                    kept.append(mine)
                accepted = sum(len(k) for k in kept)
                out[sp["label"]] = {"completions": kept, "log_q": None, "k": n, "marker": sp["marker"],
                                    "model_calls": cost / max(accepted, 1), "accepted": accepted,
                                    "acceptance_rate": statistics.fmean(flags)}
        return out

    def accepts(self, tokenizer, constraints, ids) -> bool:
        """c(Z) as the target defines it: the regex rule's own match (its automaton), or the predicate."""
        rule = constraints.prefix_rule
        if rule is not None:
            return rule.matches(list(ids))
        return self.satisfied(tokenizer.decode(ids, skip_special_tokens=True))

    def evaluate(self, model, tokenizer, config, constraints, *, n: int | None = None, seed: int = 0,
                 progress: bool = False, baselines: bool = True, base=None, **kw) -> dict:
        """Per method on the first ``n`` validation prompts: satisfaction, mean log p̃(Z "." | X) of the
        samples that satisfy c, diversity, length, cost, and the diagnostics against p̃ · c where q is
        tractable. A prompt where rejection sampling accepted nothing counts in its acceptance rate but
        not in its other figures."""
        from ..evaluation import completion_log_rewards

        a = self.args
        rows, base = self._eval_setup(model, config, n, base)
        reward = self.reward_funcs(base, tokenizer, constraints, config)
        names = [m.strip() for m in a.baselines.split(",") if m.strip()] if baselines else []
        methods = self._samplers(model, base, tokenizer, config, constraints, rows, self.baseline_specs(config, names),
                                 seed=seed, progress=progress)
        results = {"prompts": len(rows), "n": a.eval_samples, "constraint": self.describe(),
                   "embedding_model": a.embedding_model, "max_new_tokens": constraints.max_new_tokens, "methods": {}}
        for label, m in methods.items():
            ok_rows = [i for i, cs in enumerate(m["completions"]) if cs]
            comps = [m["completions"][i] for i in ok_rows]
            if not comps:  # rejection sampling accepted nothing within its budget
                nan = float("nan")
                results["methods"][label] = {"satisfaction": nan, "mean_log_p": nan, "diversity": nan,
                                             "length_tokens": nan, "prompts_with_samples": 0, "samples_per_prompt": 0,
                                             "marker": m["marker"], "model_calls_per_sample": m["model_calls"],
                                             "acceptance_rate": m.get("acceptance_rate", nan)}
                continue
            sat = [self.satisfied(tokenizer.decode(c, skip_special_tokens=True)) for cs in comps for c in cs]
            logp = completion_log_rewards(config, tokenizer, [rows[i] for i in ok_rows], reward, constraints, comps)
            sub = dict(m, log_q=None if m["log_q"] is None else [m["log_q"][i] for i in ok_rows])
            r = {"satisfaction": statistics.fmean(sat) if sat else float("nan"),
                 "mean_log_p": statistics.fmean(statistics.fmean(v) for v in logp),
                 "prompts_with_samples": len(ok_rows)}
            if "acceptance_rate" in m:
                r["acceptance_rate"] = m["acceptance_rate"]
            if "log_ml" in m:  # SMC's estimate of log Z (unbiased in Z) over all prompts (-inf where every particle died)
                r["smc_log_z"] = statistics.fmean(m["log_ml"])
                r["smc_prompts_without_samples"] = len(rows) - len(ok_rows)
            if len({len(cs) for cs in comps}) == 1:
                r.update(self._method_row(tokenizer, sub, comps, logp))
            else:  # rejection sampling kept fewer than n on some prompts: no per-prompt diagnostics
                r.update(self._method_row(tokenizer, dict(sub, log_q=None), comps, logp))
            r["model_calls_per_sample"] = r.pop("model_calls_per_prompt")
            results["methods"][label] = r
        return results

    def describe(self) -> str:
        return f"keywords {', '.join(self.words)}" if self.words is not None else f"regex {self.args.regex}"

    def table(self, results: dict) -> str:
        return constrained_table(results)

    def plot(self, results: dict, path) -> None:
        from ..evaluation import scatter_plot

        pts = [{"label": k, "diversity": r["diversity"], "mean_log_p": r["mean_log_p"], "marker": r["marker"]}
               for k, r in results["methods"].items()]
        scatter_plot(pts, path, x="diversity", y="mean_log_p", xlabel="diversity (1 - mean pairwise cosine)",
                     ylabel="mean log p(Z . | X)", title=f"Constrained posterior ({results['constraint']})")


def constrained_table(results: dict) -> str:
    lines = ["| method | satisfaction | mean log p | diversity | length | LM calls per sample | acceptance | ELBO | "
             "log Z est. (IW / SMC) | ESS | Var(log R - log q) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        d = r.get("diagnostics")
        z = f"{r['smc_log_z']:.2f}" if "smc_log_z" in r else "n/a"
        diag = (f"{elbo_text(d)} | {d['iw_bound']:.2f} | {d['ess']:.3f} | {d['log_w_var']:.2f}" if d
                else f"n/a | {z} | n/a | n/a")
        acc = f"{r['acceptance_rate']:.3f}" if "acceptance_rate" in r else "—"
        lines.append(f"| {name} | {r['satisfaction']:.3f} | {r['mean_log_p']:.2f} | {r['diversity']:.3f} | "
                     f"{r['length_tokens']:.1f} | {r['model_calls_per_sample']:.1f} | {acc} | {diag} |")
    lines.append(f"\n{results['prompts']} validation prompts, n = {results['n']}; constraint: {results['constraint']}; "
                 "log p = log p̃_LM(Z \".\" | X) over the legal tokens; LM calls = tokens read per sample kept (rejection "
                 "sampling: every proposal, per accepted sample; SMC: the rows of the LM's forward passes over the "
                 "samples it returns); satisfaction checked with Python's re (ASCII); diagnostics against p̃ · c; "
                 "log Z est.: the importance-weighted bound of the sampler's own samples, or SMC's log Ẑ (both lower "
                 "bounds on log Z in expectation)")
    return "\n".join(lines)
