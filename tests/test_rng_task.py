"""The uniform-random-integer task: validity rule, prefix rewards, metrics, plot."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.errors import ConfigError
from gfnlm.rewards import RewardBatch, compute_log_rewards
from gfnlm.tasks import build_config, get_task_class
from gfnlm.tasks.rng import NUM_VALUES, RandomIntegerTask, distribution_metrics, exact_metrics, parse_integer, plot_histograms

DIGITS = [str(d) for d in range(10)]


def digit_tokenizer(extra=("x",)):
    """Digits are single tokens and decode without spaces ("4", "2" -> "42"), as in SmolLM2."""
    from tokenizers import decoders

    tok = make_tiny_tokenizer(words=DIGITS + list(extra))
    tok.backend_tokenizer.decoder = decoders.Fuse()
    return tok


@pytest.mark.parametrize("text", [str(k) for k in range(101)])
def test_every_integer_0_to_100_is_valid(text):
    assert parse_integer(text) == int(text)


@pytest.mark.parametrize("text", ["", "00", "01", "007", "101", "1000", "-1", " 5", "5 ", "5.", "+3", "１"])
def test_invalid_answers(text):
    assert parse_integer(text) is None


def test_prefix_rewards_follow_the_rule():
    tok = digit_tokenizer()
    task = RandomIntegerTask({"log_reward_floor": -40.0})
    cfg = build_config("rng", {"chat_template": "never"})
    cons = task.constraints(cfg, tok)
    assert sorted(cons.allowed_token_ids) == sorted(tok.convert_tokens_to_ids(DIGITS))
    rewards = task.reward_funcs(None, tok, cons)
    # completions "1 0 0" (100), "0 5" (05: invalid), "4 2" (42), "1 0 1" (101: invalid)
    seqs = [["1", "0", "0"], ["0", "5"], ["4", "2"], ["1", "0", "1"]]
    tokens = torch.zeros(4, 3, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(tok.convert_tokens_to_ids(s))
    lengths = torch.tensor([len(s) for s in seqs])
    batch = RewardBatch(prompts=["p"] * 4, prompt_ids=[[1]], prompt_index=torch.zeros(4, dtype=torch.long),
                        tokens=tokens, lengths=lengths, completions=["".join(s) for s in seqs], tokenizer=tok)
    log_r = compute_log_rewards(rewards, None, batch)
    F = -40.0
    assert log_r[0].tolist() == [F, 0.0, 0.0, 0.0]  # "", "1", "10", "100"
    assert log_r[1, :3].tolist() == [F, 0.0, F]  # "", "0", "05"
    assert log_r[2, :3].tolist() == [F, 0.0, 0.0]
    assert log_r[3].tolist() == [F, 0.0, 0.0, F]


def test_default_floor_is_far_below_L_log_V():
    tok = digit_tokenizer()
    task = RandomIntegerTask()
    cfg = build_config("rng", {"chat_template": "never"})
    cons = task.constraints(cfg, tok)
    floor = task.floor(tok, cons)
    L, V = cons.max_new_tokens, len(cons.allowed_token_ids) + 1
    assert floor <= -(L * math.log(V)) - 19.9
    # the target's invalid mass stays negligible: (number of invalid strings) * e^floor << 101
    n_strings = sum(10 ** k for k in range(1, L + 1))
    assert (n_strings - NUM_VALUES) * math.exp(floor) / NUM_VALUES < 1e-6


def test_restrict_vocab_needs_single_digit_tokens():
    tok = make_tiny_tokenizer(words=["a", "b"])
    task = RandomIntegerTask()
    with pytest.raises(ConfigError, match="restrict_vocab"):
        task.constraints(build_config("rng", {}), tok)


def test_unknown_task_arg_is_an_error():
    with pytest.raises(ConfigError, match="did you mean 'seed_buffer'"):
        RandomIntegerTask({"seed_bufer": True})


def test_task_defaults_are_overridable():
    cfg = build_config("rng", {"max_steps": 7})
    assert cfg.max_steps == 7 and cfg.max_new_tokens == 3 and cfg.task == "rng"
    assert get_task_class("rng") is RandomIntegerTask
    with pytest.raises(ConfigError, match="unknown task"):
        get_task_class("nope")


def test_distribution_metrics():
    perfect = [str(k) for k in range(NUM_VALUES)] * 4
    m = distribution_metrics(perfect)
    assert m["valid_fraction"] == 1.0 and m["distinct"] == NUM_VALUES
    assert m["tv_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    # KL to uniform over 102 outcomes (101 integers + invalid) of a perfect sampler is log(102/101)
    assert m["kl_to_uniform"] == pytest.approx(math.log(102 / 101))
    half = ["7"] * 50 + ["junk"] * 50
    m = distribution_metrics(half)
    assert m["valid_fraction"] == 0.5 and m["distinct"] == 1 and m["invalid"] == 50
    expected_tv = 0.5 * (abs(0.5 - 1 / 101) + 100 / 101 + 0.5)
    assert m["tv_to_uniform"] == pytest.approx(expected_tv)


def test_exact_metrics():
    u = torch.full((NUM_VALUES,), 1.0 / NUM_VALUES, dtype=torch.float64)
    assert exact_metrics(u)["exact_tv_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    skew = u * 0.9
    m = exact_metrics(skew)
    assert m["exact_valid_mass"] == pytest.approx(0.9)
    assert m["exact_tv_to_uniform"] == pytest.approx(0.5 * (0.1 + 0.1))


def test_evaluate_exact_probabilities_sum_with_invalid_to_one():
    """Exact q(k) of the 101 answers, plus the invalid strings, covers the whole space."""
    tok = digit_tokenizer()
    task = RandomIntegerTask()
    cfg = build_config("rng", {"chat_template": "never"})
    cons = task.constraints(cfg, tok)
    model = make_tiny_lm(vocab_size=len(tok))
    r = task.evaluate(model, tok, cfg, cons, n=200, seed=0)
    assert r["n"] == 200 and len(r["counts"]) == NUM_VALUES and sum(r["counts"]) + r["invalid"] == 200
    # enumerate every digit string of length 1..3 and check the exact total is 1
    from itertools import product

    from gfnlm.data import render_prompt
    from gfnlm.evaluation import sequence_log_probs

    strings = [list(p) for L in range(1, 4) for p in product(DIGITS, repeat=L)]
    ids = [tok.convert_tokens_to_ids(s) for s in strings]
    logp = sequence_log_probs(model, render_prompt(tok, task.args.prompt, "never"), cons, ids, pad_id=0)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    valid = [i for i, s in enumerate(strings) if parse_integer("".join(s)) is not None]
    assert len(valid) == NUM_VALUES
    assert logp[valid].exp().sum().item() == pytest.approx(r["exact_valid_mass"], abs=1e-5)


def test_evaluate_exact_diagnostics_from_the_exact_probabilities():
    """The exact_* diagnostics of evaluate, recomputed by hand from its exact q(k) (R = 1 on 0..100)."""
    tok = digit_tokenizer()
    task = RandomIntegerTask()
    cfg = build_config("rng", {"chat_template": "never"})
    cons = task.constraints(cfg, tok)
    r = task.evaluate(make_tiny_lm(vocab_size=len(tok)), tok, cfg, cons, n=8, seed=0)
    assert "exact_tv_to_uniform" in r and "exact_valid_mass" in r and len(r["exact_probs"]) == NUM_VALUES
    q = list(r["exact_probs"])
    assert all(x > 0 for x in q)
    m = sum(q)
    qt = [x / m for x in q]  # q conditioned on the valid answers
    p = 1.0 / NUM_VALUES  # target: uniform, Z = 101
    mean_lw = sum(t * -math.log(x) for t, x in zip(qt, q))  # E_q~[log R - log q], log R = 0
    want = {
        "exact_log_z": math.log(NUM_VALUES),
        "exact_q_mass_outside": max(1.0 - m, 0.0),
        "exact_elbo": sum(x * math.log(1.0 / x) for x in q),
        "exact_kl_q_p": sum(t * math.log(t / p) for t in qt),
        "exact_kl_p_q": sum(p * math.log(p / t) for t in qt),
        "exact_tv": r["exact_tv_to_uniform"],
        "exact_log_w_var": sum(t * (-math.log(x) - mean_lw) ** 2 for t, x in zip(qt, q)),
        "exact_ess": sum(t * (1 / t) for t in qt) ** 2 / sum(t * (1 / t) ** 2 for t in qt),  # w = R / q~ = 1 / q~
    }
    for key, value in want.items():
        assert r[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert r["exact_log_w_std"] == pytest.approx(math.sqrt(want["exact_log_w_var"]), rel=1e-6)
    assert r["exact_elbo"] < r["exact_log_z"] and 0 < r["exact_ess"] < 1


def test_histogram_png(tmp_path):
    r = distribution_metrics([str(k % 101) for k in range(500)] + ["x"] * 20)
    r["exact_probs"] = [1 / 101] * 101
    path = plot_histograms({"a": r, "b": r}, tmp_path / "h.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
