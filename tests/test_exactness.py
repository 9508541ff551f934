"""Exactness: a tiny policy trained with GFNTrainer samples exactly ∝ R.

The space is every string of length 0..3 over {a, b, c} (40 strings, 39 without the empty
one); the reward varies over two orders of magnitude.  After training, the policy's exact
distribution over the space (all strings enumerated and scored) must be within total
variation 0.02 of R / Z.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.config import GFNConfig
from gfnlm.rewards import PrefixRuleReward
from gfnlm.scoring import score
from gfnlm.trainer import GFNTrainer

LETTERS = ["a", "b", "c"]


def all_strings(min_len: int, max_len: int) -> list[tuple[str, ...]]:
    return [s for n in range(min_len, max_len + 1) for s in itertools.product(LETTERS, repeat=n)]


def make_log_rewards(seed: int = 1234) -> dict[str, float]:
    """log R of every string (keyed by its decoded text 'a b c'), uniform in [0, log 100]."""
    g = torch.Generator().manual_seed(seed)
    strings = all_strings(0, 3)
    values = torch.rand(len(strings), generator=g, dtype=torch.float64) * math.log(100.0)
    return {" ".join(s): float(v) for s, v in zip(strings, values)}


def exact_distribution(trainer: GFNTrainer, strings: list[tuple[str, ...]]) -> torch.Tensor:
    """The policy's probability of each string (then stop), by teacher-forced scoring."""
    tok = trainer.tokenizer
    ids = [tok.convert_tokens_to_ids(list(s)) for s in strings]
    n = max(len(x) for x in ids)
    tokens = torch.full((len(ids), n), trainer.pad_id, dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids])
    with torch.no_grad():
        sc = score(trainer.model, trainer.prompt_ids, torch.zeros(len(ids), dtype=torch.long), tokens, lengths,
                   trainer.constraints, pad_id=trainer.pad_id)
    log_p = sc.log_pf.double().sum(1) + sc.log_pterm.double().gather(1, lengths[:, None]).squeeze(1)
    return log_p.exp()


def train_and_measure(tmp_path, loss_type: str, min_new_tokens: int = 0, max_steps: int = 600):
    table = make_log_rewards()
    reward = PrefixRuleReward(lambda prompt, text: table[text], name="table")
    args = GFNConfig(
        use_peft=False, max_new_tokens=3, min_new_tokens=min_new_tokens, allowed_tokens=LETTERS,
        stop_tokens=["eos"], chat_template="never", report_to=[], disable_tqdm=True,
        lr_scheduler_type="cosine", warmup_steps=0, learning_rate=3e-3, samples_per_prompt=32,
        max_steps=max_steps, output_dir=str(tmp_path), loss_type=loss_type, seed=0,
    )
    trainer = GFNTrainer(make_tiny_lm(vocab_size=6, hidden=32, layers=2), reward, args=args,
                         train_dataset=["<s>"], processing_class=make_tiny_tokenizer())
    strings = all_strings(min_new_tokens, 3)
    target = torch.tensor([table[" ".join(s)] for s in strings], dtype=torch.float64).softmax(0)
    p0 = exact_distribution(trainer, strings)
    assert abs(float(p0.sum()) - 1.0) < 1e-5  # the enumeration covers the whole space
    tv_before = 0.5 * float((p0 - target).abs().sum())
    trainer.train()
    p = exact_distribution(trainer, strings)
    assert abs(float(p.sum()) - 1.0) < 1e-5
    tv = 0.5 * float((p - target).abs().sum())
    return trainer, tv_before, tv, table


@pytest.mark.parametrize("loss_type", ["modified_subtb", "tb"])
def test_policy_matches_reward_distribution(tmp_path, loss_type):
    trainer, tv_before, tv, table = train_and_measure(tmp_path, loss_type)
    assert tv_before > 0.2  # the untrained policy is far from the target
    assert tv <= 0.02, f"{loss_type}: total variation {tv:.4f} to R/Z after training (was {tv_before:.4f})"
    if loss_type == "tb":
        # the learned log Z converges to log sum R
        log_z_true = math.log(sum(math.exp(v) for v in table.values()))
        assert abs(trainer.history[-1]["log_z"] - log_z_true) < 0.1


def test_min_length_uses_learned_log_z_anchor(tmp_path):
    """min_new_tokens=1: the empty string is not in the space; modified SubTB then needs (and
    learns) the scalar log Z anchor at the empty prefix."""
    trainer, tv_before, tv, table = train_and_measure(tmp_path, "modified_subtb", min_new_tokens=1)
    pol = trainer.accelerator.unwrap_model(trainer.policy)
    assert pol.log_z_kind == "scalar"
    assert tv_before > 0.2
    assert tv <= 0.02, f"total variation {tv:.4f} to R/Z after training (was {tv_before:.4f})"
    log_z_true = math.log(sum(math.exp(v) for k, v in table.items() if k))
    assert abs(float(pol.log_z) - log_z_true) < 0.1
