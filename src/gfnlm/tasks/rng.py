"""Uniform random integers (the paper's first experiment, Fig. 2).

The policy is prompted with "The following is a random integer drawn uniformly between 0
and 100" and should answer with an integer 0..100 (100 included, no leading zeros) followed
by the stop action, each integer with probability 1/101.

Reward: log R(z ⊤) = 0 if z is such an integer, else a floor.  Every prefix is scored by the
same rule, so modified SubTB can use all of them.

Making the target well posed.  With V tokens and up to L tokens there are about V^L invalid
strings; the target's invalid mass is about V^L · exp(floor) / (101 + V^L · exp(floor)).  A
floor such as -9 (R = 1e-4) therefore puts almost all the mass on junk once V^L is large,
and a policy that learns the target faithfully drifts to prose.  This task therefore

* restricts the action space to the ten digit tokens and the stop (``restrict_vocab``, default),
  so V = 11 and L = 3;
* uses a floor far below -(L log V): by default ``-(L log V) - 20``, which leaves at most
  e^-20 · 101^-1 of the target on invalid strings;
* seeds the replay buffer with the 101 valid answers (``seed_buffer``), so replay shows the
  policy the whole support from the first step (GFlowNet objectives are off-policy);
* uses a moderate learning rate (the config defaults below).

The stop action is EOS: SmolLM2 hardly ever emits a newline right after a number, while EOS
ends an answer naturally in its chat format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import render_prompt
from ..diagnostics import exact_diagnostics
from ..errors import ConfigError
from ..evaluation import sample_completions, sequence_log_probs
from ..rewards import PrefixRuleReward
from ..sampling import Constraints
from ..trainer import constraints_from_config, resolve_token_ids
from . import Task

PROMPT = "The following is a random integer drawn uniformly between 0 and 100"
VALID = re.compile(r"(?:0|[1-9][0-9]?|100)")
NUM_VALUES = 101
DIGITS = [str(d) for d in range(10)]


def parse_integer(text: str) -> int | None:
    """The integer a completion names, if it is valid (0..100, no sign, space or leading zero)."""
    return int(text) if VALID.fullmatch(text) else None


@dataclass
class RNGArgs:
    prompt: str = PROMPT
    restrict_vocab: bool = True
    log_reward_floor: float | None = None
    seed_buffer: bool = True
    eval_samples: int = 4096


class RandomIntegerTask(Task):
    name = "rng"
    Args = RNGArgs
    config_defaults = {
        "task": "rng",
        "max_new_tokens": 3,
        "min_new_tokens": 1,
        "stop_tokens": ["eos"],
        "loss_type": "modified_subtb",
        "learning_rate": 1e-3,
        "log_z_learning_rate": 0.3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 5,
        "samples_per_prompt": 32,
        "tempered_fraction": 0.25,
        "replay_fraction": 0.5,
        "buffer_capacity": 128,
        "lora_r": 16,
        "lora_alpha": 32,
        "max_steps": 300,
        "output_dir": "runs/rng",
    }

    # --- setup ---------------------------------------------------------------------------------
    def dataset(self) -> list[dict]:
        return [{"prompt": self.args.prompt}]

    def digit_map(self, tokenizer) -> dict[str, int]:
        """Token id of each digit character (each must be a single token)."""
        try:
            return {d: resolve_token_ids(tokenizer, [d], "rng digits")[0] for d in DIGITS}
        except ConfigError:
            raise ConfigError("restrict_vocab needs each digit 0-9 to be one token in this tokenizer: "
                              "set task_args.restrict_vocab false") from None

    def constraints(self, config, tokenizer) -> Constraints:
        digits = sorted(self.digit_map(tokenizer).values()) if self.args.restrict_vocab else None
        return constraints_from_config(config, tokenizer, allowed_token_ids=digits)

    def floor(self, tokenizer, constraints: Constraints) -> float:
        """The log-reward of an invalid string (see the module docstring)."""
        if self.args.log_reward_floor is not None:
            return self.args.log_reward_floor
        v = (len(constraints.allowed_token_ids) if constraints.allowed_token_ids is not None else len(tokenizer)) + 1
        return -(constraints.max_new_tokens * math.log(v)) - 20.0

    def reward_funcs(self, model, tokenizer, constraints, config=None) -> list:
        floor = self.floor(tokenizer, constraints)

        def integer_reward(prompt: str, completion: str) -> float:
            return 0.0 if parse_integer(completion) is not None else floor

        return [PrefixRuleReward(integer_reward, name="valid_integer")]

    def sample_metrics(self):
        def valid_fraction(prompts, completions):
            return {"valid_fraction": sum(parse_integer(c) is not None for c in completions) / max(len(completions), 1)}

        return valid_fraction

    def prepare_trainer(self, trainer) -> None:
        if self.args.seed_buffer:  # the valid answers this tokenizer can spell (a toy word-level one may lack "10")
            tok = trainer.tokenizer
            spelt = [str(k) for k in range(NUM_VALUES)
                     if tok.decode(tok.encode(str(k), add_special_tokens=False)).strip() == str(k)]
            trainer.seed_buffer({self.args.prompt: spelt})

    # --- evaluation ----------------------------------------------------------------------------
    def answer_token_ids(self, tokenizer, constraints: Constraints) -> list[list[int]]:
        """Token ids of the answers 0..100 as the policy spells them: digit by digit under the
        digits-only sampler, else the tokenizer's own encoding (other tokenisations of the same
        text are not counted, so the exact valid mass is then a lower bound)."""
        allowed = constraints.allowed_token_ids
        if allowed is not None:
            digits = self.digit_map(tokenizer)
            if set(allowed) <= set(digits.values()):
                return [[digits[c] for c in str(k)] for k in range(NUM_VALUES)]
        return [tokenizer.encode(str(k), add_special_tokens=False) for k in range(NUM_VALUES)]

    def evaluate(self, model, tokenizer, config, constraints: Constraints, *, n: int | None = None, seed: int = 0,
                 progress: bool = False, desc: str = "sampling", exact: bool = True) -> dict:
        """Sampled and exact metrics of ``model`` under ``constraints`` (see :func:`distribution_metrics`).

        With ``exact``, also :func:`exact_metrics` and, prefixed ``exact_``, the
        :func:`~gfnlm.diagnostics.exact_diagnostics` of q on the 101 valid answers against
        R = 1 there (``exact_log_z`` = log 101; the floor reward of invalid strings is left out)."""
        n = n or self.args.eval_samples
        prompt_ids = render_prompt(tokenizer, self.args.prompt, config.chat_template)
        texts = sample_completions(model, tokenizer, prompt_ids, constraints, n, seed=seed, progress=progress, desc=desc)
        out = distribution_metrics(texts)
        if exact:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = self.answer_token_ids(tokenizer, constraints)
            logp = sequence_log_probs(model, prompt_ids, constraints, ids, pad_id=pad)
            out.update(exact_metrics(logp.exp()))
            diag = exact_diagnostics(torch.zeros_like(logp), logp)  # log R = 0 on every valid answer
            out.update({f"exact_{k}": v for k, v in diag.items()})
        return out

    def report(self, results: dict, label: str, args) -> None:
        """The distribution table (and a histogram PNG with ``--plot``)."""
        from ..evaluation import format_table

        print(format_table([results], RNG_COLUMNS, [str(label)]))
        if getattr(args, "plot", None):
            print(f"wrote {plot_histograms({label: results}, args.plot)}")

    @classmethod
    def demo(cls, args) -> int:
        """Uniform random integers on the embedded model: evaluate, train, evaluate, plot."""
        import json
        import time

        from . import make_trainer
        from ..evaluation import format_table
        from ..models import load_model
        from . import build_config

        overrides = {"output_dir": args.output_dir, "model": args.model}
        if args.steps is not None:
            overrides["max_steps"] = args.steps
        config = build_config(cls.name, overrides)
        n = args.eval_samples
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        print(f"[gfnlm demo] loading {config.model} ...", flush=True)
        model, tok = load_model(config.model)
        task, trainer = make_trainer(config, model, tok)
        cons = trainer.constraints
        free = Constraints(stop_token_ids=resolve_token_ids(tok, ["eos"], "stop"), min_new_tokens=1, max_new_tokens=6)
        results = {}
        print(f"[gfnlm demo] base model, free sampling ({n} samples) ...", flush=True)
        with torch.no_grad():
            results["base (free)"] = task.evaluate(trainer.model, tok, config, free, n=n, seed=1, progress=True, desc="base free")
            print(f"[gfnlm demo] base model, digits-only sampler ({n} samples) ...", flush=True)
            results["base (digits)"] = task.evaluate(trainer.model, tok, config, cons, n=n, seed=2, progress=True,
                                                     desc="base digits")
        print(f"[gfnlm demo] GFlowNet fine-tuning, {config.max_steps} steps ...", flush=True)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        print(f"[gfnlm demo] trained model ({n} samples) ...", flush=True)
        with torch.no_grad():
            results["GFN fine-tuned"] = task.evaluate(trainer.model, tok, config, cons, n=n, seed=3, progress=True,
                                                      desc="trained")
        labels = list(results)
        table = format_table([results[k] for k in labels], RNG_COLUMNS, labels)
        png = plot_histograms(results, out / "histogram.png", title=f"{config.model}: '{task.args.prompt}'")
        total_s = time.perf_counter() - t_start
        metrics = {
            "model": config.model,
            "eval_samples": n,
            "train_steps": config.max_steps,
            "train_seconds": round(train_s, 1),
            "total_seconds": round(total_s, 1),
            "base_free": _summary(results["base (free)"]),
            "base": _summary(results["base (digits)"]),
            "trained": _summary(results["GFN fine-tuned"]),
            "exact_probs": {k: r["exact_probs"] for k, r in results.items()},
            "checkpoint": str(out / f"checkpoint-{config.max_steps}"),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print()
        print(table)
        print()
        print("base (free): the base model as it is (any token, stop = EOS, at most 6 tokens).")
        print("base (digits) and GFN fine-tuned: the task's sampler (digit tokens and EOS, at most 3 tokens).")
        print("target: valid >= 0.99 and tv_to_uniform <= 0.08 at 4096 samples; TV over 101 integers + invalid.")
        print(f"wrote {out / 'metrics.json'}, {png}, TensorBoard logs under {out}; "
              f"training {train_s:.0f} s, total {total_s:.0f} s")
        return 0


RNG_COLUMNS = ["valid_fraction", "distinct", "tv_to_uniform", "exact_tv_to_uniform", "kl_to_uniform", "exact_valid_mass"]


def _summary(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "exact_probs"}


def distribution_metrics(completions: list[str]) -> dict:
    """Metrics of sampled completions.

    * ``valid_fraction``: share of completions that are an integer 0..100;
    * ``distinct``: number of distinct valid integers;
    * ``tv_to_uniform``: total variation between the empirical distribution over 102 outcomes
      (the integers 0..100 and "invalid") and the target, uniform on the 101 integers;
    * ``kl_to_uniform``: KL(empirical ‖ uniform over the 102 outcomes 0..100 and invalid), in
      nats; finite even when some completions are invalid (0 would need 1/102 invalid).
    """
    n = len(completions)
    counts = [0] * NUM_VALUES
    invalid = 0
    for c in completions:
        k = parse_integer(c)
        if k is None:
            invalid += 1
        else:
            counts[k] += 1
    p = torch.tensor(counts + [invalid], dtype=torch.float64) / max(n, 1)
    target = torch.tensor([1.0 / NUM_VALUES] * NUM_VALUES + [0.0], dtype=torch.float64)
    tv = 0.5 * (p - target).abs().sum().item()
    u102 = 1.0 / (NUM_VALUES + 1)
    kl = sum(pi * math.log(pi / u102) for pi in p.tolist() if pi > 0)
    return {
        "n": n,
        "valid_fraction": 1.0 - invalid / max(n, 1),
        "distinct": sum(c > 0 for c in counts),
        "tv_to_uniform": tv,
        "kl_to_uniform": kl,
        "counts": counts,
        "invalid": invalid,
    }


def exact_metrics(probs: torch.Tensor) -> dict:
    """From q(k ⊤ | X) for k = 0..100 (exact, by scoring every answer): the exact valid mass and
    the exact total variation to uniform (invalid mass counted as one outcome of target 0)."""
    probs = probs.double()
    valid_mass = probs.sum().item()
    tv = 0.5 * ((probs - 1.0 / NUM_VALUES).abs().sum().item() + max(1.0 - valid_mass, 0.0))
    return {"exact_valid_mass": valid_mass, "exact_tv_to_uniform": tv, "exact_probs": probs.tolist()}


def plot_histograms(results: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Bar charts of sampled integers (and invalid) for each labelled result; saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(results)
    fig, axes = plt.subplots(k, 1, figsize=(11, 2.6 * k), sharex=True, squeeze=False)
    for ax, (label, r) in zip(axes[:, 0], results.items()):
        n = max(r["n"], 1)
        freqs = [c / n for c in r["counts"]]
        ax.bar(range(NUM_VALUES), freqs, width=0.9, color="tab:blue", label="sampled frequency")
        ax.bar([NUM_VALUES + 3], [r["invalid"] / n], width=0.9, color="tab:red", label="invalid")
        if r.get("exact_probs"):
            ax.plot(range(NUM_VALUES), r["exact_probs"], ".", color="black", ms=3, label="exact q(k)")
        ax.axhline(1.0 / NUM_VALUES, color="tab:green", lw=1, ls="--", label="uniform 1/101")
        ax.set_ylabel("probability")
        ax.set_title(f"{label}: valid {r['valid_fraction']:.3f}, TV {r['tv_to_uniform']:.3f}, distinct {r['distinct']}",
                     fontsize=10)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    axes[-1, 0].set_xticks(list(range(0, NUM_VALUES, 10)) + [NUM_VALUES + 3])
    axes[-1, 0].set_xticklabels([str(x) for x in range(0, NUM_VALUES, 10)] + ["inv."])
    axes[-1, 0].set_xlabel("integer")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
