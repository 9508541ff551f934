"""Regression tests for seven engine defects (fixed in 3a911cd), one test per defect.

Each test checks what a user relies on through the trainer's public surface (``training_step``,
``_collect``, ``seed_buffer``, the buffer's ``state_dict``, the policy's forward), so it runs on
the code before the fix too and fails there for the defect itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.config import GFNConfig
from gfnlm.errors import ConfigError
from gfnlm.rewards import PrefixRuleReward, Reward
from gfnlm.trainer import GFNTrainer


def make_trainer(tmp_path, reward, dataset=("<s>",), **overrides):
    kw = dict(use_peft=True, lora_r=2, lora_alpha=4, max_new_tokens=2, allowed_tokens=["a", "b", "c"],
              chat_template="never", report_to=[], disable_tqdm=True, learning_rate=1e-2, warmup_steps=0,
              samples_per_prompt=4, prompts_per_step=1, max_steps=100, output_dir=str(tmp_path), seed=3,
              save_total_limit=None, tempered_fraction=0.0, replay_fraction=0.0, loss_type="vargrad")
    kw.update(overrides)
    return GFNTrainer(make_tiny_lm(vocab_size=6), reward, args=GFNConfig(**kw), train_dataset=list(dataset),
                      processing_class=make_tiny_tokenizer())


def _field(ep, name):
    """A field of a collected micro-batch (a dict before the fix, an ``Episodes`` after)."""
    return ep[name] if isinstance(ep, dict) else getattr(ep, name)


def _replayed_texts_and_log_r(trainer, ep):
    """(text, terminal log R) of the replayed episodes of a micro-batch: they are its last
    ``episodes/replayed`` rows."""
    n_rep = int(_field(ep, "metrics")["episodes/replayed"])
    tokens, lengths, log_r = _field(ep, "tokens"), _field(ep, "lengths"), _field(ep, "log_r")
    B = tokens.shape[0]
    out = []
    for b in range(B - n_rep, B):
        n = int(lengths[b])
        term = float(log_r[b, n]) if log_r.ndim == 2 else float(log_r[b])
        out.append((tokens[b, :n].tolist(), term))
    return out


def _policy_log_z(trainer, prompt_ids):
    """The learned log Z the policy gives each of ``prompt_ids`` (one value per prompt)."""
    pol = trainer.accelerator.unwrap_model(trainer.policy)
    P = len(prompt_ids)
    with torch.no_grad():
        _, _, log_z = pol(prompt_ids, torch.arange(P), torch.zeros(P, 1, dtype=torch.long),
                          torch.zeros(P, dtype=torch.long), trainer.constraints, trainer.pad_id)
    return log_z


# ----------------------------------------------------------------------------------------------
# 1. log_z: auto is per prompt with several prompts
# ----------------------------------------------------------------------------------------------


def test_auto_log_z_is_per_prompt_and_learns_each_prompts_partition(tmp_path):
    A, B = "<s> a", "<s> b"

    def offset(prompts, completions):  # log R: 0 for every completion of A, -3 for every one of B
        return [0.0 if p == A else -3.0 for p in prompts]

    tr = make_trainer(tmp_path / "two", offset, dataset=[A, B], loss_type="tb", prompts_per_step=2,
                      samples_per_prompt=8, learning_rate=1e-4, log_z_learning_rate=0.01)
    for _ in range(60):
        tr.training_step()
    z_a, z_b = _policy_log_z(tr, tr.prompt_ids).tolist()
    # Z_A / Z_B = e^3 exactly; the learned estimates (about E_q[log R - log q] per prompt) differ by about 3
    assert abs((z_a - z_b) - 3.0) < 0.75, (z_a, z_b)
    assert tr.accelerator.unwrap_model(tr.policy).log_z_kind == "prompt"
    one = make_trainer(tmp_path / "one", offset, dataset=[A, A], loss_type="tb")
    assert one.accelerator.unwrap_model(one.policy).log_z_kind == "scalar"  # a single distinct prompt
    # modified SubTB needs log Z when the empty prefix cannot stop: per prompt too
    sub = make_trainer(tmp_path / "sub", PrefixRuleReward(lambda p, t: 0.0), dataset=[A, B],
                       loss_type="modified_subtb", min_new_tokens=1)
    assert sub.accelerator.unwrap_model(sub.policy).log_z_kind == "prompt"


# ----------------------------------------------------------------------------------------------
# 2. modified DB is rejected where it has no pair of adjacent stoppable prefixes
# ----------------------------------------------------------------------------------------------


def test_modified_db_rejected_with_min_new_tokens_or_stop_after_tool(tmp_path):
    reward = PrefixRuleReward(lambda p, t: -float(len(t.split())))
    make_trainer(tmp_path / "ok", reward, loss_type="modified_db")  # control: valid without either rule
    with pytest.raises(ConfigError, match="modified_db.*min_new_tokens") as e:
        make_trainer(tmp_path / "min", reward, loss_type="modified_db", min_new_tokens=1)
    assert "\n" not in str(e.value)

    def tool(text):  # writes "a" after each "b"
        return "a" if text.rstrip().endswith("b") else None

    args = GFNConfig(use_peft=True, lora_r=2, lora_alpha=4, max_new_tokens=3, allowed_tokens=["a", "b", "c"],
                     chat_template="never", report_to=[], disable_tqdm=True, output_dir=str(tmp_path / "tool"),
                     loss_type="modified_db", stop_after_tool=True, samples_per_prompt=2, max_tool_tokens=2)
    with pytest.raises(ConfigError, match="modified_db.*stop_after_tool"):
        GFNTrainer(make_tiny_lm(vocab_size=6), reward, args=args, train_dataset=["<s>"],
                   processing_class=make_tiny_tokenizer(), tool=tool)


# ----------------------------------------------------------------------------------------------
# 3. the episode split never gives a negative on-policy count
# ----------------------------------------------------------------------------------------------


def test_each_row_gets_samples_per_prompt_episodes_when_fractions_round_up(tmp_path):
    # 3 * 0.5 rounds to 2 for both tempering and replay: 2 + 2 > 3
    tr = make_trainer(tmp_path, lambda prompts, completions: [-float(len(c.split())) for c in completions],
                      samples_per_prompt=3, prompts_per_step=2, tempered_fraction=0.5, replay_fraction=0.5)
    seen = []
    real = tr.compute_loss

    def recording(ep):
        seen.append((_field(ep, "prompt_index").clone(), int(_field(ep, "metrics")["episodes/replayed"])))
        return real(ep)

    tr.compute_loss = recording
    for _ in range(3):
        m = tr.training_step()
        assert math.isfinite(m["loss"])
    assert len(seen) == 3
    for idx, _ in seen:
        assert torch.bincount(idx, minlength=2).tolist() == [3, 3]
    assert any(n_rep > 0 for _, n_rep in seen[1:])  # replay was in play from the second step on

    from gfnlm.rollout import episode_split

    for k in range(1, 9):
        for rep in (0.0, 0.25, 0.5, 0.75, 1.0):
            for temp in (0.0, 0.25, 0.5, 0.75, 1.0):
                for prop in (0.0, 0.25, 0.5):
                    if rep + temp + prop > 1.0:
                        continue
                    for can in (False, True):
                        split = episode_split(k, rep, temp, can, prop)
                        assert min(split) >= 0 and sum(split) == k, (k, rep, temp, prop, can, split)
                        assert split[0] + split[1] >= 1  # the policy itself samples at least one episode


# ----------------------------------------------------------------------------------------------
# 4. replay never draws an episode sampled in the same step
# ----------------------------------------------------------------------------------------------


def _buffer_token_sets(trainer):
    return {tuple(e[0]) for entries in trainer.buffer.state_dict()["data"].values() for e in entries}


def test_replay_draws_only_episodes_stored_before_the_step(tmp_path):
    def reward(prompts, completions):  # the seeded completion "c" is the worst one
        return [-10.0 if c.strip() == "c" else 0.0 for c in completions]

    # replay strongly prefers high rewards: a fresh episode in the pool would be drawn at once
    tr = make_trainer(tmp_path, reward, samples_per_prompt=8, replay_fraction=0.5, buffer_priority_temperature=0.05)
    ep = tr._collect()  # empty buffer: nothing to replay on the first step
    assert int(_field(ep, "metrics")["episodes/replayed"]) == 0

    tr.buffer.clear()
    assert tr.seed_buffer({"<s>": ["c"]}) == 1
    for _ in range(3):
        before = _buffer_token_sets(tr)
        ep = tr._collect()
        replayed = _replayed_texts_and_log_r(tr, ep)
        assert len(replayed) == 4
        for tokens, _ in replayed:
            assert tuple(tokens) in before, f"replayed {tokens}, which was sampled in this very step"
    if "kind" in getattr(ep, "__dataclass_fields__", {}):
        from gfnlm.rollout import REPLAYED

        assert int((ep.kind == REPLAYED).sum()) == 4 and (ep.kind[-4:] == REPLAYED).all()


# ----------------------------------------------------------------------------------------------
# 5. rewards are data: no gradient through them, computed without grad
# ----------------------------------------------------------------------------------------------


class ParamReward(Reward):
    """A terminal log-reward computed from a trainable parameter (an un-detached tensor)."""

    prefix = False
    name = "param_reward"

    def __init__(self):
        self.w = torch.nn.Parameter(torch.tensor(-1.0))
        self.grad_enabled = []

    def __call__(self, batch):
        self.grad_enabled.append(torch.is_grad_enabled())
        n = batch.lengths.float()
        return self.w * (1.0 + n)


def test_rewards_are_detached_and_computed_without_grad(tmp_path):
    reward = ParamReward()
    tr = make_trainer(tmp_path, reward, loss_type="tb", replay_fraction=0.25)
    for _ in range(2):
        m = tr.training_step()
        assert math.isfinite(m["loss"])
    assert reward.w.grad is None  # the loss's backward never reached the reward's parameter
    assert reward.grad_enabled and not any(reward.grad_enabled)  # and rewards ran without grad


# ----------------------------------------------------------------------------------------------
# 6. log Z's gradient is clipped apart from the LM's
# ----------------------------------------------------------------------------------------------


def _norm(params):
    grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def test_log_z_gradient_does_not_shrink_the_lm_gradient(tmp_path):
    max_norm = 0.5
    # log R = -30 for everything: log Z (starting at 0) gets a gradient of about 2 * 30 nats
    tr = make_trainer(tmp_path, lambda prompts, completions: [-30.0] * len(completions), loss_type="tb",
                      log_z="scalar", max_grad_norm=max_norm, samples_per_prompt=8)
    named = list(tr.accelerator.unwrap_model(tr.policy).named_parameters())
    lm = [p for n, p in named if p.requires_grad and not n.startswith("log_z")]
    z = [p for n, p in named if p.requires_grad and n.startswith("log_z")]
    assert lm and z
    pre, post = {}, {}
    real_backward, real_step = tr.accelerator.backward, tr.optimizer.step

    def backward(loss, **kw):
        real_backward(loss, **kw)
        pre.update(lm=_norm(lm), z=_norm(z))

    def step(*a, **kw):
        post.update(lm=_norm(lm), z=_norm(z))
        return real_step(*a, **kw)

    tr.accelerator.backward, tr.optimizer.step = backward, step
    for _ in range(2):
        m = tr.training_step()
        assert pre["z"] > 10 * max_norm and pre["lm"] > 0  # the case the fix is about
        # each group is clipped to max_grad_norm on its own: log Z does not scale the LM down
        assert post["lm"] == pytest.approx(min(pre["lm"], max_norm), rel=1e-3)
        assert post["z"] == pytest.approx(min(pre["z"], max_norm), rel=1e-3)
        # and both norms (before clipping) are logged
        assert m["grad_norm"] == pytest.approx(pre["lm"], rel=1e-3)
        assert m["grad_norm_log_z"] == pytest.approx(pre["z"], rel=1e-3)


# ----------------------------------------------------------------------------------------------
# 7. the replay buffer is per row, not per prompt text
# ----------------------------------------------------------------------------------------------


def test_rows_sharing_a_prompt_keep_their_own_replayed_rewards(tmp_path):
    calls = []
    REWARD = {"a": 0.0, "b": -5.0}

    def by_answer(prompts, completions, answer):  # depends only on the row's answer column
        calls.append(list(answer))
        return [REWARD[x] for x in answer]

    rows = [{"prompt": "<s>", "answer": "a"}, {"prompt": "<s>", "answer": "b"}]
    tr = make_trainer(tmp_path, by_answer, dataset=rows, samples_per_prompt=4, replay_fraction=0.5)
    tr.seed_buffer({"<s>": ["a b", "c"]})
    seen_rows = set()
    for _ in range(8):
        calls.clear()
        ep = tr._collect()
        assert len(calls) == 1 and len(set(calls[0])) == 1  # one row per micro-batch (prompts_per_step=1)
        answer = calls[0][0]
        replayed = _replayed_texts_and_log_r(tr, ep)
        if replayed:
            seen_rows.add(answer)
        for tokens, log_r in replayed:
            assert log_r == REWARD[answer], f"row with answer {answer!r} replayed {tokens} with log R {log_r}"
    assert seen_rows == {"a", "b"}
