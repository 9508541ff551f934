"""Sentence continuation, the paper's Figure 3: sample the next sentence of a text from the tempered
posterior q(Z | X) ∝ p_LM(Z "." | X)^(1/T).

Data: web-text prompts, one a line (``../shared/data/openwebtext/prompts.txt``, or the user's own
file). A fixed split with ``split_seed``: the first ``valid_prompts`` of a seeded shuffle are the
validation prompts (evaluation only, never trained on), the next ``train_prompts`` the training
prompts. A prompt is used without its trailing space: the continuation writes its own leading space,
as a BPE tokenizer spells the next word.

Episode: Z is one sentence, 1 to ``max_new_tokens`` (24) tokens; the stop action is its full stop
".". The illegal tokens (:func:`legal_in_sentence`) are one constraint shared by the policy, the
reward and every baseline: masked everywhere (never penalised), so each of them is a distribution
over the same set of sentences. Illegal are newlines, other sentence ends ("!", "?" and any token
holding a "." besides the stop itself), quote characters (contractions such as "'s" stay legal),
runs of two or more punctuation marks, URL fragments, single capital letters other than "A" and "I"
(initials), common abbreviations that take a full stop (Mr, Dr, St, ...) and the special tokens:
the cases of the paper code's list (``configs/task/openwebtext_gpt2.yaml``), which penalised them by
-50 instead.

Reward: log R(z_1:t ⊤) = log p̃_LM(z_1:t "." | X) at every prefix where the policy may stop, from one
pass of the base LM (the engine's one :class:`~gfnlm.rewards.LMLikelihoodReward`), with p̃ the LM
renormalised over the legal tokens and the stop. The trainer divides it by the reward temperature
T, annealed from ``reward_temperature`` (1.0) to ``reward_temperature_end`` (0.8) over
``reward_temperature_horizon`` steps: the target of a finished run is p̃^(1/0.8).

Evaluation (``gfnlm eval --task continuation``): on the validation prompts, ``eval_samples`` (n = 8)
sentences per prompt from the GFlowNet policy and from the baselines of :mod:`gfnlm.baselines` (the
base model through transformers' ``generate``, same constraint and stop) at n and at 5n: per prompt
the max and mean log p̃(Z "." | X), the diversity (1 - mean pairwise cosine similarity of
sentence-transformers embeddings), the mean length; averaged over prompts. Every sampler with a
tractable q (the policy, plain, tempered and nucleus sampling) also gets the diagnostics against the
final target p̃^(1/T_end): ELBO, importance-weighted bound, ESS and Var(log R - log q). ``--plot``
writes Figure 3: max log-likelihood against diversity, one point per method.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import read_utf8, render_prompt
from ..diagnostics import elbo_text
from ..errors import DataError
from ..rewards import LMLikelihoodReward
from ..sampling import Constraints
from ..trainer import constraints_from_config
from . import Task

END = "."  # the stop action: the sentence's full stop
QUOTES = "\"“”„‟«»`‘’'"
CONTRACTION = re.compile(r"^['’](s|t|re|ve|ll|d|m|S|T|RE|VE|LL|D|M)$")
ABBREVIATIONS = {"Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Prof", "Gen", "Gov", "Sen", "Rep", "Lt", "Col", "Sgt",
                 "Capt", "Mt", "Ft", "Inc", "Ltd", "Co", "Corp", "vs", "etc", "approx", "Jan", "Feb", "Aug", "Sept",
                 "Oct", "Nov", "Dec", "No", "Vol", "Fig", "al", "eg", "ie"}
URL_PARTS = ("http", "www", "://", ".com", ".org", ".net", "/", "\\", "@")


def legal_in_sentence(text: str) -> bool:
    """Whether a token (its decoded text) may be written inside one sentence. See the module doc."""
    if not text or any(c in text for c in "\n\r\t.!?…"):
        return False
    if any(c in text for c in QUOTES) and not CONTRACTION.match(text):
        return False
    if any(p in text.lower() for p in URL_PARTS):
        return False
    if re.search(r"[^\w\s]{2,}", text):  # a run of punctuation: "),", "--", ";)"
        return False
    word = text.strip()
    if len(word) == 1 and word.isupper() and word not in ("A", "I"):  # an initial
        return False
    return word not in ABBREVIATIONS


# --- data ---------------------------------------------------------------------------------------
def load_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one a line, without surrounding whitespace; duplicates dropped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file {path} not found: give task_args.data_file (one prompt a line)")
    seen: dict[str, None] = {}
    for line in read_utf8(p).splitlines():
        if line.strip():
            seen.setdefault(" ".join(line.split()), None)
    if not seen:
        raise DataError(f"prompt file {path} holds no prompts: give one prompt a line")
    return list(seen)


def split_prompts(prompts: list[str], seed: int, n_valid: int, n_train: int) -> dict[str, list[dict]]:
    """Seeded shuffle: the first ``n_valid`` are validation rows, the next ``n_train`` training rows."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    rows = [{"prompt": prompts[i]} for i in order]
    return {"valid": rows[:n_valid], "train": rows[n_valid:n_valid + n_train]}


# --- the task -----------------------------------------------------------------------------------
@dataclass
class ContinuationArgs:
    data_file: str = "../shared/data/openwebtext/prompts.txt"
    split_seed: int = 0
    valid_prompts: int = 50
    train_prompts: int = 950
    eval_prompts: int = 50
    eval_samples: int = 8  # n of the paper's Figure 3
    compute_factor: int = 5  # the baselines' "5x compute" rows: 5n samples, or 5n beams returning n
    baselines: str = "greedy,beam,diverse_beam,nucleus,sampling,tempered"
    diversity_penalty: float = 1.0  # diverse beam search's Hamming penalty (the paper's code: 1.0, n groups)
    embedding_model: str = "all-MiniLM-L6-v2"


class ContinuationTask(Task):
    name = "continuation"
    Args = ContinuationArgs
    config_defaults = {
        "task": "continuation",
        "chat_template": "never",
        "stop_tokens": [END],
        "min_new_tokens": 1,
        "max_new_tokens": 24,
        "loss_type": "modified_subtb",
        "samples_per_prompt": 8,
        "prompts_per_step": 2,
        "tempered_fraction": 0.5,
        "replay_fraction": 0.25,
        "reward_temperature": 1.0,
        "reward_temperature_end": 0.8,
        "reward_temperature_horizon": 120,
        "learning_rate": 3e-4,  # the settings bench/text_posteriors.py measured
        "warmup_steps": 10,
        "max_steps": 120,
        "output_dir": "runs/continuation",
    }

    def __init__(self, task_args: dict | None = None):
        super().__init__(task_args)
        self._split: dict[str, list[dict]] | None = None

    # data
    def split(self) -> dict[str, list[dict]]:
        if self._split is None:
            a = self.args
            self._split = split_prompts(load_prompts(self.data_file(a.data_file)), a.split_seed, a.valid_prompts,
                                        a.train_prompts)
            if not self._split["train"]:
                raise DataError(f"{a.data_file}: no training prompts left after {a.valid_prompts} validation prompts: "
                                "lower task_args.valid_prompts or give more prompts")
        return self._split

    def dataset(self) -> list[dict]:
        return self.split()["train"]

    def eval_rows(self) -> list[dict]:
        return self.split()["valid"]

    def prompt_of(self, columns: dict) -> str:
        text = " ".join(super().prompt_of(columns).split())
        if not text:
            raise DataError("the prompt is empty: give the text to continue with --prompt TEXT")
        return text

    # policy and reward
    def constraints(self, config, tokenizer) -> Constraints:
        """The one sentence constraint: legal tokens (:func:`legal_in_sentence`, no special token) as
        actions, "." as the stop. The reward renormalises over it and the baselines suppress the rest."""
        special = set(tokenizer.all_special_ids)
        ids = self.tokens_where(tokenizer, legal_in_sentence, "legal inside a sentence")
        return constraints_from_config(config, tokenizer, allowed_token_ids=[i for i in ids if i not in special])

    def completion_text(self, text: str) -> str:
        """The sentence an episode stands for: its tokens, then the full stop (the stop action)."""
        return text + END

    def reward_funcs(self, model, tokenizer, constraints, config=None) -> list:
        """log R(z_1:t ⊤) = log p̃_LM(z_1:t "." | X) at every prefix where the policy may stop."""
        return [LMLikelihoodReward(model, tokenizer, prefixes="stoppable", constraints=constraints, renormalise=True,
                                   name="sentence_likelihood")]

    # evaluation
    def baseline_specs(self, config, names: list[str]) -> list[dict]:
        """The baseline rows: label, ``decode`` method, k rows decoded, how many kept, plot marker, and
        extra ``decode`` keywords. Samplers at n and 5n samples; beam search with n and 5n beams
        keeping n (the paper's "5x compute"); diverse beam search with n and 5n beams in n groups
        keeping the best of each group (as the paper's code; with n beams each group is one greedy
        beam); greedy once."""
        n, f, t_end = self.args.eval_samples, self.args.compute_factor, config.reward_temperature_at(10**9)
        specs = []
        for m in names:
            for k in ([1] if m == "greedy" else [n, f * n]):
                label = {"greedy": "greedy", "beam": f"beam ({k} beams)", "nucleus": f"nucleus p=0.95 ({k})",
                         "diverse_beam": (f"diverse beam ({k} beams, {n} groups)" if k > n else
                                          f"diverse greedy ({n} groups)"),  # groups of one beam decode greedily
                         "sampling": f"sampling ({k})", "tempered": f"tempered T={t_end:g} ({k})"}.get(m, f"{m} ({k})")
                kw = {"temperature": t_end}
                if m == "diverse_beam":
                    kw.update(groups=n, diversity_penalty=self.args.diversity_penalty)
                specs.append({"label": label, "method": m, "k": k, "keep": n if "beam" in m else k,
                              "marker": "s" if k > n else ("o" if k == n else "^"), "kw": kw})
        return specs

    def _samplers(self, model, base, tokenizer, config, constraints, rows, specs: list[dict], *, seed: int,
                  progress: bool) -> dict[str, dict]:
        """Each method's completions (token ids), log q (None where intractable) and LM token
        evaluations per validation row: the policy's own samples (``model``, if given), then each
        baseline of ``specs`` (:meth:`baseline_specs`) decoded from ``base``."""
        from tqdm.auto import tqdm

        from ..baselines import decode
        from ..evaluation import sample_per_prompt
        from ..policy import base_model

        n = self.args.eval_samples
        prompts = [render_prompt(tokenizer, r["prompt"], config.chat_template) for r in rows]
        out: dict[str, dict] = {}
        if model is not None:
            got = sample_per_prompt(model, tokenizer, prompts, constraints, n, seed=seed, batch_prompts=4,
                                    progress=progress, desc="GFlowNet policy")
            out["GFlowNet fine-tuning"] = {"completions": [s for s, _, _ in got], "log_q": [q for _, q, _ in got],
                                           "k": n, "marker": "*",
                                           "model_calls": statistics.fmean(sum(len(c) + 1 for c in s) for s, _, _ in got)}
        with base_model(base) as base:
            for sp in tqdm(specs, disable=not progress, desc="baselines", leave=False):
                dec = decode(base, tokenizer, prompts, constraints, sp["method"], sp["k"], seed=seed, **sp["kw"])
                out[sp["label"]] = {"completions": [d.completions[:sp["keep"]] for d in dec],
                                    "log_q": None if dec[0].log_q is None else [d.log_q for d in dec],
                                    "k": sp["keep"], "marker": sp["marker"],
                                    "model_calls": statistics.fmean(d.calls for d in dec)}
        return out

    def _smc(self, base, tokenizer, config, constraints, rows, rewards, weights=None, *, seed: int, progress: bool,
             label: str, predicate=None) -> dict:
        """SMC with genlm-control (:mod:`gfnlm.smc`) on the target of ``rewards`` (the task's own LM terms
        with their ``weights`` from ``config.reward_weights``, read from ``base``, which must be inside
        :func:`gfnlm.policy.base_model`): ``smc_particles`` particles per prompt (default n, about the LM
        calls of n samples), n completions resampled from them. Also the LM calls per prompt and the log Ẑ
        estimates."""
        from ..smc import lm_terms, run_smc

        n, a = self.args.eval_samples, self.args
        prompts = [render_prompt(tokenizer, r["prompt"], config.chat_template) for r in rows]
        terms = [lm_terms(rewards, r, p, tokenizer, constraints, weights) for r, p in zip(rows, prompts)]
        runs = run_smc(base, tokenizer, constraints, terms, n_particles=a.smc_particles or n,
                       ess_threshold=a.smc_ess_threshold, predicate=predicate, seed=seed, progress=progress, desc=label)
        g = torch.Generator().manual_seed(seed)
        return {"completions": [r.resample(n, g) for r in runs], "log_q": None, "k": n, "marker": "P",
                "calls": [r.lm_calls for r in runs], "log_ml": [r.log_ml for r in runs]}

    def base_of(self, model, config):
        """The base LM the baselines decode and the reward reads: the policy's (adapters off), or the
        configured model when there is no policy (or a fully fine-tuned one)."""
        from ..models import load_model
        from ..policy import adapter_layers

        if model is not None and adapter_layers(model):
            return model
        return load_model(config.model)[0]

    def _eval_setup(self, model, config, n: int | None, base) -> tuple[list[dict], object]:
        """The first ``n`` validation rows (default ``eval_prompts``) and the base LM (``base``, else
        :meth:`base_of`)."""
        rows = self.eval_rows()[: n or self.args.eval_prompts]
        if not rows:
            raise DataError(f"{self.name} evaluation needs validation prompts: raise task_args.valid_prompts")
        return rows, base if base is not None else self.base_of(model, config)

    def _method_row(self, tokenizer, m: dict, comps: list[list[list[int]]], target_log_r: list[list[float]]) -> dict:
        """What every method reports besides its target's own figures: samples, marker, diversity, length,
        LM token evaluations, examples, and where q is tractable (``m["log_q"]``) the sampler diagnostics
        on ``target_log_r`` (the target's log R of each completion, per row)."""
        from ..diagnostics import sampler_diagnostics
        from ..evaluation import diversity

        texts = [[self.completion_text(tokenizer.decode(c, skip_special_tokens=True)) for c in cs] for cs in comps]
        r = {"samples_per_prompt": len(comps[0]), "marker": m["marker"],
             "diversity": statistics.fmean(diversity(texts, self.args.embedding_model)),
             "length_tokens": statistics.fmean(statistics.fmean(len(c) for c in cs) for cs in comps),
             "model_calls_per_prompt": m["model_calls"], "examples": texts[0][:3]}
        if m["log_q"] is not None:
            shape = (len(comps), len(comps[0]))
            r["diagnostics"] = sampler_diagnostics(torch.tensor(target_log_r, dtype=torch.float64).view(shape),
                                                   torch.tensor(m["log_q"], dtype=torch.float64).view(shape))
        return r

    def evaluate(self, model, tokenizer, config, constraints, *, n: int | None = None, seed: int = 0,
                 progress: bool = False, baselines: bool = True, base=None, **kw) -> dict:
        """Figure 3's figures on the first ``n`` validation prompts (default ``eval_prompts``): per
        method, max / mean log p̃(Z "." | X), diversity and length (averaged over prompts), and the
        sampler diagnostics against p̃^(1/T_end) where q is tractable. ``model`` None: baselines only;
        ``base``: the base LM (default: the policy's, or the config's model loaded)."""
        from ..evaluation import completion_log_rewards

        a = self.args
        rows, base = self._eval_setup(model, config, n, base)
        reward = self.reward_funcs(base, tokenizer, constraints, config)
        t_end = config.reward_temperature_at(10**9)
        names = [m.strip() for m in a.baselines.split(",") if m.strip()] if baselines else []
        methods = self._samplers(model, base, tokenizer, config, constraints, rows, self.baseline_specs(config, names),
                                 seed=seed, progress=progress)
        results = {"prompts": len(rows), "n": a.eval_samples, "reward_temperature_end": t_end,
                   "embedding_model": a.embedding_model, "max_new_tokens": constraints.max_new_tokens, "methods": {}}
        for label, m in methods.items():
            logp = completion_log_rewards(config, tokenizer, rows, reward, constraints, m["completions"])
            results["methods"][label] = {
                "max_log_p": statistics.fmean(max(v) for v in logp),
                "mean_log_p": statistics.fmean(statistics.fmean(v) for v in logp),
                **self._method_row(tokenizer, m, m["completions"], [[x / t_end for x in v] for v in logp])}
        return results

    def table(self, results: dict) -> str:
        return figure3_table(results)

    def plot(self, results: dict, path) -> None:
        figure3_plot(results, path)

    def report(self, results: dict, label: str, args) -> None:
        print(self.table(results))

    @classmethod
    def eval_command(cls, args, extra: dict) -> int:
        """The GFlowNet checkpoint (if given) and the baselines on the validation prompts: the table
        (:meth:`table`), and with ``--plot`` the figure (:meth:`plot`)."""
        model, tok, config, cons, task = cls.load_for_eval(args, extra)
        with torch.no_grad():
            r = task.evaluate(model if args.checkpoint else None, tok, config, cons, n=args.n, seed=args.seed,
                              progress=True, base=None if args.checkpoint else model)
        print(task.table(r))
        if args.plot:
            task.plot(r, args.plot)
            print(f"plot written to {args.plot}")
        if args.output:
            Path(args.output).write_text(json.dumps(r, indent=1))
        return 0


def figure3_table(results: dict) -> str:
    """One row per method: max and mean log p̃(Z "." | X), diversity, length, and the diagnostics
    (ELBO, ESS, Var(log R - log q) against p̃^(1/T_end)) where q is tractable."""
    lines = ["| method | samples | max log p | mean log p | diversity | length (tokens) | ELBO | ESS | Var(log R - log q) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        d = r.get("diagnostics")
        diag = (f"{elbo_text(d)} | {d['ess']:.3f} | {d['log_w_var']:.2f}" if d else "n/a | n/a | n/a")
        lines.append(f"| {name} | {r['samples_per_prompt']} | {r['max_log_p']:.2f} | {r['mean_log_p']:.2f} | "
                     f"{r['diversity']:.3f} | {r['length_tokens']:.1f} | {diag} |")
    lines.append(f"\n{results['prompts']} validation prompts; log p = log p̃_LM(Z \".\" | X) renormalised over the legal "
                 f"tokens; diversity = 1 - mean pairwise cosine ({results['embedding_model']}); per prompt, then averaged; "
                 f"diagnostics against p̃^(1/{results['reward_temperature_end']:g})")
    return "\n".join(lines)


def figure3_plot(results: dict, path) -> None:
    """Figure 3: max log-likelihood against diversity, one point per method (star: GFlowNet; circle:
    n samples; square: 5n; triangle: greedy)."""
    from ..evaluation import scatter_plot

    pts = [{"label": name, "diversity": r["diversity"], "max_log_p": r["max_log_p"], "marker": r["marker"]}
           for name, r in results["methods"].items()]
    scatter_plot(pts, path, x="diversity", y="max_log_p", xlabel="diversity (1 - mean pairwise cosine)",
                 ylabel="max log p(Z . | X) over the samples", title=f"Next-sentence continuation, "
                 f"{results['prompts']} validation prompts (square: 5x compute)")
