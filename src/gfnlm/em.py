"""EM for latent-variable tasks: a likelihood model p(Y | X, Z) fitted on rationales from q(Z | X).

The paper's subjectivity experiment alternates

* **E-step**: GFlowNet fine-tuning of the policy q(Z | X) towards the posterior
  p(Z | X, Y*) ∝ p_LM(Z | X) p(Y* | X, Z) (the trainer, with a reward that reads the likelihood
  model below);
* **M-step**: maximum likelihood of the labels under p(Y | X, Z) on rationales Z ~ q(Z | X)
  sampled for the labelled examples.

:class:`LikelihoodModel` is p(Y | X, Z) over a fixed set of label phrases (e.g. ", so it is
objective." and ", so it is subjective."). It lives on the policy's own base model as a second
LoRA adapter (``name``, default "likelihood"): no second copy of the model. Until it is fitted, the
base model with its adapters switched off is the likelihood model. :func:`run_em` alternates the
two steps for a configurable number of rounds, and can resume from any of its checkpoints: each one
records how many rounds are done, and holds the likelihood adapter once it is fitted.

EM is meant for one process: under a multi-process launch every rank would fit its own likelihood
adapter on its own rationales (not synchronised; not supported yet).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import DataError

#: one labelled M-step example: (prompt ids X, rationale ids Z, index of the true label phrase)
Example = tuple[list[int], list[int], int]


def phrase_log_probs(model, prompts: Sequence[Sequence[int]], middles: Sequence[Sequence[int]],
                     phrases: Sequence[Sequence[int]], pad_id: int = 0, prefix=None) -> tuple[Tensor, Tensor]:
    """log p(Z | X) and log p(Y_k | X, Z) for every label phrase Y_k, in one forward pass, with
    gradients: the M-step's training pass (:meth:`LikelihoodModel.fit`). Rewards and evaluation read
    the same quantities, without gradients, through the one LM reward (:meth:`LikelihoodModel.scores`).

    Args:
        model: a causal LM (whatever adapters are active are used; grad flows unless disabled).
        prompts: B prompts X (token ids); middles: B rationales Z (token ids, may be empty).
        phrases: K label phrases (token ids, each non-empty).
        prefix: optional :class:`~gfnlm.sampling.PrefixCache` of a constant context read before every X.

    Returns:
        log_p_middle [B] (log space; sum over Z's tokens), log_p_phrases [B, K] (log space; sum over
        each phrase's tokens). Computed in fp32 by the shared likelihood pass
        (:func:`gfnlm.scoring.continuation_log_probs`) over the B*K rows Z Y_k: each distinct X is
        encoded once and its KV cache reused by all of its rows.
    """
    from .scoring import continuation_log_probs

    B, K = len(prompts), len(phrases)
    if any(len(p) == 0 for p in phrases):
        raise DataError("empty label phrase")
    uniq: dict[tuple, int] = {}
    context = [uniq.setdefault(tuple(p), len(uniq)) for p in prompts]
    # row b*K + k is Z_b Y_k after X_b
    rows = [list(middles[b]) + list(phrases[k]) for b in range(B) for k in range(K)]
    row_context = [context[b] for b in range(B) for _ in range(K)]
    mid_len = [len(middles[b]) for b in range(B) for _ in range(K)]
    token_logp, _ = continuation_log_probs(model, [list(c) for c in uniq], row_context, rows, pad_id=pad_id,
                                           prefix=prefix)  # [BK, W], 0 beyond each row's length
    device = token_logp.device
    pos = torch.arange(token_logp.shape[1], device=device)[None, :]
    in_middle = pos < torch.tensor(mid_len, dtype=torch.long, device=device)[:, None]
    zeros = torch.zeros_like(token_logp)
    mid = torch.where(in_middle, token_logp, zeros).sum(1).view(B, K)[:, 0]
    phrase = torch.where(in_middle, zeros, token_logp).sum(1).view(B, K)
    return mid, phrase


class LikelihoodModel:
    """p(Y | X, Z) over K label phrases: a LoRA adapter on the policy's base model (or the base model
    itself until :meth:`fit` has run).

    Args:
        model: the policy (a ``PeftModel``: the adapter is added beside the policy's) or a plain
            causal LM (it is wrapped with PEFT, the adapter being its only one).
        tokenizer: its tokenizer.
        label_phrases: K texts, in label order (label k is ``label_phrases[k]``).
        lora_config: ``peft.LoraConfig`` of the adapter (default: the policy's settings).
        name: adapter name.
    """

    def __init__(self, model, tokenizer, label_phrases: Sequence[str], lora_config=None, name: str = "likelihood"):
        if len(label_phrases) < 2:
            raise DataError("a likelihood model needs at least two label phrases")
        self.tokenizer = tokenizer
        self.phrases = [tokenizer.encode(p, add_special_tokens=False) for p in label_phrases]
        self.label_phrases = list(label_phrases)
        self.name = name
        self.lora_config = lora_config
        self.model = model
        self.fitted = False
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # adapters --------------------------------------------------------------------------------------
    def _ensure_adapter(self):
        from peft import get_peft_model

        from .trainer import lora_config as default_lora

        cfg = self.lora_config
        if cfg is None:
            from .config import GFNConfig

            cfg = default_lora(GFNConfig())
        if not getattr(self.model, "peft_config", None):
            self.model = get_peft_model(self.model, cfg, adapter_name=self.name)
        elif self.name not in self.model.peft_config:
            self.model.add_adapter(self.name, cfg)

    def load(self, adapter_dir: str | Path) -> None:
        """Load fitted weights that the policy's ``save_pretrained`` wrote (``adapter_dir/<name>``,
        e.g. a checkpoint's ``adapter`` folder); the model counts as fitted afterwards."""
        from peft import load_peft_weights, set_peft_model_state_dict

        folder = Path(adapter_dir) / self.name
        if not (folder / "adapter_config.json").is_file():
            raise DataError(f"no fitted likelihood adapter '{self.name}' in {adapter_dir}: "
                            "resume from a checkpoint written after an M-step")
        self._ensure_adapter()
        set_peft_model_state_dict(self.model, load_peft_weights(str(folder)), adapter_name=self.name)
        self.fitted = True

    @contextlib.contextmanager
    def active(self, fitted: bool | None = None):
        """The module that computes p(Y | X, Z): the fitted adapter (``fitted`` True, default: if it
        has been fitted) or the base model with every adapter off. Restores the previously active
        adapter and every ``requires_grad`` flag on exit."""
        from .policy import base_model

        use = self.fitted if fitted is None else fitted
        if use and not self.fitted:
            raise DataError("the likelihood model has not been fitted yet")
        if not use:
            with base_model(self.model) as base:
                yield base
            return
        model = self.model
        previous = model.active_adapter
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        was_training = model.training
        model.set_adapter(self.name)
        try:
            yield model
        finally:
            model.set_adapter(previous)
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            model.train(was_training)

    # use -------------------------------------------------------------------------------------------
    def phrase_rewards(self, fitted: bool) -> list:
        """One :class:`~gfnlm.rewards.LMLikelihoodReward` per label phrase: log p(Y_k | X, Z) of a complete
        rationale (terminal, ``score="end"``, full vocabulary) under the base LM (``fitted`` False: the
        policy's base read through :class:`~gfnlm.policy.BaseLM`) or the fitted adapter (:meth:`active`)."""
        from .rewards import LMLikelihoodReward

        where = {"lm": lambda: self.active(True)} if fitted else {"model": self.model}
        return [LMLikelihoodReward(tokenizer=self.tokenizer, suffix=lambda row, y=y: y, score="end", prefixes="terminal",
                                   renormalise=False, name=f"log p({y!r} | X, Z)", **where) for y in self.label_phrases]

    @torch.no_grad()
    def scores(self, batch, *, fitted: bool | None = None, with_middle: bool = True) -> tuple[Tensor | None, Tensor]:
        """(log p_base(Z | X) [B], log p(Y_k | X, Z) [B, K]) of the complete episodes of a
        :class:`~gfnlm.rewards.RewardBatch` (X: each episode's prompt), log space, from the one LM reward:
        log p(Z | X) is always the base model's (``score="state"``); the label terms come from
        :meth:`phrase_rewards` (the fitted adapter when ``fitted``, default: if it has been fitted).
        ``with_middle=False`` skips the base term (the first value is then None). Cost: one pass over
        X Z under the base LM and one over X Z Y_k per label phrase."""
        from .rewards import LMLikelihoodReward

        use = self.fitted if fitted is None else fitted
        if use and not self.fitted:
            raise DataError("the likelihood model has not been fitted yet")
        mid = None
        if with_middle:
            mid = LMLikelihoodReward(self.model, self.tokenizer, score="state", prefixes="terminal", renormalise=False,
                                     name="log p(Z | X)")(batch)
        return mid, torch.stack([r(batch) for r in self.phrase_rewards(use)], dim=1)

    def label_log_probs(self, prompts: Sequence[Sequence[int]], middles: Sequence[Sequence[int]], *,
                        fitted: bool | None = None, batch_size: int = 64,
                        with_middle: bool = True) -> tuple[Tensor | None, Tensor]:
        """:meth:`scores` of rationales ``middles`` (token ids) after ``prompts`` (token ids), in chunks of
        ``batch_size``: (log p_base(Z | X) [B], log p(Y_k | X, Z) [B, K]), log space."""
        from .rewards import RewardBatch

        if len(prompts) == 0:
            return (torch.zeros(0) if with_middle else None), torch.zeros(0, len(self.phrases))
        mids, labels = [], []
        for i in range(0, len(prompts), batch_size):
            batch = RewardBatch.of(prompts[i:i + batch_size], middles[i:i + batch_size], self.tokenizer)
            mid, lab = self.scores(batch, fitted=fitted, with_middle=with_middle)
            mids.append(mid)
            labels.append(lab)
        return (torch.cat(mids) if with_middle else None), torch.cat(labels)

    def predict(self, prompts, middles, **kw) -> Tensor:
        """argmax_k p(Y_k | X, Z): [B] long."""
        return self.label_log_probs(prompts, middles, with_middle=False, **kw)[1].argmax(-1)

    def fit(self, examples: Sequence[Example], *, steps: int = 50, learning_rate: float = 1e-4,
            batch_size: int = 16, seed: int = 0, progress: bool = False) -> list[float]:
        """M-step: fit the adapter by cross-entropy over the K label phrases,
        -log softmax_k(log p(Y_k | X, Z))[y], on (X, Z, y) examples. Returns the loss of each step."""
        from tqdm.auto import tqdm

        if not examples:
            raise DataError("M-step: no labelled rationales to fit the likelihood model on")
        self._ensure_adapter()
        g = torch.Generator().manual_seed(seed)
        losses = []
        with self.active(True) if self.fitted else self._first_fit() as model:
            model.train()
            params = [p for n, p in model.named_parameters() if f".{self.name}." in n]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=learning_rate)
            order: list[int] = []
            for _ in tqdm(range(steps), disable=not progress, desc="M-step", leave=False):
                if len(order) < min(batch_size, len(examples)):  # epochs of a seeded shuffle, no repeats in a batch
                    order += torch.randperm(len(examples), generator=g).tolist()
                pick, order = order[:min(batch_size, len(examples))], order[min(batch_size, len(examples)):]
                p, m, y = zip(*[examples[i] for i in pick])
                _, lab = phrase_log_probs(model, p, m, self.phrases, self.pad_id)
                y = torch.tensor(y, device=lab.device)
                loss = torch.nn.functional.cross_entropy(lab, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            for p in params:
                p.grad = None
        self.fitted = True
        return losses

    @contextlib.contextmanager
    def _first_fit(self):
        self.fitted = True  # the adapter exists now; make it active for the fit
        try:
            with self.active(True) as m:
                yield m
        except BaseException:
            self.fitted = False
            raise


def run_em(trainer, likelihood: LikelihoodModel, *, rounds: int, e_steps: int,
           m_step: Callable[[int], dict], log: Callable[[str], None] = print,
           resume_from_checkpoint: str | Path | bool | None = None) -> list[dict]:
    """Alternate ``rounds`` times: ``e_steps`` GFlowNet steps of ``trainer`` (whose reward reads
    ``likelihood``), then ``m_step(round)`` (which samples rationales and calls ``likelihood.fit``).

    The replay buffer is emptied after each M-step, since its stored rewards were computed under the
    previous likelihood model, and the checkpoint of that step is rewritten after the M-step so that
    it holds the fitted adapter. Every checkpoint records the EM progress (``em`` in
    ``trainer_state.json``), so ``resume_from_checkpoint`` (a folder, or True for the latest in
    ``output_dir``) continues exactly where the run stopped: inside an E-step, or with the M-step of
    a round whose E-step had finished. Returns one dict of statistics per round run here."""
    from . import checkpoint as ckpt

    start = 0
    if resume_from_checkpoint:
        out = trainer.args.output_dir
        path = ckpt.latest(out) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
        if path is None:
            raise DataError(f"no complete checkpoint in {out} to resume EM from")
        path = Path(path)
        if not ckpt.is_complete(path):
            raise DataError(f"'{path}' is not a complete gfnlm checkpoint: pick another checkpoint of the EM run")
        em = json.loads((path / "trainer_state.json").read_text()).get("em")
        if em is None:
            raise DataError(f"'{path}' was not written by an EM run (no 'em' entry): resume EM from one of its checkpoints")
        if em["e_steps"] != e_steps:
            raise DataError(f"'{path}' was written with {em['e_steps']} E-steps a round, this run has {e_steps}: "
                            "keep max_steps / em_rounds as it was")
        if em["fitted"]:
            likelihood._ensure_adapter()  # before the trainer restores the RNG states, as in the original run
        trainer.load_checkpoint(path)
        if em["fitted"]:
            likelihood.load(path / "adapter")
        start = em["rounds_done"]
        log(f"[em] resumed from {path}: step {trainer.step}, {start} of {rounds} rounds done")

    def progress(done: int) -> None:
        trainer.extra_info["em"] = {"rounds_done": done, "e_steps": e_steps, "fitted": likelihood.fitted}

    stats = []
    for r in range(start, rounds):
        progress(r)
        end = (r + 1) * e_steps
        if trainer.step < end:
            trainer.args.max_steps = end
            trainer.train()
        log(f"[em] round {r + 1}/{rounds}: E-step done at step {trainer.step}; M-step ...")
        s = m_step(r)
        trainer.buffer.clear()
        progress(r + 1)
        trainer.save_checkpoint(Path(trainer.args.output_dir) / f"checkpoint-{trainer.step}")
        stats.append({"round": r + 1, "step": trainer.step, **s})
        log(f"[em] round {r + 1}/{rounds}: {s}")
    return stats
