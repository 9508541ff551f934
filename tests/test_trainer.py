"""GFNTrainer: exact resume, atomic checkpoints, dropout off, one-line errors, logging."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm import checkpoint as ckpt
from gfnlm.config import GFNConfig
from gfnlm.errors import ConfigError, DataError, GFNLMError, RewardError
from gfnlm.rewards import PrefixRuleReward
from gfnlm.scoring import score
from gfnlm.trainer import GFNTrainer

PROMPTS = ["<s>", "<s> a", "<s> b c"]


def rule(prompt: str, text: str) -> float:
    """A prefix log-reward: likes 'a', dislikes repeats, depends on the prompt."""
    words = text.split()
    return words.count("a") - 0.7 * sum(x == y for x, y in zip(words, words[1:])) - 0.3 * len(prompt.split())


def make_trainer(tmp_path, model=None, reward=None, dataset=PROMPTS, peft_config=None, proposal=None, **overrides):
    kw = dict(use_peft=True, lora_r=2, lora_alpha=4, max_new_tokens=3, allowed_tokens=["a", "b", "c"],
              chat_template="never", report_to=[], disable_tqdm=True, learning_rate=1e-2, warmup_steps=1,
              samples_per_prompt=8, prompts_per_step=2, max_steps=4, output_dir=str(tmp_path), seed=3,
              save_total_limit=None)
    kw.update(overrides)
    return GFNTrainer(model if model is not None else make_tiny_lm(vocab_size=6),
                      reward if reward is not None else PrefixRuleReward(rule), args=GFNConfig(**kw),
                      train_dataset=dataset, processing_class=make_tiny_tokenizer(), peft_config=peft_config,
                      proposal=proposal)


def assert_one_line_gfnlm_error(excinfo):
    assert isinstance(excinfo.value, GFNLMError)
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    # raised by gfnlm itself, not from deep inside torch / transformers
    assert "gfnlm" in str(excinfo.traceback[-1].path)


# ----------------------------------------------------------------------------------------------
# (a) resume is exact
# ----------------------------------------------------------------------------------------------

RESUME_CFG = dict(replay_fraction=0.25, tempered_fraction=0.25, explore_temperature_min=0.5,
                  explore_temperature_max=2.0, epsilon=0.1, reward_temperature=2.0, reward_temperature_end=1.0,
                  reward_temperature_horizon=4, lr_scheduler_type="linear", save_steps=2, max_steps=4,
                  buffer_capacity=4)


def test_resume_is_exact(tmp_path):
    full = make_trainer(tmp_path / "full", **RESUME_CFG)
    init = full.trainable_state()
    assert init and all("lora_" in n for n in init)  # LoRA: only the adapters train
    full.train()
    final = full.trainable_state()
    assert any(not torch.equal(init[n], final[n]) for n in init)
    assert full.history[-1]["episodes/replayed"] > 0  # replay was used
    assert (tmp_path / "full" / "checkpoint-2").is_dir() and ckpt.is_complete(tmp_path / "full" / "checkpoint-2")

    resumed = make_trainer(tmp_path / "resumed", **RESUME_CFG)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.step == 4 and len(resumed.history) == 2
    got = resumed.trainable_state()
    assert got.keys() == final.keys()
    for n in final:
        assert torch.equal(got[n], final[n]), n
    # the same trajectory, not just the same end point: the logged metrics of steps 3-4 agree
    for a, b in zip(full.history[2:], resumed.history):
        for k in ("loss", "reward/log_r_mean", "episodes/length_mean", "learning_rate", "reward_temperature"):
            assert a[k] == b[k], k
    # the optimiser state was restored too
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])


def random_proposal(prompts, counts, seed):
    """1-3 random words ("a", "b", "c": ids 3-5) per episode, from torch's global generator seeded ``seed``."""
    torch.manual_seed(seed)
    return [[torch.randint(3, 6, (int(torch.randint(1, 4, ())),)).tolist() for _ in range(k)] for k in counts]


def test_resume_is_exact_with_proposed_episodes(tmp_path):
    cfg = {**RESUME_CFG, "proposal_fraction": 0.25}
    full = make_trainer(tmp_path / "full", proposal=random_proposal, **cfg)
    full.train()
    assert all(h["episodes/proposed"] == 4 for h in full.history)  # 2 of 8 episodes for each of 2 prompts
    resumed = make_trainer(tmp_path / "resumed", proposal=random_proposal, **cfg)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    a, b = full.trainable_state(), resumed.trainable_state()
    assert all(torch.equal(a[n], b[n]) for n in a)
    for x, y in zip(full.history[2:], resumed.history):
        assert x["loss"] == y["loss"] and x["reward/log_r_proposed"] == y["reward/log_r_proposed"]


def test_resume_without_restoring_state_differs(tmp_path):
    """Control for the test above: a fresh run that only copies the parameters of step 2 (no
    optimiser, buffer, RNG or step) ends elsewhere, so the exact match above is meaningful."""
    full = make_trainer(tmp_path / "full", **RESUME_CFG)
    full.train()
    partial = make_trainer(tmp_path / "p", **{**RESUME_CFG, "max_steps": 2})
    state = load_file(str(tmp_path / "full" / "checkpoint-2" / "trainable.safetensors"))
    pol = partial.accelerator.unwrap_model(partial.policy)
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if n in state:
                p.copy_(state[n])
    partial.train()
    a, b = full.trainable_state(), partial.trainable_state()
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_resume_true_picks_latest_and_checks_process_count(tmp_path):
    tr = make_trainer(tmp_path, save_steps=1, max_steps=3, save_total_limit=2)
    tr.train()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-3"]  # rotation keeps the last two
    info = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert info["step"] == 3
    more = make_trainer(tmp_path, save_steps=1, max_steps=4, save_total_limit=2)
    more.train(resume_from_checkpoint=True)
    assert more.step == 4 and len(more.history) == 1
    info["num_processes"] = 2
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(info))
    again = make_trainer(tmp_path, max_steps=5)
    with pytest.raises(DataError, match="2 processes") as e:
        again.train(resume_from_checkpoint=True)
    assert_one_line_gfnlm_error(e)
    with pytest.raises(DataError, match="no complete checkpoint"):
        make_trainer(tmp_path / "empty").train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------------------------
# (b) checkpoints are atomic
# ----------------------------------------------------------------------------------------------


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, save_steps=1, max_steps=3)
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        if Path(f).name == "optimizer.bin" and tr.step == 2:
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        tr.train()
    monkeypatch.setattr(torch, "save", real_save)
    for p in tmp_path.iterdir():
        if re.fullmatch(r"checkpoint-\d+", p.name):
            assert ckpt.is_complete(p), f"{p.name} exists without the COMPLETE marker"
    assert not (tmp_path / "checkpoint-2").exists()
    first = tmp_path / "checkpoint-1"
    assert ckpt.is_complete(first) and ckpt.latest(tmp_path) == first
    for f in ("trainable.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
              "custom_checkpoint_1.pkl", "trainer_state.json", "gfnlm_config.yaml", "adapter"):
        assert (first / f).exists(), f
    # the earlier checkpoint is intact: a fresh trainer resumes from it and carries on
    fresh = make_trainer(tmp_path, save_steps=1, max_steps=3)
    fresh.load_checkpoint(first)
    assert fresh.step == 1
    state = load_file(str(first / "trainable.safetensors"))
    got = fresh.trainable_state()
    assert all(torch.equal(state[n], got[n]) for n in state)
    fresh.train(resume_from_checkpoint=True)
    assert fresh.step == 3 and ckpt.is_complete(tmp_path / "checkpoint-3")
    # a folder without the marker is refused
    (tmp_path / "checkpoint-9").mkdir()
    with pytest.raises(DataError, match="not a complete gfnlm checkpoint"):
        fresh.load_checkpoint(tmp_path / "checkpoint-9")
    assert ckpt.latest(tmp_path) == tmp_path / "checkpoint-3"


def test_commit_replaces_an_existing_checkpoint(tmp_path):
    final = tmp_path / "checkpoint-5"
    tmp = ckpt.begin(final)
    (tmp / "a.txt").write_text("old")
    ckpt.commit(final)
    tmp = ckpt.begin(final)
    (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "old"  # untouched until the commit
    ckpt.commit(final)
    assert (final / "a.txt").read_text() == "new" and ckpt.is_complete(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


# ----------------------------------------------------------------------------------------------
# (c) dropout is off
# ----------------------------------------------------------------------------------------------


def make_dropout_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                      attention_dropout=0.5)
    return LlamaForCausalLM(cfg)


def test_dropout_is_off_during_training(tmp_path):
    from peft import LoraConfig

    model = make_dropout_lm()
    model.train()
    x = torch.tensor([[1, 3, 4, 5, 3]])
    with torch.no_grad():  # dropout is live in this model before the trainer sees it
        assert not torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False)
    tr = make_trainer(tmp_path, model=model, peft_config=lora)
    assert any(isinstance(m, torch.nn.Dropout) for m in tr.model.modules())  # LoRA's dropout modules
    tokens = torch.tensor([[3, 4, 5], [4, 0, 0], [5, 5, 0]])
    lengths = torch.tensor([3, 1, 2])
    idx = torch.tensor([0, 1, 1])
    prompts = tr.prompt_ids[:2]

    def scores():
        lp, lt, _ = tr.policy(prompts, idx, tokens, lengths, tr.constraints, tr.pad_id)
        return lp.detach(), lt.detach()

    a, b = scores(), scores()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # also with the modules switched to train mode: every dropout probability is 0
    tr.policy.train()
    c, d = scores(), scores()
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
    torch.testing.assert_close(a[0], c[0])
    tr.policy.eval()
    # and training steps keep it that way
    tr.training_step()
    e, f = scores(), scores()
    assert torch.equal(e[0], f[0]) and torch.equal(e[1], f[1])


# ----------------------------------------------------------------------------------------------
# (d) bad input: the documented error class and a one-line message
# ----------------------------------------------------------------------------------------------


def test_nan_reward_is_a_reward_error(tmp_path):
    def nan_after_b(prompt, text):
        return float("nan") if "b" in text else 0.0

    tr = make_trainer(tmp_path, reward=PrefixRuleReward(nan_after_b, name="nan_after_b"), max_steps=50)
    with pytest.raises(RewardError) as e:
        tr.train()
    assert_one_line_gfnlm_error(e)
    assert "nan_after_b" in str(e.value) and "NaN" in str(e.value)


def test_seeding_an_empty_completion_below_min_length(tmp_path):
    tr = make_trainer(tmp_path, min_new_tokens=1)
    assert tr.seed_buffer({"<s>": ["a b", "c"]}) == 2
    with pytest.raises(DataError, match="empty completion.*min_new_tokens=1") as e:
        tr.seed_buffer({"<s>": [""]})
    assert_one_line_gfnlm_error(e)
    with pytest.raises(DataError, match="longer than max_new_tokens"):
        tr.seed_buffer({"<s>": ["a b c a"]})
    with pytest.raises(DataError, match="not in the training dataset"):
        tr.seed_buffer({"<s> c c": ["a"]})


def test_seeded_completions_are_replayed_with_their_rewards(tmp_path):
    tr = make_trainer(tmp_path, replay_fraction=0.5, tempered_fraction=0.0, prompts_per_step=1,
                      dataset=["<s>"])
    assert tr.seed_buffer({"<s>": ["a a", "c"]}) == 2
    stored = {e.tokens: e for e in tr.buffer.entries(0)}
    assert stored[(3, 3)].log_r_terminal == pytest.approx(rule("<s>", "a a"))
    torch.testing.assert_close(stored[(3, 3)].log_r_prefix,
                               torch.tensor([rule("<s>", ""), rule("<s>", "a"), rule("<s>", "a a")]))
    m = tr.training_step()
    assert m["episodes/replayed"] == 4.0


def test_prompt_longer_than_context(tmp_path):
    long_prompt = "<s> " + " ".join(["a", "b"] * 35)  # 71 tokens, the tiny model's context is 64
    with pytest.raises(DataError, match="exceeds the model's context of 64") as e:
        make_trainer(tmp_path, dataset=["<s>", long_prompt])
    assert_one_line_gfnlm_error(e)
    # a prompt that fits, but not with max_new_tokens on top
    with pytest.raises(DataError, match="max_new_tokens=10"):
        make_trainer(tmp_path, dataset=["<s> " + " ".join(["a"] * 60)], max_new_tokens=10)


def test_unknown_config_field(tmp_path):
    with pytest.raises(ConfigError, match="'lora_rank'.*did you mean 'lora_r'") as e:
        GFNConfig.from_dict({"lora_rank": 8})
    assert_one_line_gfnlm_error(e)
    (tmp_path / "c.yaml").write_text("max_step: 3\n")
    with pytest.raises(ConfigError, match="'max_step'.*'max_steps'"):
        GFNConfig.from_yaml(tmp_path / "c.yaml")


def test_malformed_dataset_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "<s>"}\n{"prompt": "<s> a"}\n{"prompt": "<s> b"\n{"prompt": "<s> c"}\n')
    with pytest.raises(DataError, match=r"prompts\.jsonl: line 3 is not valid JSON") as e:
        make_trainer(tmp_path / "out", dataset=str(p))
    assert_one_line_gfnlm_error(e)
    p.write_text('{"prompt": "<s>"}\n{"text": "<s> a"}\n')
    with pytest.raises(DataError, match="row 2 has no 'prompt' field"):
        make_trainer(tmp_path / "out", dataset=str(p))
    p.write_text('{"prompt": "<s>", "answer": "a"}\n\n{"prompt": "<s> b", "answer": "b"}\n')
    tr = make_trainer(tmp_path / "out", dataset=str(p))
    assert [r["prompt"] for r in tr.rows] == ["<s>", "<s> b"] and tr.rows[1]["answer"] == "b"


def test_multi_token_stop_or_allowed_token(tmp_path):
    with pytest.raises(ConfigError, match="allowed_tokens: 'a b' is 2 tokens") as e:
        make_trainer(tmp_path, allowed_tokens=["a b"])
    assert_one_line_gfnlm_error(e)
    with pytest.raises(ConfigError, match="stop_tokens: 'c a' is 2 tokens"):
        make_trainer(tmp_path, stop_tokens=["eos", "c a"])


# ----------------------------------------------------------------------------------------------
# (e) TensorBoard
# ----------------------------------------------------------------------------------------------


def test_tensorboard_events_are_written(tmp_path):
    tr = make_trainer(tmp_path, report_to=["tensorboard"], max_steps=2)
    tr.train()
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss" in tags and "reward/log_r_mean" in tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]


# ----------------------------------------------------------------------------------------------
# (f) terminal-only rewards need tb or vargrad
# ----------------------------------------------------------------------------------------------


def count_a(prompts, completions, **kw):
    return [float(c.split().count("a")) for c in completions]


def test_terminal_reward_with_modified_subtb_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="use loss_type tb or vargrad") as e:
        make_trainer(tmp_path, reward=count_a, loss_type="modified_subtb")
    assert "count_a" in str(e.value)
    assert_one_line_gfnlm_error(e)
    with pytest.raises(ConfigError, match="tb or vargrad"):
        make_trainer(tmp_path, reward=count_a, loss_type="modified_db")


@pytest.mark.parametrize("loss_type", ["tb", "vargrad"])
def test_terminal_reward_trains_with_tb_and_vargrad(tmp_path, loss_type):
    tr = make_trainer(tmp_path, reward=count_a, loss_type=loss_type, max_steps=3)
    before = tr.trainable_state()
    tr.train()
    after = tr.trainable_state()
    assert len(tr.history) == 3 and all(math.isfinite(m["loss"]) for m in tr.history)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert any(n.startswith("log_z") for n in after) == (loss_type == "tb")  # tb learns log Z, vargrad estimates it
    assert ckpt.is_complete(tmp_path / "checkpoint-3")


def test_sample_returns_text_under_the_constraints(tmp_path):
    tr = make_trainer(tmp_path, min_new_tokens=1)
    out = tr.sample(["<s>", "<s> b c"], n=5)
    assert len(out) == 2 and all(len(x) == 5 for x in out)
    for texts in out:
        for t in texts:
            words = t.split()
            assert 1 <= len(words) <= 3 and set(words) <= {"a", "b", "c"}


def test_log_probs_of_training_equal_sampled_ones(tmp_path):
    """The trainer's scoring pass (through the wrapped policy) agrees with sampling."""
    from gfnlm.sampling import sample

    tr = make_trainer(tmp_path, min_new_tokens=1)
    s = sample(tr.model, tr.prompt_ids, torch.tensor([0, 1, 2] * 4), tr.constraints,
               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp, lt, _ = tr.policy(tr.prompt_ids, s.prompt_index, s.tokens, s.lengths, tr.constraints, tr.pad_id)
        sc = score(tr.model, tr.prompt_ids, s.prompt_index, s.tokens, s.lengths, tr.constraints)
    torch.testing.assert_close(lp, s.log_pf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp, sc.log_pf)
    assert torch.equal(torch.isneginf(lt), torch.isneginf(s.log_pterm))


def test_rows_are_drawn_in_proportion_to_the_weight_column(tmp_path):
    """row_weight_column: a row of weight 5 is drawn about 5 times as often as a row of weight 1
    (binomial check over many draws); bad weights are a one-line error."""
    from gfnlm.errors import DataError

    rows = [{"prompt": "<s>", "weight": 5.0}, {"prompt": "<s> a", "weight": 1.0}, {"prompt": "<s> b", "weight": 0.0}]
    tr = make_trainer(tmp_path, dataset=rows, row_weight_column="weight")
    draws = tr.collector.draw_rows(6000)
    counts = [draws.count(i) for i in range(3)]
    assert counts[2] == 0
    p = 5 / 6
    assert abs(counts[0] - 6000 * p) < 4.5 * math.sqrt(6000 * p * (1 - p))
    bad = make_trainer(tmp_path / "bad", dataset=[{"prompt": "<s>", "weight": -1.0}], row_weight_column="weight")
    with pytest.raises(DataError, match="weights must be finite, >= 0"):
        bad.collector.draw_rows(1)
    missing = make_trainer(tmp_path / "m", dataset=["<s>"], row_weight_column="weight")
    with pytest.raises(DataError, match="every dataset row needs a number there"):
        missing.collector.draw_rows(1)


def test_a_reward_temperature_horizon_beyond_max_steps_is_warned_with_the_temperature_reached(tmp_path, capsys):
    """T 1.0 -> 0.5 over 4 steps in a 2-step run never reaches 0.5: the run says which T its last
    step trains at (the history's) when the trainer is built, and the fix; a horizon within the run
    says nothing (EM, which trains each round with a smaller max_steps, gets no false warning)."""
    tr = make_trainer(tmp_path / "long", max_steps=2, reward_temperature=1.0, reward_temperature_end=0.5,
                      reward_temperature_horizon=4)
    tr.train()
    last = tr.history[-1]["reward_temperature"]
    assert last == pytest.approx(0.875)
    out = capsys.readouterr().out
    assert (f"warning: reward_temperature_horizon 4 is beyond max_steps 2, so the last step trains at reward "
            f"temperature {last:.3g}, not reward_temperature_end 0.5: set reward_temperature_horizon 2") in out
    tr = make_trainer(tmp_path / "within", max_steps=2, reward_temperature=1.0, reward_temperature_end=0.5,
                      reward_temperature_horizon=2)
    tr.args.max_steps = 1  # as EM does: train() up to the end of each round
    tr.train()
    tr.args.max_steps = 2
    tr.train()
    assert tr.history[-1]["reward_temperature"] == pytest.approx(0.75)
    assert "reward_temperature_horizon" not in capsys.readouterr().out


def test_steps_whose_episodes_give_no_residual_are_counted_and_warned_once(tmp_path, capsys):
    """Episodes that may stop only at their full length have one stoppable prefix each: modified
    SubTB without log Z gets no pair, so the loss is 0. The history counts it at every step and the
    run says so once, with the fix; anchored at a learned log Z, every episode contributes."""
    tr = make_trainer(tmp_path / "none", min_new_tokens=3, log_z="none", max_steps=2)
    tr.train()
    assert [m["episodes/without_residual"] for m in tr.history] == [1.0, 1.0]
    assert all(m["loss"] == 0.0 for m in tr.history)
    out = capsys.readouterr().out
    assert out.count("warning: step 1: no episode had two stoppable prefixes") == 1
    assert "set log_z: scalar or prompt" in out and "\n" not in out.strip()

    tr = make_trainer(tmp_path / "scalar", min_new_tokens=3, log_z="scalar", max_steps=2)
    tr.train()
    assert [m["episodes/without_residual"] for m in tr.history] == [0.0, 0.0]
    assert all(m["loss"] > 0 for m in tr.history)
    tr = make_trainer(tmp_path / "free", max_steps=2)  # stopping allowed at every prefix
    tr.train()
    assert all(m["episodes/without_residual"] < 1.0 for m in tr.history)
    assert "warning" not in capsys.readouterr().out
    # VarGrad with one episode per prompt: no group to estimate log Z from; the warning says so
    tr = make_trainer(tmp_path / "vargrad", loss_type="vargrad", samples_per_prompt=1, max_steps=1)
    tr.train()
    assert tr.history[0]["episodes/without_residual"] == 1.0
    out = capsys.readouterr().out
    assert "warning: step 1: no prompt had two episodes, so the vargrad loss was 0" in out
    assert "sample samples_per_prompt >= 2 episodes per prompt" in out
