"""The sampler diagnostics of `gfnlm eval` (evaluation.sampler_report) against a brute-force
recomputation: the same samples, log q from one scoring pass per completion, log R from one plain
forward pass per completion, then the diagnostics' own formulas."""

from __future__ import annotations

import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.config import GFNConfig
from gfnlm.diagnostics import sampler_diagnostics
from gfnlm.evaluation import sampler_report, sequence_log_probs
from gfnlm.rewards import LMLikelihoodReward
from gfnlm.sampling import Constraints, sample


def test_sampler_report_equals_brute_force():
    tok = make_tiny_tokenizer()
    model = make_tiny_lm(seed=21, vocab_size=6)
    cons = Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=3, allowed_token_ids=[3, 4, 5])
    cfg = GFNConfig(chat_template="never", reward_temperature=2.0, reward_temperature_end=0.5,
                    reward_temperature_horizon=10, report_to=[])
    reward = LMLikelihoodReward(make_tiny_lm(seed=22, vocab_size=6), stop_token_ids=[2])  # another LM as target
    rows = [{"prompt": "<s>"}, {"prompt": "<s> a b"}]
    k = 6
    rep = sampler_report(model, tok, cfg, cons, [reward], rows, k=k, seed=5, iw_k=3)
    assert rep["reward_temperature"] == 0.5 and rep["n_prompts"] == 2 and rep["n_samples"] == k

    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    g = torch.Generator().manual_seed(5)
    s = sample(model, prompts, torch.arange(2).repeat_interleave(k), cons, pad_id=0, generator=g)
    comps = s.completion_ids()
    log_q, log_r = [], []
    target = reward.base_lm.module
    for i, z in enumerate(comps):
        p = prompts[i // k]
        log_q.append(float(sequence_log_probs(model, p, cons, [z])[0]))
        with torch.no_grad():
            lp = target(input_ids=torch.tensor([p + z])).logits[0].double().log_softmax(-1)
        log_r.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(z)) + float(lp[len(p) - 1 + len(z), 2]))
    want = sampler_diagnostics(torch.tensor(log_r).view(2, k) / 0.5, torch.tensor(log_q).view(2, k), iw_k=3)
    for key, v in want.items():
        assert abs(rep[key] - v) < 1e-4 * max(1.0, abs(v)), (key, rep[key], v)


def test_scored_samples_in_chunks_equal_brute_force():
    """Rows sampled and scored one at a time (batch_episodes = k): each row's completions, log q and
    untempered log R are those of a brute-force recomputation for that row, and the completions
    obey the constraints."""
    from gfnlm.evaluation import scored_samples

    tok = make_tiny_tokenizer()
    model = make_tiny_lm(seed=23, vocab_size=6)
    cons = Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=3, allowed_token_ids=[3, 4, 5])
    cfg = GFNConfig(chat_template="never", reward_temperature=2.0, reward_temperature_end=0.5,
                    reward_temperature_horizon=10, report_to=[])
    reward = LMLikelihoodReward(make_tiny_lm(seed=24, vocab_size=6), stop_token_ids=[2])
    rows = [{"prompt": "<s>"}, {"prompt": "<s> a b"}, {"prompt": "<s> b"}]
    k = 5
    log_r, log_q, comps, T = scored_samples(model, tok, cfg, cons, [reward], rows, k=k, seed=7, batch_episodes=k,
                                            temperature=1.0)
    assert T == 1.0 and log_r.shape == log_q.shape == (3, k) and [len(c) for c in comps] == [k] * 3
    target = reward.base_lm.module
    for i, r in enumerate(rows):
        p = tok(r["prompt"])["input_ids"]
        for j, z in enumerate(comps[i]):
            assert 1 <= len(z) <= 3 and set(z) <= {3, 4, 5}
            assert abs(float(sequence_log_probs(model, p, cons, [z])[0]) - float(log_q[i, j])) < 1e-4
            with torch.no_grad():
                lp = target(input_ids=torch.tensor([p + z])).logits[0].double().log_softmax(-1)
            want = sum(float(lp[len(p) - 1 + t, x]) for t, x in enumerate(z)) + float(lp[len(p) - 1 + len(z), 2])
            assert abs(want - float(log_r[i, j])) < 1e-4
    # the default temperature is the config's last, and chunking draws other samples of the same rows
    log_r2, _, comps2, T2 = scored_samples(model, tok, cfg, cons, [reward], rows, k=k, seed=7)
    assert T2 == 0.5 and comps2 != comps
