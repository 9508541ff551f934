"""Subjectivity classification with a latent rationale, trained by EM (the paper's Section 5.4).

Episode: X = ``Classify this movie review as objective or subjective: "<text>" This review is``,
Z = a short rationale of word tokens (at most ``max_new_tokens``, 10 by default), stopped by ","
or EOS, Y = ``, so it is <label>.``.  The policy q(Z | X) sees X only.

E-step (GFlowNet fine-tuning of q; a terminal reward, VarGrad by default):

    log R(Z) = log p_LM(Z | X) + log p(Y* | X, Z) - penalty * 1[p(Y_wrong | X, Z) > p(Y* | X, Z)]

with p_LM the base model (adapters off) and p(Y | X, Z) the likelihood model
(:class:`gfnlm.em.LikelihoodModel`: the base model before the first M-step, then a LoRA adapter on
the same base). The whole log R is divided by the reward temperature (the reference code leaves the
penalty untempered; with T between 1 and 1.2 the difference is small).

M-step: rationales Z ~ q(Z | X) for every labelled example (``m_samples`` each, or about ``m_total``
= 400 in all by default) fit the likelihood adapter by cross-entropy over the two label phrases. ``em_rounds`` rounds of E then M.

Test (the posterior predictive): sample ``vote_samples`` rationales Z ~ q(Z | X) at
``vote_temperature``, predict argmax_Y p(Y | X, Z) for each, and vote; greedy decoding is reported
too. "E-step only" uses the base model as p(Y | X, Z); "E+M" uses the fitted adapter.

Baselines on the same examples: zero-shot (p(" objective." | X) vs p(" subjective." | X)), few-shot
in-context (the labelled examples as a prompt, encoded once per label as a prefix cache), and an SFT
classifier (a LoRA adapter fitted by the same cross-entropy with no rationale).

Data: ``../shared/data/subj`` (``train.<n>.jsonl`` for training; validation is a fixed, seeded
split of ``train.jsonl`` that excludes every training sentence) or the user's files with
``text`` and ``label`` (0 objective, 1 subjective) columns.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import load_rows, render_prompt
from ..errors import DataError
from ..rewards import Reward
from ..sampling import sample
from ..trainer import constraints_from_config
from . import Task

LABELS = ["objective", "subjective"]
PROMPT = 'Classify this movie review as objective or subjective: "{text}" This review is'
COT_PHRASE = ", so it is {label}."  # Y after a rationale
DIRECT_PHRASE = " {label}."  # Y right after X (baselines without a rationale)
WORD = re.compile(r"^ ?[A-Za-z]+$")


def is_label_word(token_text: str) -> bool:
    """True for a token that starts a label word: "subject...", "object..." (any case, with or
    without a leading space; pieces of 4 letters or more, such as " subj" or "Objective")."""
    w = token_text.strip().lower()
    return len(w) >= 4 and any(label.startswith(w) or w.startswith(label[:7]) for label in LABELS)


def load_examples(path: str | Path) -> list[dict]:
    """Rows ``{text, label}`` (label 0 objective / 1 subjective, or the label's name); checked."""
    rows = load_rows(path, prompt_column="text")
    out = []
    for i, r in enumerate(rows, 1):
        label = r.get("label")
        if isinstance(label, str) and label.strip().lower() in LABELS:
            label = LABELS.index(label.strip().lower())
        elif isinstance(label, str) and label.strip() in ("0", "1"):  # a .csv file's labels are text
            label = int(label)
        if label not in (0, 1) or not str(r.get("text", "")).strip():
            raise DataError(f"{path}: row {i} needs a non-empty 'text' and a 'label' of 0/1 (or objective/subjective)")
        out.append({"text": str(r["text"]).strip(), "label": int(label)})
    return out


def split_validation(pool: list[dict], exclude: list[dict], n: int, seed: int = 0) -> tuple[list[dict], int]:
    """A fixed validation split: ``n`` rows of ``pool`` whose text is not in ``exclude`` (seeded
    shuffle). Returns the rows and how many pool rows were excluded as training sentences."""
    seen = {r["text"] for r in exclude}
    kept = [r for r in pool if r["text"] not in seen]
    random.Random(seed).shuffle(kept)
    return kept[:n], len(pool) - len([r for r in pool if r["text"] not in seen])


def majority(labels: list[int]) -> int:
    """Most frequent label (ties: the smallest label)."""
    c = Counter(labels)
    return max(sorted(c), key=lambda k: c[k])


@dataclass
class SubjectivityArgs:
    data_dir: str = "../shared/data/subj"
    train_size: int = 20
    train_file: str = ""  # default: train.<train_size>.jsonl in data_dir
    pool_file: str = "train.jsonl"
    val_size: int = 200
    val_seed: int = 0
    penalty: float = 50.0
    seed_rationales: int = 8
    em_rounds: int = 1
    m_samples: int | None = None  # M-step rationales per labelled example; None: ceil(m_total / examples)
    m_total: int = 400
    m_steps: int = 60
    m_learning_rate: float = 5e-4
    vote_samples: int = 10
    vote_temperature: float = 1.0
    sft_steps: int = 60
    forbid_label_words: bool = False  # Z may not use words starting with "subject" or "object"


class SubjectivityTask(Task):
    name = "subjectivity"
    Args = SubjectivityArgs
    config_defaults = {
        "task": "subjectivity",
        "chat_template": "never",
        "stop_tokens": ["eos", ","],
        "min_new_tokens": 1,
        "max_new_tokens": 10,
        "loss_type": "vargrad",
        "samples_per_prompt": 8,
        "prompts_per_step": 2,
        "tempered_fraction": 0.25,
        "replay_fraction": 0.5,
        "reward_temperature": 1.2,
        "reward_temperature_end": 1.0,
        "reward_temperature_horizon": 60,
        "learning_rate": 5e-4,
        "warmup_steps": 10,
        "max_steps": 60,
        "output_dir": "runs/subjectivity",
    }

    def __init__(self, task_args: dict | None = None):
        super().__init__(task_args)
        self.likelihood = None  # set by reward_funcs: the EM likelihood model

    # data ------------------------------------------------------------------------------------------
    def train_examples(self, size: int | None = None) -> list[dict]:
        name = self.args.train_file if self.args.train_file and size is None else f"train.{size or self.args.train_size}.jsonl"
        return load_examples(self.data_file(name))

    def validation(self) -> tuple[list[dict], int]:
        """The fixed validation split, excluding every sentence of the 10/20/50 (or given) training files."""
        exclude = []
        for f in sorted(Path(self.args.data_dir).glob("train.*.jsonl")):
            exclude += load_examples(f)
        if self.args.train_file:
            exclude += load_examples(self.data_file(self.args.train_file))
        return split_validation(load_examples(self.data_file(self.args.pool_file)), exclude, self.args.val_size,
                                self.args.val_seed)

    @staticmethod
    def prompt(text: str) -> str:
        return PROMPT.format(text=text)

    def dataset(self) -> list[dict]:
        return [{"prompt": self.prompt(r["text"]), "label": r["label"]} for r in self.train_examples()]

    def eval_rows(self) -> list[dict]:
        """The validation sentences (never trained on) with their labels: the sampler diagnostics'
        rows, whose target is the E-step posterior p(Z | X, Y*)."""
        return [{"prompt": self.prompt(r["text"]), "label": r["label"]} for r in self.validation()[0]]

    # policy ----------------------------------------------------------------------------------------
    def allowed_token_ids(self, tokenizer) -> list[int]:
        """Word tokens; with ``forbid_label_words``, none that starts a label word ("subject...",
        "object..."), so a rationale has to say something about X instead of naming a label."""
        if self.args.forbid_label_words:
            return self.tokens_where(tokenizer, lambda t: bool(WORD.match(t)) and not is_label_word(t),
                                     "a word of letters that does not name a label")
        return self.tokens_where(tokenizer, lambda t: bool(WORD.match(t)), "a word of letters")

    def constraints(self, config, tokenizer):
        return constraints_from_config(config, tokenizer, allowed_token_ids=self.allowed_token_ids(tokenizer))

    def likelihood_model(self, model, tokenizer):
        from ..em import LikelihoodModel

        if self.likelihood is None or self.likelihood.model is not model:
            self.likelihood = LikelihoodModel(model, tokenizer, [COT_PHRASE.format(label=l) for l in LABELS])
        return self.likelihood

    def bind_likelihood(self, model, tokenizer):
        """The likelihood model of a trained policy (a loaded checkpoint): fitted when the policy carries
        the M-step's adapter, else the base model."""
        lik = self.likelihood_model(model, tokenizer)
        lik.fitted = bool(getattr(model, "peft_config", None)) and lik.name in model.peft_config
        return lik

    def diagnostics(self, model, tokenizer, config, constraints, **kw) -> dict:
        """The sampler diagnostics (:meth:`gfnlm.tasks.Task.diagnostics`) against the E-step target
        under the policy's own likelihood model (:meth:`bind_likelihood`), on validation sentences."""
        self.bind_likelihood(model, tokenizer)
        return super().diagnostics(model, tokenizer, config, constraints, **kw)

    def reward_funcs(self, model, tokenizer, constraints, config=None) -> list:
        if config is not None and not config.use_peft:
            from ..errors import ConfigError

            raise ConfigError("subjectivity's EM keeps its likelihood model as a second LoRA adapter on the policy's "
                              "base model, which full fine-tuning would train: set use_peft: true")
        return [RationaleReward(self, tokenizer, self.args.penalty)]

    def prepare_trainer(self, trainer) -> None:
        """Bind the likelihood model to the trained policy and seed the buffer with rationales the
        base model writes after being told the label (``X <label> because it is``)."""
        self.likelihood_model(trainer.model, trainer.tokenizer)
        if self.args.seed_rationales:
            seeds = self.label_conditioned_rationales(trainer, self.args.seed_rationales)
            trainer.seed_buffer(seeds)

    @torch.no_grad()
    def label_conditioned_rationales(self, trainer, k: int) -> dict[str, list[str]]:
        from ..policy import base_model

        out: dict[str, list[str]] = {}
        tok = trainer.tokenizer
        rows = trainer.rows
        prompts = [render_prompt(tok, f"{r['prompt']} {LABELS[r['label']]} because it is", "never") for r in rows]
        index = torch.arange(len(rows)).repeat_interleave(k)
        with base_model(trainer.model) as base:
            s = sample(base, prompts, index, trainer.constraints, pad_id=trainer.pad_id, generator=trainer.sample_generator)
        c = trainer.constraints
        for i, ids in enumerate(s.completion_ids()):
            text = tok.decode(ids, skip_special_tokens=False)
            if c.min_new_tokens <= len(tok.encode(text, add_special_tokens=False)) <= c.max_new_tokens:
                out.setdefault(rows[int(index[i])]["prompt"], []).append(text)
        return out

    def train(self, trainer, resume_from_checkpoint=None) -> list[dict]:
        """EM: ``em_rounds`` rounds of (E-step: ``max_steps / em_rounds`` GFlowNet steps; M-step);
        ``resume_from_checkpoint`` continues an interrupted run (see :func:`gfnlm.em.run_em`)."""
        from ..em import run_em

        lik = self.likelihood_model(trainer.model, trainer.tokenizer)
        e_steps = max(1, trainer.args.max_steps // self.args.em_rounds)

        def m_step(r: int) -> dict:
            examples = self.rationale_examples(trainer, self.m_samples(len(trainer.rows)))
            losses = lik.fit(examples, steps=self.args.m_steps, learning_rate=self.args.m_learning_rate,
                             seed=trainer.args.seed + r, progress=not trainer.args.disable_tqdm)
            return {"m_examples": len(examples), "m_loss_first": round(losses[0], 4), "m_loss_last": round(losses[-1], 4)}

        return run_em(trainer, lik, rounds=self.args.em_rounds, e_steps=e_steps, m_step=m_step,
                      resume_from_checkpoint=resume_from_checkpoint)

    def m_samples(self, n_examples: int) -> int:
        """Rationales per labelled example in the M-step: ``m_samples``, or enough for about ``m_total``
        in all.  On SmolLM2-135M, 400 in all gave E+M 63 % (10 examples) and 66 % (20 examples) against
        53 % and 58 % with 8 per example (``bench/results/subjectivity.md``)."""
        if self.args.m_samples is not None:
            return self.args.m_samples
        return max(1, -(-self.args.m_total // max(n_examples, 1)))

    @torch.no_grad()
    def rationale_examples(self, trainer, k: int) -> list[tuple[list[int], list[int], int]]:
        """k rationales Z ~ q(Z | X) per labelled example, as (X ids, Z ids, label) for the M-step."""
        was = trainer.model.training
        trainer.model.eval()
        prompts = [trainer.prompt_ids[i] for i in range(len(trainer.rows))]
        index = torch.arange(len(prompts)).repeat_interleave(k)
        s = sample(trainer.model, prompts, index, trainer.constraints, pad_id=trainer.pad_id, generator=trainer.sample_generator)
        trainer.model.train(was)
        return [(prompts[int(index[i])], ids, trainer.rows[int(index[i])]["label"])
                for i, ids in enumerate(s.completion_ids())]

    # evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def direct_scores(self, model, tokenizer, texts: list[str], context: str = "", batch_size: int = 32) -> torch.Tensor:
        """log p(" <label>." | [context] X) for each text and label, under ``model`` as it is (its active
        adapters included), from the one LM reward: [n, 2]. A few-shot ``context`` is the rewards' shared
        prefix, encoded once per label for the whole call (the model does not change during it) and read
        before every sentence."""
        import contextlib

        from ..rewards import LMLikelihoodReward, RewardBatch

        rewards = [LMLikelihoodReward(lm=lambda: contextlib.nullcontext(model), static_lm=True, tokenizer=tokenizer,
                                      suffix=lambda row, y=DIRECT_PHRASE.format(label=l): y, score="end",
                                      prefixes="terminal", renormalise=False, shared_prefix=context or None)
                   for l in LABELS]
        out = []
        for i in range(0, len(texts), batch_size):
            prompts = [render_prompt(tokenizer, self.prompt(t), "never") for t in texts[i:i + batch_size]]
            batch = RewardBatch.of(prompts, [[] for _ in prompts], tokenizer)
            out.append(torch.stack([r(batch) for r in rewards], dim=1))
        return torch.cat(out)

    def few_shot_context(self, examples: list[dict]) -> str:
        return "".join(f"{self.prompt(r['text'])}{DIRECT_PHRASE.format(label=LABELS[r['label']])}\n" for r in examples)

    def fit_sft_classifier(self, model, tokenizer, examples: list[dict], *, seed: int = 0, progress: bool = False,
                           name: str = "sft"):
        """The SFT baseline: a LoRA adapter ``name`` fitted by cross-entropy over the labels, no rationale.
        Returns the :class:`~gfnlm.em.LikelihoodModel` (its ``model`` is ``model`` wrapped by PEFT if it was not)."""
        from ..em import LikelihoodModel

        clf = LikelihoodModel(model, tokenizer, [DIRECT_PHRASE.format(label=l) for l in LABELS], name=name)
        prompts = [render_prompt(tokenizer, self.prompt(r["text"]), "never") for r in examples]
        clf.fit([(p, [], r["label"]) for p, r in zip(prompts, examples)], steps=self.args.sft_steps,
                learning_rate=self.args.m_learning_rate, seed=seed, progress=progress)
        return clf

    @torch.no_grad()
    def rationale_predictions(self, model, tokenizer, config, constraints, likelihood, texts: list[str], *,
                              seed: int = 0, fitted: tuple[bool, ...] = (False,), batch_texts: int = 8) -> dict:
        """Sample ``vote_samples`` rationales at ``vote_temperature`` and one greedily per text, then
        predict argmax_Y p(Y | X, Z) under each likelihood in ``fitted`` (False: base model, True: the
        fitted adapter), on the same rationales. Returns ``{fitted: [{"vote", "greedy", "rationales"}]}``."""
        from ..evaluation import sample_votes

        k = self.args.vote_samples
        was = model.training
        model.eval()
        prompts = [render_prompt(tokenizer, self.prompt(t), "never") for t in texts]
        groups = sample_votes(model, tokenizer, prompts, constraints, k, self.args.vote_temperature, seed=seed,
                              batch_prompts=batch_texts)
        model.train(was)
        rows = [(p, z) for p, (sampled, greedy) in zip(prompts, groups) for z in sampled + [greedy]]
        out: dict = {}
        for f in fitted:  # the same rationales under each likelihood model
            pred = likelihood.predict([p for p, _ in rows], [z for _, z in rows], fitted=f).tolist()
            out[f] = [{"vote": majority(pred[j * (k + 1):j * (k + 1) + k]), "greedy": pred[j * (k + 1) + k],
                       "rationales": [tokenizer.decode(z) for z in sampled[:3]]}
                      for j, (sampled, _) in enumerate(groups)]
        return out

    def evaluate(self, model, tokenizer, config, constraints, *, n: int | None = None, seed: int = 0,
                 progress: bool = False, **kw) -> dict:
        """E-step-only and E+M accuracy of a trained policy (E+M when it has a fitted likelihood adapter),
        on the same sampled rationales."""
        val, excluded = self.validation()
        val = val[:n] if n else val
        texts, gold = [r["text"] for r in val], [r["label"] for r in val]
        lik = self.bind_likelihood(model, tokenizer)
        options = (False, True) if lik.fitted else (False,)
        preds = self.rationale_predictions(model, tokenizer, config, constraints, lik, texts, seed=seed,
                                           fitted=options)
        out = {"examples": len(val), "excluded_training_sentences": excluded}
        for name, f in (("E-step only", False), ("E+M", True)):
            if f in preds:
                p = preds[f]
                out[name] = {"vote_accuracy": sum(x["vote"] == y for x, y in zip(p, gold)) / len(val),
                             "greedy_accuracy": sum(x["greedy"] == y for x, y in zip(p, gold)) / len(val),
                             "example": {"text": texts[0], "rationales": p[0]["rationales"]}}
        return out

    def evaluate_baselines(self, model, tokenizer, sizes: list[int], *, n: int | None = None, seed: int = 0,
                           progress: bool = False) -> dict:
        """Zero-shot, few-shot (the size's examples in context) and SFT-classifier accuracy per size."""
        from ..policy import base_model

        val, _ = self.validation()
        val = val[:n] if n else val
        texts, gold = [r["text"] for r in val], torch.tensor([r["label"] for r in val])

        def acc(scores):
            return float((scores.argmax(-1) == gold).float().mean())

        out: dict = {}
        with base_model(model) as base:
            out["zero-shot"] = {str(s): acc(self.direct_scores(base, tokenizer, texts)) for s in sizes}
            out["few-shot"] = {str(s): acc(self.direct_scores(base, tokenizer, texts,
                                                              context=self.few_shot_context(self.train_examples(s))))
                               for s in sizes}
        out["SFT classifier"] = {}
        for s in sizes:
            clf = self.fit_sft_classifier(model, tokenizer, self.train_examples(s), seed=seed, progress=progress,
                                          name=f"sft{s}")
            with clf.active(True) as m:
                m.eval()
                out["SFT classifier"][str(s)] = acc(self.direct_scores(m, tokenizer, texts))
            model = clf.model  # one PEFT model holds every size's adapter
        return out

    several_checkpoints = True  # gfnlm eval: one EM checkpoint per training-set size

    @classmethod
    def eval_command(cls, args, extra: dict) -> int:
        """Accuracy per method and training-set size: zero-shot, few-shot, SFT classifier (base model),
        and E-step only / E+M for each EM checkpoint (its size from its task_args.train_size); and each
        checkpoint's sampler diagnostics against its E-step target (``--diagnostics K`` samples, 16 by
        default, 0: off) on ``--diagnostics_prompts`` validation sentences."""
        import json

        from ..models import load_model
        from ..trainer import load_trained
        from . import build_config, format_diagnostics

        rows: dict[str, dict[str, str]] = {}
        results: dict = {}
        sizes: list[int] = []
        config = build_config(cls.name, {"model": args.model, **extra})
        for path in args.checkpoints:
            model, tok, cfg, cons = load_trained(path)
            task = SubjectivityTask({**cfg.task_args, **extra.get("task_args", {})})
            size = task.args.train_size
            sizes.append(size)
            config = cfg
            with torch.no_grad():
                r = task.evaluate(model, tok, cfg, cons, n=args.n, seed=args.seed, progress=True)
            if args.diagnostics:  # the E-step target under the checkpoint's likelihood model (fitted: E+M)
                r["diagnostics"] = task.diagnostics(model, tok, cfg, cons, k=args.diagnostics,
                                                    max_prompts=args.diagnostics_prompts, seed=args.seed, progress=True)
                print(f"{path} (EM {size}):\n{format_diagnostics(r['diagnostics'])}")
            results[f"EM {size}"] = r
            for name in ("E-step only", "E+M"):
                if name in r:
                    rows.setdefault(name, {})[str(size)] = (f"{100 * r[name]['vote_accuracy']:.1f} "
                                                            f"({100 * r[name]['greedy_accuracy']:.1f})")
        if not sizes:
            sizes = [int(x) for x in args.sizes.split(",")]
        task = SubjectivityTask({**config.task_args, **extra.get("task_args", {})})
        base, tok = load_model(config.model)
        base_res = task.evaluate_baselines(base, tok, sizes, n=args.n, seed=args.seed, progress=True)
        results["baselines"] = base_res
        rows = {**{m: {s: f"{100 * v:.1f}" for s, v in r.items()} for m, r in base_res.items()}, **rows}
        print(results_table(rows, [str(s) for s in sizes]))
        val, excluded = task.validation()
        print(f"{min(len(val), args.n or len(val))} validation sentences (a fixed split of {task.args.pool_file}; "
              f"{excluded} training sentences excluded); accuracy in %; E rows: vote over "
              f"{task.args.vote_samples} rationales at T = {task.args.vote_temperature} (greedy rationale in brackets)")
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=1))
        return 0


def results_table(rows: dict[str, dict[str, str]], sizes: list[str]) -> str:
    """Markdown: one row per method, one column per training-set size."""
    lines = ["| method | " + " | ".join(f"{s} examples" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    lines += [f"| {m} | " + " | ".join(r.get(s, "-") for s in sizes) + " |" for m, r in rows.items()]
    return "\n".join(lines)


class RationaleReward(Reward):
    """Terminal log R(Z) = log p_LM(Z | X) + log p(Y* | X, Z) - penalty * 1[the likelihood model
    prefers the wrong label given Z]. Y* from the dataset column ``label``. [B], log space.

    Each term is the one LM reward (:meth:`gfnlm.em.LikelihoodModel.scores`): log p(Z | X) from the base
    LM, the label phrases from the likelihood model (the base LM until the first M-step)."""

    prefix = False
    name = "rationale_posterior"

    def __init__(self, task: SubjectivityTask, tokenizer, penalty: float):
        self.task, self.tokenizer, self.penalty = task, tokenizer, penalty

    def __call__(self, batch) -> torch.Tensor:
        labels = batch.columns.get("label")
        if labels is None:
            raise DataError("the subjectivity reward needs the dataset column 'label'")
        lik = self.task.likelihood
        if lik is None:
            raise DataError("the subjectivity reward needs the task's likelihood model: call task.prepare_trainer")
        log_pz, log_py = lik.scores(batch)
        y = torch.tensor([int(l) for l in labels])
        true = log_py.gather(1, y[:, None]).squeeze(1)
        wrong = log_py.gather(1, (1 - y)[:, None]).squeeze(1)
        return log_pz + true - self.penalty * (wrong > true).float()
