"""Contrastive posterior: a continuation specific to its prompt, q(Z | X) ∝ p_LM(Z "." | X)^a p_LM(Z ".")^b
with b < 0 < a.

Same data, episode (one sentence, stop ".") and sentence constraint as :mod:`gfnlm.tasks.continuation`,
plus one more rule of the target: no token 3-gram twice in a sentence (``no_repeat_ngram_size: 3``,
:class:`gfnlm.patterns.NoRepeatRule`, c(Z) = 0 otherwise), masked for the policy, its reward and every
baseline. The reward is two instances of the one :class:`~gfnlm.rewards.LMLikelihoodReward`, summed in
log space by the trainer: weight a with the prompt as context, weight b with the unconditional context
U, both renormalised over the legal tokens and scored at every prefix where the policy may stop.

Defaults a = 1.5, b = -0.5. Written with the pointwise mutual information PMI = log p(Z|X) - log p(Z),
log R = (a + b) log p(Z) + a PMI: a + b = 1 keeps the LM's own fluency term at full weight and adds a
bonus of 1.5 nats per nat of PMI. With a + b <= 0 the reward stops preferring fluent text (unlikely
strings gain reward), so it is refused. a + b = 1 also makes the token-level baseline exactly
classifier-free guidance with scale a.

Default U = "The following is an excerpt from a web page." (the prompts are web text), a neutral
"domain premise" in the sense of Holtzman et al. (2021, surface form competition), not the empty
context. Why both defaults, measured on SmolLM2-135M (``bench/contrastive_context.py``, 10 validation
prompts, 8 sampled sentences each, 51 tokens each repeated 24 times): with U = "<|endoftext|>" (the
first default) the model given only that token finds each repeat of a token ever less likely while the
prompted model copies it, so repeated-token junk gets a PMI of 22 nats on average and 15.7 % of the
junk strings outrank the best sentence of their prompt (the best by 101 nats on average; a GFlowNet run found
"LEGATO" x 24 and had by far the highest ELBO); with the natural U the junk PMI is -2.9 and the margin 4
nats, still 6.1 % above the best sentence, because an LM finds a copied loop more likely than a fresh
sentence under any context. The n-gram rule removes the loops from the target itself.
``no_repeat_ngram_size: 0`` and ``task_args.unconditional_context "<|endoftext|>"`` give the first target.

Evaluation (``gfnlm eval --task contrastive``): on the validation prompts, ``eval_samples`` (n) sentences
per prompt from the GFlowNet policy and from baselines on the base model: plain and tempered sampling
from p(Z|X); best-of-k·n reranking by R (k·n samples from p(Z|X), the n with the highest R kept);
the token-level approximation (each token from p(z_t | X, z_<t)^a p(z_t | U, z_<t)^b renormalised,
transformers' classifier-free guidance); SMC with genlm-control (:mod:`gfnlm.smc`) on the reward's two
terms, ``smc_particles`` per prompt (default n), n samples resampled, with its log Ẑ. Per method: mean log R, mean PMI, mean fluency log p(Z|X),
diversity, length, LM token evaluations per prompt, and for every sampler with a tractable q the
ELBO E_q[log R - log q] on the same target (ELBO = log Z - KL(q || target): the highest ELBO is the
sampler closest to the posterior), with the importance-weighted bound, ESS and Var(log R - log q).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


from ..diagnostics import elbo_text
from ..errors import ConfigError
from ..evaluation import md_cell
from ..rewards import LMLikelihoodReward
from .continuation import ContinuationArgs, ContinuationTask


@dataclass
class ContrastiveArgs(ContinuationArgs):
    a: float = 1.5  # exponent of p(Z | X)
    b: float = -0.5  # exponent of p(Z): negative
    unconditional_context: str = "The following is an excerpt from a web page."  # U; "" = the tokenizer's BOS alone
    baselines: str = "sampling,tempered,best_of,token_level,smc"
    smc_particles: int = 0  # SMC (genlm-control): particles per prompt; 0 = n
    smc_ess_threshold: float = 0.5  # SMC resamples when the ESS falls below this fraction of the particles
    tempered_temperature: float = 0.8
    rerank_factors: str = "2,5"  # best-of: k·n samples per prompt, n kept


class ContrastiveTask(ContinuationTask):
    name = "contrastive"
    Args = ContrastiveArgs
    config_defaults = {**ContinuationTask.config_defaults, "task": "contrastive", "reward_temperature": 1.0,
                       "reward_temperature_end": None, "reward_temperature_horizon": 0, "max_steps": 100,
                       "no_repeat_ngram_size": 3,
                       "output_dir": "runs/contrastive"}

    def __init__(self, task_args: dict | None = None):
        super().__init__(task_args)
        a = self.args
        if not a.b < 0 < a.a:
            raise ConfigError(f"the contrastive posterior needs b < 0 < a (got a = {a.a:g}, b = {a.b:g}): set task_args.a "
                              "and task_args.b")
        if a.a + a.b <= 0:
            raise ConfigError(f"a + b = {a.a + a.b:g} <= 0 rewards unlikely text without bound: keep a + b > 0 "
                              "(the default a = 1.5, b = -0.5 gives 1)")

    def unconditional(self, tokenizer) -> str:
        """The text of the unconditional context U."""
        return self.args.unconditional_context

    def unconditional_ids(self, tokenizer) -> list[int]:
        """The token ids of U, as the token-level sampler reads them (its BOS where U is empty)."""
        return tokenizer(self.unconditional(tokenizer))["input_ids"] or [tokenizer.bos_token_id]

    def proposal(self, model, tokenizer, constraints, config):
        """The token-level contrastive sampler on the base model (adapters off) as the proposal of
        ``proposal_fraction`` episodes: each token from p(z_t | X, z_<t)^a p(z_t | U, z_<t)^b renormalised,
        the local form of the posterior (the ``token_level`` baseline). Training on its episodes as well
        as the policy's own moves the policy towards the regions of high R sooner; the target and the
        loss are unchanged (GFlowNet losses are off-policy). Its per-step distributions
        (:meth:`TokenLevelProposal.step_logits`) are the soft labels of ``gfnlm sft --from_proposal K --soft``."""
        from ..policy import adapter_layers

        if not adapter_layers(model):
            raise ConfigError("the contrastive proposal samples the base model with the adapters off: train LoRA "
                              "(use_peft true), or do without it (proposal_fraction 0; no --from_proposal)")
        return TokenLevelProposal(model, tokenizer, constraints, self.unconditional_ids(tokenizer),
                                  (self.args.a, self.args.b))

    def terms(self, model, tokenizer, constraints, weights=None) -> list:
        """The two LM terms: log p̃(z_1:t "." | X) with weight a and log p̃(z_1:t "." | U) with weight b."""
        a, b = weights or (self.args.a, self.args.b)
        u = self.unconditional(tokenizer)
        common = dict(prefixes="stoppable", constraints=constraints, renormalise=True)
        return [LMLikelihoodReward(model, tokenizer, weight=a, name="conditional", **common),
                LMLikelihoodReward(model, tokenizer, context=lambda row: u, weight=b, name="unconditional", **common)]

    def reward_funcs(self, model, tokenizer, constraints, config=None) -> list:
        """log R(z_1:t ⊤) = a log p̃(z_1:t "." | X) + b log p̃(z_1:t "." | U) at every stoppable prefix."""
        return self.terms(model, tokenizer, constraints)

    # evaluation
    def baseline_specs(self, config, names: list[str]) -> list[dict]:
        n, a = self.args.eval_samples, self.args
        specs = []
        for m in names:
            if m == "sampling":
                specs.append({"label": f"sampling p(Z|X) ({n})", "method": "sampling", "k": n, "keep": n, "marker": "o",
                              "kw": {}})
            elif m == "tempered":
                t = a.tempered_temperature
                specs.append({"label": f"tempered T={t:g} ({n})", "method": "tempered", "k": n, "keep": n, "marker": "o",
                              "kw": {"temperature": t}})
            elif m == "token_level":
                specs.append({"label": f"token-level contrastive ({n})", "method": "token_level", "k": n, "keep": n,
                              "marker": "D", "kw": {"weights": (a.a, a.b)}})
            elif m == "best_of":
                for f in [int(x) for x in a.rerank_factors.split(",") if x.strip()]:
                    specs.append({"label": f"best-of-{f * n} by R ({n})", "method": "sampling", "k": f * n, "keep": f * n,
                                  "marker": "s", "kw": {}, "rerank": n})
            elif m != "smc":  # SMC is run by evaluate itself
                raise ConfigError(f"unknown contrastive baseline {m!r}: choose from sampling, tempered, best_of, "
                                  "token_level, smc")
        return specs

    def evaluate(self, model, tokenizer, config, constraints, *, n: int | None = None, seed: int = 0,
                 progress: bool = False, baselines: bool = True, base=None, **kw) -> dict:
        """Mean log R, PMI, fluency, diversity, length and cost per method; the ELBO (and the other
        diagnostics) on R for every sampler with a tractable q. ``model`` None: baselines only."""
        from ..evaluation import completion_log_rewards

        a = self.args
        rows, base = self._eval_setup(model, config, n, base)
        cond, uncond = self.terms(base, tokenizer, constraints, weights=(1.0, 1.0))
        names = [m.strip() for m in a.baselines.split(",") if m.strip()] if baselines else []
        specs = self.baseline_specs(config, names)
        if specs:  # the token-level sampler's unconditional branch reads U
            u_ids = self.unconditional_ids(tokenizer)
            for sp in specs:
                if sp["method"] == "token_level":
                    sp["kw"]["negative_prompt"] = u_ids
        methods = self._samplers(model, base, tokenizer, config, constraints, rows, specs, seed=seed, progress=progress)
        if "smc" in names:  # on the reward's own two terms
            from ..policy import base_model

            label = f"SMC, genlm-control ({a.smc_particles or a.eval_samples} particles)"
            with base_model(base) as b:
                m = self._smc(b, tokenizer, config, constraints, rows, self.terms(b, tokenizer, constraints),
                              config.reward_weights, seed=seed, progress=progress, label=label)
            m["model_calls"] = statistics.fmean(m.pop("calls"))
            methods[label] = m
        rerank = {sp["label"]: sp["rerank"] for sp in specs if "rerank" in sp}
        out = {"prompts": len(rows), "n": a.eval_samples, "a": a.a, "b": a.b,
               "unconditional_context": self.unconditional(tokenizer), "embedding_model": a.embedding_model, "methods": {}}
        for label, m in methods.items():
            comps = m["completions"]
            c = completion_log_rewards(config, tokenizer, rows, [cond], constraints, comps)
            u = completion_log_rewards(config, tokenizer, rows, [uncond], constraints, comps)
            log_r = [[a.a * x + a.b * y for x, y in zip(cs, us)] for cs, us in zip(c, u)]
            if label in rerank:  # keep the n samples with the highest R (their scoring is part of the cost)
                keep = [sorted(range(len(lr)), key=lambda i: -lr[i])[:rerank[label]] for lr in log_r]
                m["model_calls"] += statistics.fmean(sum(len(x) + 1 for x in cs) for cs in comps)
                comps = [[cs[i] for i in kk] for cs, kk in zip(comps, keep)]
                c, u, log_r = ([[v[i] for i in kk] for v, kk in zip(x, keep)] for x in (c, u, log_r))
                m["log_q"] = None  # the kept samples' distribution has no tractable q
            flat = lambda v: statistics.fmean(x for row in v for x in row)  # noqa: E731
            r = {"mean_log_r": flat(log_r), "max_log_r": statistics.fmean(max(v) for v in log_r),
                 "mean_pmi": flat([[x - y for x, y in zip(cs, us)] for cs, us in zip(c, u)]), "mean_log_p": flat(c),
                 **self._method_row(tokenizer, m, comps, log_r)}
            if "log_ml" in m:  # SMC's estimate of log Z (unbiased in Z)
                r["smc_log_z"] = statistics.fmean(m["log_ml"])
            out["methods"][label] = r
        return out

    def table(self, results: dict) -> str:
        return contrastive_table(results)

    def plot(self, results: dict, path) -> None:
        """Mean log R against diversity, one point per sampler."""
        contrastive_plot(results, path)


def contrastive_table(results: dict) -> str:
    """One row per sampler: mean log R, PMI, fluency, diversity, length, cost; ELBO and the other
    diagnostics on R where q is tractable."""
    lines = ["| method | samples | mean log R | target's mean log R (SNIS) | mean PMI | mean log p(Z\\|X) | diversity | "
             "length | LM token evals | ELBO | IW bound / SMC log Ẑ | ESS | Var(log R - log q) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        d = r.get("diagnostics")
        z = f"{r['smc_log_z']:.2f}" if "smc_log_z" in r else "n/a"
        diag = (f"{elbo_text(d)} | {d['iw_bound']:.2f} | {d['ess']:.3f} | {d['log_w_var']:.2f}" if d
                else f"n/a | {z} | n/a | n/a")
        snis = f"{d['target_mean_log_r']:.2f}" if d and "target_mean_log_r" in d else "n/a"
        lines.append(f"| {md_cell(name)} | {r['samples_per_prompt']} | {r['mean_log_r']:.2f} | {snis} | {r['mean_pmi']:.2f} | "
                     f"{r['mean_log_p']:.2f} | {r['diversity']:.3f} | {r['length_tokens']:.1f} | "
                     f"{r['model_calls_per_prompt']:.0f} | {diag} |")
    lines.append(f"\n{results['prompts']} validation prompts; R = p̃(Z.|X)^{results['a']:g} p̃(Z.|U)^{results['b']:g}, "
                 f"U = {results['unconditional_context']!r}; p̃ renormalised over the legal tokens; PMI = log p̃(Z.|X) - "
                 f"log p̃(Z.|U); diversity = 1 - mean pairwise cosine ({results['embedding_model']}); ELBO = log Z - "
                 "KL(q || target) on the same target for every sampler with a tractable q; the IW bound and SMC's log Ẑ "
                 "are both lower bounds on log Z in expectation; the target's mean log R is E_p[log R], what a sampler "
                 "that matched the target would score, estimated from that row's samples by self-normalised importance "
                 "sampling (low where q misses high-reward regions)")
    return "\n".join(lines)


def contrastive_plot(results: dict, path) -> None:
    """Mean log R against diversity, one point per sampler."""
    from ..evaluation import scatter_plot

    pts = [{"label": name, "diversity": r["diversity"], "mean_log_r": r["mean_log_r"], "marker": r["marker"]}
           for name, r in results["methods"].items()]
    scatter_plot(pts, path, x="diversity", y="mean_log_r", xlabel="diversity (1 - mean pairwise cosine)",
                 ylabel="mean log R = a log p(Z.|X) + b log p(Z.)",
                 title=f"Contrastive posterior, a = {results['a']:g}, b = {results['b']:g}, "
                       f"{results['prompts']} validation prompts")


class TokenLevelProposal:
    """The token-level contrastive sampler on the base model (adapters off): a
    :data:`gfnlm.rollout.Proposal` that also gives its per-step distributions.

    ``model``: the policy's LM (its adapters are switched off here); ``u_ids``: the token ids of the
    unconditional context U; ``weights``: (a, b)."""

    def __init__(self, model, tokenizer, constraints, u_ids: list[int], weights: tuple[float, float]):
        from ..policy import BaseLM

        self.lm, self.tokenizer, self.constraints = BaseLM(model), tokenizer, constraints
        self.u_ids, self.weights = list(u_ids), weights

    def __call__(self, prompt_ids: list[list[int]], counts: list[int], seed: int) -> list[list[list[int]]]:
        """``counts[p]`` episodes of prompt p (token ids, no stop), through transformers' ``generate``
        with classifier-free guidance (:func:`gfnlm.baselines.decode`)."""
        from ..baselines import decode

        out: list[list[list[int]]] = [[] for _ in prompt_ids]
        with self.lm() as base:
            for k in sorted(set(counts) - {0}):  # the prompts that need k episodes: one decode, seeded seed + k
                rows = [i for i, c in enumerate(counts) if c == k]
                got = decode(base, self.tokenizer, [prompt_ids[i] for i in rows], self.constraints, "token_level", k,
                             weights=self.weights, negative_prompt=self.u_ids, seed=seed + k)
                for i, d in zip(rows, got):
                    out[i] = d.completions
        return out

    def step_logits(self, prompts: list[list[int]], prompt_index, tokens, lengths, pad_id: int = 0):
        """The sampler's log-weights of the next token at every prefix t = 0..N of each episode,
        a·log p(. | X, z_<t) + b·log p(. | U, z_<t) (each a full-vocabulary log-softmax in fp32, as the
        guidance of ``generate`` combines them): [B, N+1, V], log space up to a constant per state.
        :func:`gfnlm.scoring.action_log_probs` of it is the sampler's constrained distribution.

        ``prompts``: P prompts (token ids); ``prompt_index`` [B]; ``tokens`` [B, N]; ``lengths`` [B]."""
        import torch

        from ..scoring import completion_logits

        a, b = self.weights
        with self.lm() as base, torch.no_grad():
            lx, _ = completion_logits(base, prompts, prompt_index, tokens, lengths, pad_id)
            lu, _ = completion_logits(base, [self.u_ids], torch.zeros_like(prompt_index), tokens, lengths, pad_id)
        return a * lx.float().log_softmax(-1) + b * lu.float().log_softmax(-1)
