"""Supervised fine-tuning baseline: maximum likelihood of labelled completions.

The same policy, constraints, tool and checkpoints as GFlowNet training (a :class:`GFNTrainer`
supplies them), but the loss is the negative log-likelihood of each labelled episode under the
constrained policy: ``-(Σ_t log q(z_t | z_<t) + log q(⊤ | z))``.  Tool-written tokens are part of
the state but not of the likelihood (their ``log_pf`` is 0), exactly as in GFlowNet training.

Distilling a sampler that gives its per-step distributions (a proposal with ``step_logits``) can use
soft labels instead: the loss is then the KL from its next-action distribution at every state of its
episodes (:func:`episode_kl`), the sequence-level KL(p || q) by the chain rule, with far less variance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import ConfigError, DataError


def episodes_from_texts(trainer, completions: dict[str, list[str]], heldout: bool = False):
    """Tokenise labelled completions into episodes (tool output inserted as the sampler would).
    ``heldout``: the prompts need not be training rows (they are rendered here).

    Returns (prompts: P prompt id lists, prompt index [K], tokens [K, N], lengths [K], action_mask [K, N])."""
    from .data import render_prompt
    from .rollout import cat_padded

    index = {r["prompt"]: i for i, r in enumerate(trainer.rows)}
    prompts, rows, tokens, lengths, masks = [], [], [], [], []
    for prompt, texts in completions.items():
        if prompt in index:
            prompts.append(trainer.prompt_ids[index[prompt]])
        elif heldout:
            prompts.append(render_prompt(trainer.tokenizer, prompt, trainer.args.chat_template))
        else:
            raise DataError(f"sft: prompt {prompt[:40]!r} is not in the training dataset")
        t, n, m = trainer.encode_completions(texts, "sft")
        rows += [len(prompts) - 1] * len(texts)
        tokens.append(t)
        lengths.append(n)
        masks.append(m)
    if not rows:
        raise DataError("sft: no labelled completions")
    return (prompts, torch.tensor(rows), cat_padded(tokens, trainer.pad_id), torch.cat(lengths),
            cat_padded(masks, False))


def proposal_episodes(trainer, proposal, per_prompt: int, prompts: int | None = None, seed: int = 0,
                      chunk: int = 16):
    """Episodes drawn from a proposal sampler (:data:`gfnlm.rollout.Proposal`, e.g. the contrastive task's
    token-level sampler), ``per_prompt`` for each of the first ``prompts`` training rows (None: all),
    ``chunk`` prompts a call seeded ``seed + c`` for the c-th call: the data of :func:`sft_train` when
    distilling that sampler into the policy, a warm start for GFlowNet fine-tuning (``gfnlm sft
    --from_proposal K``). The proposal's token ids are kept as they are (no decode / re-encode round
    trip); torch's global random state is left as it was. Every process draws the same episodes.

    Returns what :func:`episodes_from_texts` returns."""
    from tqdm.auto import tqdm

    from .rollout import cat_padded

    if proposal is None:
        raise ConfigError("the task gave no proposal sampler for this configuration (its proposal() returned None): "
                          "nothing to distil, drop --from_proposal")
    if per_prompt < 1 or (prompts is not None and prompts < 1):
        raise ConfigError(f"per_prompt {per_prompt}, prompts {prompts}: draw at least 1 proposal sample for at least "
                          "1 training prompt")
    ids = trainer.prompt_ids[:prompts] if prompts is not None else trainer.prompt_ids
    parts = []
    bar = tqdm(total=len(ids), desc="proposal samples", disable=trainer.args.disable_tqdm
               or not trainer.accelerator.is_main_process)
    for c, start in enumerate(range(0, len(ids), chunk)):
        batch = ids[start:start + chunk]
        parts.append(trainer.collector.propose(batch, [per_prompt] * len(batch), trainer.accelerator.device,
                                               seed=seed + c, proposal=proposal))
        bar.update(len(batch))
    bar.close()
    rows = torch.arange(len(ids)).repeat_interleave(per_prompt)
    return (list(ids), rows, cat_padded([t for t, _, _ in parts], trainer.pad_id), torch.cat([n for _, n, _ in parts]),
            cat_padded([m for _, _, m in parts], False))


def _picked(trainer, prompts, rows: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
            action_mask: torch.Tensor, pick: torch.Tensor):
    """The episodes ``pick`` [b] as the policy reads them, on its device: (their distinct prompts,
    prompt index [b], tokens [b, n_max], lengths [b], action mask [b, n_max])."""
    device = trainer.accelerator.device
    row_ids = sorted(set(rows[pick].tolist()))
    prompt_index = torch.tensor([row_ids.index(r) for r in rows[pick].tolist()], device=device)
    width = int(lengths[pick].max())
    return ([prompts[r] for r in row_ids], prompt_index, tokens[pick, :width].to(device), lengths[pick].to(device),
            action_mask[pick, :width].to(device))


def episode_nll(trainer, prompts, rows: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                action_mask: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood [b] (nats per episode) of the episodes ``pick`` [b] under the constrained
    policy: ``-(Σ_t log q(z_t | z_<t) + log q(⊤ | z))``, from one teacher-forced pass."""
    ps, prompt_index, tok, n, mask = _picked(trainer, prompts, rows, tokens, lengths, action_mask, pick)
    log_pf, log_pterm, _ = trainer.policy(ps, prompt_index, tok, n, trainer.constraints, trainer.pad_id, mask)
    return -(log_pf.sum(1) + log_pterm.gather(1, n[:, None]).squeeze(1))


def episode_kl(trainer, teacher, prompts, rows: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
               action_mask: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """Soft-label distillation loss [b] (nats per episode) of the episodes ``pick`` [b]:
    ``sum_t KL(p(. | s_t) || q(. | s_t))`` over the states each visited (:func:`gfnlm.losses.stepwise_kl`),
    where p is the teacher's constrained distribution of the next action (``teacher.step_logits``, e.g.
    :class:`gfnlm.tasks.contrastive.TokenLevelProposal`) and q the policy's, from one teacher-forced pass
    of each (the teacher's without gradient)."""
    from .losses import stepwise_kl
    from .scoring import action_log_probs

    ps, prompt_index, tok, n, mask = _picked(trainer, prompts, rows, tokens, lengths, action_mask, pick)
    if not bool(mask.eq(torch.arange(mask.shape[1], device=mask.device)[None] < n[:, None]).all()):
        raise ConfigError("soft-label distillation needs episodes without tool output: distil with labels instead")
    with torch.no_grad():
        target = action_log_probs(teacher.step_logits(ps, prompt_index, tok, n, trainer.pad_id), trainer.constraints,
                                  tok, n)
    policy = trainer.policy(ps, prompt_index, tok, n, trainer.constraints, trainer.pad_id, actions=True)
    return stepwise_kl(target, policy, n)


@torch.no_grad()
def heldout_nll(trainer, completions: dict[str, list[str]] | tuple, batch_size: int = 8) -> float:
    """Mean negative log-likelihood (nats per episode) of labelled completions the policy was not
    trained on (e.g. a validation split), or of episodes already tokenised (the tuple of
    :func:`episodes_from_texts`, e.g. tokenised once by :func:`sft_train`); the trainer's model is in
    eval mode throughout (dropout off)."""
    episodes = completions if isinstance(completions, tuple) else episodes_from_texts(trainer, completions, heldout=True)
    prompts, rows, tokens, lengths, action_mask = episodes
    total = sum(float(episode_nll(trainer, prompts, rows, tokens, lengths, action_mask, pick).sum())
                for pick in torch.arange(len(rows)).split(batch_size))
    return total / len(rows)


def sft_train(trainer, completions: dict[str, list[str]] | tuple, batch_size: int = 8,
              heldout: dict[str, list[str]] | None = None, eval_steps: int = 0, teacher=None) -> list[float]:
    """Train ``trainer``'s policy by maximum likelihood for ``trainer.args.max_steps`` steps on the
    labelled completions (``{prompt: [completion, ...]}``, or episodes already tokenised: the tuple of
    :func:`episodes_from_texts` or :func:`proposal_episodes`), then write a checkpoint. Returns the
    per-step mean negative log-likelihood (nats per episode).

    ``teacher``: a sampler with ``step_logits`` (e.g. the proposal the episodes came from): soft labels,
    the loss is then :func:`episode_kl`, the KL from the teacher's next-action distribution at every
    visited state (nats per episode), and that is what is returned.

    ``heldout``: labelled completions never trained on (e.g. the task's validation split). Their NLL
    (:func:`heldout_nll`, which draws no random numbers: training is the same with or without it) is
    measured before the first step, every ``eval_steps`` steps (0: no others) and after the last,
    and logged as ``sft/heldout_nll``. Early stopping without a second run: the step with the lowest
    one also gets its ``checkpoint-<step>`` (the previous best is removed; the last step's checkpoint
    is always written), and ``<output_dir>/heldout.json`` gives that step, its checkpoint and the curve.
    """
    from tqdm.auto import tqdm

    a = trainer.args
    out = Path(a.output_dir)
    episodes = completions if isinstance(completions, tuple) else episodes_from_texts(trainer, completions)
    prompts, rows, tokens, lengths, action_mask = episodes
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    best: list = []  # [nll, step, checkpoint or None (step 0: the model before fine-tuning)]
    held = episodes_from_texts(trainer, heldout, heldout=True) if heldout else None  # tokenised once

    def evaluate():
        nll = heldout_nll(trainer, held, batch_size)
        curve.append((trainer.step, nll))
        if a.report_to:
            trainer.accelerator.log({"sft/heldout_nll": nll}, step=trainer.step)
        if not best or nll < best[0]:
            path = None
            if trainer.step > 0:  # every process takes part in a save; the held-out set is the same on each
                path = trainer.save_checkpoint(out / f"checkpoint-{trainer.step}")
            if best and best[2] is not None and trainer.accelerator.is_main_process:
                shutil.rmtree(best[2], ignore_errors=True)
            best[:] = [nll, trainer.step, path]

    if heldout:
        evaluate()
    bar = tqdm(total=a.max_steps, initial=trainer.step, desc="SFT", disable=a.disable_tqdm or not trainer.accelerator.is_main_process)
    while trainer.step < a.max_steps:
        pick = torch.randint(len(rows), (min(batch_size, len(rows)),), generator=trainer.generator)
        if teacher is not None:
            per_episode = episode_kl(trainer, teacher, prompts, rows, tokens, lengths, action_mask, pick)
        else:
            per_episode = episode_nll(trainer, prompts, rows, tokens, lengths, action_mask, pick)
        nll = per_episode.mean()
        trainer.accelerator.backward(nll)
        trainer.clip_gradients()
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.step += 1
        losses.append(float(nll.detach()))
        if heldout and eval_steps > 0 and trainer.step % eval_steps == 0 and trainer.step < a.max_steps:
            evaluate()
        bar.update(1)
        shown = {"kl" if teacher is not None else "nll": f"{losses[-1]:.3f}"}
        bar.set_postfix(**shown, **({"heldout": f"{curve[-1][1]:.3f}"} if curve else {}))
    bar.close()
    if heldout and (not curve or curve[-1][0] != trainer.step):
        evaluate()
    final = out / f"checkpoint-{trainer.step}"
    if not (best and best[2] == final):
        trainer.save_checkpoint(final)
    if heldout and trainer.accelerator.is_main_process:
        (out / "heldout.json").write_text(json.dumps(
            {"best_step": best[1], "best_heldout_nll": best[0], "checkpoint": str(best[2]) if best[2] else None,
             "curve": curve}, indent=1))
    return losses
