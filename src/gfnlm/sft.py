"""Supervised fine-tuning baseline: maximum likelihood of labelled completions.

The same policy, constraints, tool and checkpoints as GFlowNet training (a :class:`GFNTrainer`
supplies them), but the loss is the negative log-likelihood of each labelled episode under the
constrained policy: ``-(Σ_t log q(z_t | z_<t) + log q(⊤ | z))``.  Tool-written tokens are part of
the state but not of the likelihood (their ``log_pf`` is 0), exactly as in GFlowNet training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import DataError


def episodes_from_texts(trainer, completions: dict[str, list[str]]):
    """Tokenise labelled completions into episodes (tool output inserted as the sampler would).

    Returns (row ids [K], tokens [K, N], lengths [K], action_mask [K, N])."""
    from .rollout import cat_padded

    index = {r["prompt"]: i for i, r in enumerate(trainer.rows)}
    rows, tokens, lengths, masks = [], [], [], []
    for prompt, texts in completions.items():
        if prompt not in index:
            raise DataError(f"sft: prompt {prompt[:40]!r} is not in the training dataset")
        t, n, m = trainer.encode_completions(texts, "sft")
        rows += [index[prompt]] * len(texts)
        tokens.append(t)
        lengths.append(n)
        masks.append(m)
    if not rows:
        raise DataError("sft: no labelled completions")
    return (torch.tensor(rows), cat_padded(tokens, trainer.pad_id), torch.cat(lengths), cat_padded(masks, False))


def sft_train(trainer, completions: dict[str, list[str]], batch_size: int = 8) -> list[float]:
    """Train ``trainer``'s policy by maximum likelihood for ``trainer.args.max_steps`` steps on the
    labelled completions (``{prompt: [completion, ...]}``), then write a checkpoint. Returns the
    per-step mean negative log-likelihood (nats per episode)."""
    a = trainer.args
    rows, tokens, lengths, action_mask = episodes_from_texts(trainer, completions)
    device = trainer.accelerator.device
    losses = []
    from tqdm.auto import tqdm

    bar = tqdm(total=a.max_steps, initial=trainer.step, desc="SFT", disable=a.disable_tqdm or not trainer.accelerator.is_main_process)
    while trainer.step < a.max_steps:
        pick = torch.randint(len(rows), (min(batch_size, len(rows)),), generator=trainer.generator)
        row_ids = sorted(set(rows[pick].tolist()))
        prompt_index = torch.tensor([row_ids.index(r) for r in rows[pick].tolist()], device=device)
        width = int(lengths[pick].max())
        log_pf, log_pterm, _ = trainer.policy([trainer.prompt_ids[r] for r in row_ids], prompt_index,
                                              tokens[pick, :width].to(device), lengths[pick].to(device),
                                              trainer.constraints, trainer.pad_id,
                                              action_mask[pick, :width].to(device))
        nll = -(log_pf.sum(1) + log_pterm.gather(1, lengths[pick].to(device)[:, None]).squeeze(1)).mean()
        trainer.accelerator.backward(nll)
        trainer.clip_gradients()
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.step += 1
        losses.append(float(nll.detach()))
        bar.update(1)
        bar.set_postfix(nll=f"{losses[-1]:.3f}")
    bar.close()
    trainer.save_checkpoint(Path(a.output_dir) / f"checkpoint-{trainer.step}")
    return losses
