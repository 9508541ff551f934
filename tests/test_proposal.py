"""Proposed episodes (``proposal_fraction``): another behaviour policy's episodes are scored, replayed
and trained on like the policy's own, its randomness comes from the run's stream, and bad proposals
or settings are one-line errors. The contrastive task's proposal is the token-level sampler on the
base model (adapters off), checked against a never-wrapped copy of that model."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.config import GFNConfig
from gfnlm.errors import ConfigError, DataError
from gfnlm.rollout import PROPOSED
from gfnlm.trainer import GFNTrainer

A, B, C = 3, 4, 5  # the tiny tokenizer's word ids


def reward(prompts, completions):  # log R: "a b" is the best completion
    return [0.0 if c.split() == ["a", "b"] else -4.0 for c in completions]


def trainer_with(tmp_path, proposal, **over):
    kw = dict(use_peft=True, lora_r=2, lora_alpha=4, max_new_tokens=2, allowed_tokens=["a", "b", "c"],
              chat_template="never", report_to=[], disable_tqdm=True, learning_rate=1e-2, warmup_steps=0,
              samples_per_prompt=4, prompts_per_step=2, max_steps=10, output_dir=str(tmp_path), seed=3,
              tempered_fraction=0.25, replay_fraction=0.0, proposal_fraction=0.5, loss_type="tb")
    kw.update(over)
    return GFNTrainer(make_tiny_lm(vocab_size=6), reward, args=GFNConfig(**kw), train_dataset=["<s>", "<s> c"],
                      processing_class=make_tiny_tokenizer(), proposal=proposal)


class Recorder:
    """A proposal that writes "a b" and records its calls; it draws from torch's global generator
    (as ``generate`` does), which the collector must restore."""

    def __init__(self, episode=(A, B)):
        self.calls, self.episode = [], list(episode)

    def __call__(self, prompts, counts, seed):
        torch.manual_seed(seed)
        torch.rand(3)
        self.calls.append((prompts, counts, seed))
        return [[list(self.episode) for _ in range(k)] for k in counts]


def test_proposed_episodes_are_scored_buffered_and_trained_on(tmp_path):
    rec = Recorder()
    tr = trainer_with(tmp_path, rec, replay_fraction=0.25)
    state = torch.get_rng_state()
    ep = tr._collect()
    assert torch.equal(torch.get_rng_state(), state)  # the proposal's reseeding did not leak out
    (prompts, counts, seed), = rec.calls
    assert counts == [2, 2] and prompts == ep.prompts  # 4 episodes a row: 1 on-policy, 1 tempered, 2 proposed
    assert ep.metrics["episodes/proposed"] == 4.0
    prop = (ep.kind == PROPOSED).nonzero().squeeze(1)
    assert ep.prompt_index[prop].tolist() == [0, 0, 1, 1]
    for b in prop.tolist():
        n = int(ep.lengths[b])
        assert ep.tokens[b, :n].tolist() == [A, B]
        assert float(ep.log_r[b]) == 0.0  # scored by the run's reward like any fresh episode
    assert all(((A, B), 0.0) in {(tuple(e[0]), e[1]) for e in es} for es in tr.buffer.state_dict()["data"].values())

    # the next step draws another seed from the run's stream, and replays the proposal's episode
    m = tr.training_step()
    assert math.isfinite(m["loss"]) and rec.calls[-1][2] != seed

    # the same run seed gives the same proposal seeds (a resumed run proposes the same episodes)
    rec2 = Recorder()
    tr2 = trainer_with(tmp_path / "again", rec2, replay_fraction=0.25)
    tr2._collect()
    tr2.training_step()
    assert [c[2] for c in rec2.calls] == [c[2] for c in rec.calls]


def test_bad_proposals_and_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="proposal_fraction 0.5 needs a proposal sampler"):
        trainer_with(tmp_path, None)
    with pytest.raises(ConfigError, match="must not exceed 1"):
        GFNConfig(tempered_fraction=0.5, replay_fraction=0.25, proposal_fraction=0.5)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        GFNConfig(proposal_fraction=-0.1)
    with pytest.raises(DataError, match="tokens the policy may not write"):
        trainer_with(tmp_path, Recorder(episode=(A, 2)))._collect()  # </s> is not an action
    with pytest.raises(DataError, match="longer than max_new_tokens=2"):
        trainer_with(tmp_path, Recorder(episode=(A, B, C)))._collect()
    with pytest.raises(DataError, match=r"returned \[1, 1\] episodes per prompt, not \[2, 2\]"):
        trainer_with(tmp_path, lambda p, counts, s: [[[A]] for _ in counts])._collect()
    # without proposal_fraction nothing is proposed, and the episode split is what it was
    rec = Recorder()
    ep = trainer_with(tmp_path, rec, proposal_fraction=0.0)._collect()
    assert rec.calls == [] and not (ep.kind == PROPOSED).any() and "episodes/proposed" not in ep.metrics
