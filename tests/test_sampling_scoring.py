"""Sampling and teacher-forced scoring agree with each other and with the definitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import make_tiny_lm
from gfnlm.sampling import Constraints, sample
from gfnlm.scoring import score

# prompts of different lengths (left padding); each starts with <s> (id 1) so the tiny model can
# tell positions apart
PROMPTS = [[1], [1, 3, 4, 5], [1, 6], [1, 7, 7, 8, 3, 9]]


def _assert_same_logp(a: torch.Tensor, b: torch.Tensor, atol=1e-5):
    """Equal, with -inf in the same places."""
    assert a.shape == b.shape
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(a)
    assert torch.isfinite(b[fin]).all()
    torch.testing.assert_close(a[fin], b[fin], atol=atol, rtol=1e-5)


def _score(model, prompts, s, c):
    with torch.no_grad():
        return score(model, prompts, s.prompt_index, s.tokens, s.lengths, c)


# ----------------------------------------------------------------------------------------------
# (a) log-probabilities accumulated while sampling == teacher-forced scoring
# ----------------------------------------------------------------------------------------------

CASES = [
    dict(constraints=dict(stop_token_ids=[2], min_new_tokens=0, max_new_tokens=5), temperature=1.0, epsilon=0.0),
    dict(constraints=dict(stop_token_ids=[2, 5, 9], min_new_tokens=2, max_new_tokens=6,
                          forbidden_token_ids=[4, 11]), temperature=1.7, epsilon=0.0),
    dict(constraints=dict(stop_token_ids=[2, 8], min_new_tokens=1, max_new_tokens=4,
                          allowed_token_ids=[3, 4, 6, 10, 12], forbidden_token_ids=[10]), temperature=0.6, epsilon=0.3),
    dict(constraints=dict(stop_token_ids=[2], min_new_tokens=3, max_new_tokens=3), temperature=2.5, epsilon=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c['temperature']}-eps{c['epsilon']}")
def test_sampled_log_probs_equal_scored(case):
    model = make_tiny_lm(seed=1)
    c = Constraints(**case["constraints"])
    idx = torch.tensor([0, 1, 2, 3] * 12)
    g = torch.Generator().manual_seed(0)
    s = sample(model, PROMPTS, idx, c, temperature=case["temperature"], epsilon=case["epsilon"], generator=g)
    assert len(set(map(tuple, s.completion_ids()))) > 5  # a non-trivial batch
    sc = _score(model, PROMPTS, s, c)
    _assert_same_logp(s.log_pf, sc.log_pf)
    _assert_same_logp(s.log_pterm, sc.log_pterm)
    # the whole-episode probability is that of the policy at T=1, eps=0: check it by hand
    for b in range(idx.numel()):
        n = int(s.lengths[b])
        lp = sum(float(s.log_pf[b, t]) for t in range(n)) + float(s.log_pterm[b, n])
        assert math.isclose(lp, float(s.log_prob[b]), abs_tol=1e-5)


def test_per_sample_temperature_tensor():
    """A [B] temperature tensor is accepted; log-probabilities stay the policy's."""
    model = make_tiny_lm(seed=2)
    c = Constraints(stop_token_ids=[2], max_new_tokens=4)
    idx = torch.tensor([0, 1] * 8)
    temps = torch.linspace(0.5, 3.0, idx.numel())
    s = sample(model, PROMPTS[:2], idx, c, temperature=temps, generator=torch.Generator().manual_seed(1))
    sc = _score(model, PROMPTS[:2], s, c)
    _assert_same_logp(s.log_pf, sc.log_pf)
    _assert_same_logp(s.log_pterm, sc.log_pterm)


# ----------------------------------------------------------------------------------------------
# (b) constraints hold in samples
# ----------------------------------------------------------------------------------------------


def test_samples_respect_constraints():
    model = make_tiny_lm(seed=3)
    allowed, forbidden, stops = [3, 4, 5, 6, 7], [5], [2, 9]
    c = Constraints(stop_token_ids=stops, min_new_tokens=2, max_new_tokens=4, allowed_token_ids=allowed,
                    forbidden_token_ids=forbidden)
    idx = torch.arange(len(PROMPTS)).repeat(64)
    # large epsilon: many uniform actions, so forbidden tokens would show up if they were possible
    s = sample(model, PROMPTS, idx, c, temperature=3.0, epsilon=0.6, generator=torch.Generator().manual_seed(2))
    ok = set(allowed) - set(forbidden)
    for row in s.completion_ids():
        assert set(row) <= ok, row
        assert 2 <= len(row) <= 4
    assert s.tokens.shape[1] <= 4
    counts = torch.bincount(s.lengths, minlength=5)
    assert counts[2] > 0 and counts[3] > 0 and counts[4] > 0  # every legal length occurs
    at_max = s.lengths == 4
    # stopping is forced at the maximum: log q(stop | z_1:max) = 0
    assert torch.equal(s.log_pterm[at_max, 4], torch.zeros(int(at_max.sum())))
    # stopping is impossible below the minimum
    assert torch.isneginf(s.log_pterm[:, :2]).all()
    # ... and possible (finite, < 0) between min and max, up to the episode's length
    for b in range(idx.numel()):
        n = int(s.lengths[b])
        for t in range(2, n + 1):
            assert math.isfinite(float(s.log_pterm[b, t]))
            assert float(s.log_pterm[b, t]) <= 0.0
            if t < 4:
                assert float(s.log_pterm[b, t]) < 0.0
        assert torch.isneginf(s.log_pterm[b, n + 1:]).all()
        assert (s.log_pf[b, :n] < 0).all() and (s.log_pf[b, n:] == 0).all()
        assert (s.tokens[b, n:] == 0).all()
    # the stop action never appears among the tokens
    assert not torch.isin(s.tokens[s.mask], torch.tensor(stops)).any()


def test_min_equals_max_gives_fixed_length():
    model = make_tiny_lm(seed=4)
    c = Constraints(stop_token_ids=[2], min_new_tokens=3, max_new_tokens=3)
    s = sample(model, [[1]], [0] * 32, c, generator=torch.Generator().manual_seed(0))
    assert (s.lengths == 3).all()
    assert torch.isneginf(s.log_pterm[:, :3]).all() and (s.log_pterm[:, 3] == 0).all()


def test_constraint_log_probs_are_normalised():
    """At every state the allowed tokens and the stop action form a distribution."""
    c = Constraints(stop_token_ids=[2, 7], min_new_tokens=1, max_new_tokens=3, allowed_token_ids=[3, 4, 5, 9],
                    forbidden_token_ids=[9])
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3
    for t in range(4):
        logp, stop = c.log_probs(logits, torch.full((4,), t))
        tok = logp[:, [3, 4, 5]].exp().sum(-1)
        total = tok + stop.exp()
        torch.testing.assert_close(total, torch.ones(4))
        others = [i for i in range(16) if i not in (2, 3, 4, 5, 7)]
        assert torch.isneginf(logp[:, others]).all()
        if t < 1:
            assert torch.isneginf(stop).all()
        if t == 3:
            assert (stop == 0).all() and (tok == 0).all()
        # the stop probability is the sum over the stop ids, relative to the allowed actions
        if 1 <= t < 3:
            allowed = logits[:, [2, 3, 4, 5, 7]]
            expected = torch.logsumexp(logits[:, [2, 7]], -1) - torch.logsumexp(allowed, -1)
            torch.testing.assert_close(stop, expected)


def test_gradient_is_finite_where_stopping_is_impossible():
    """The -inf stop log-probability below min_new_tokens must not put NaN in gradients."""
    model = make_tiny_lm(seed=5)
    c = Constraints(stop_token_ids=[2], min_new_tokens=2, max_new_tokens=3)
    s = sample(model, [[1]], [0] * 8, c, generator=torch.Generator().manual_seed(0))
    sc = score(model, [[1]], s.prompt_index, s.tokens, s.lengths, c)
    loss = sc.log_pf.sum() + torch.where(torch.isfinite(sc.log_pterm), sc.log_pterm, 0.0).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# (c) scoring == one plain forward pass per row, restricted by hand
# ----------------------------------------------------------------------------------------------


def test_score_equals_plain_forward():
    model = make_tiny_lm(seed=6)
    stops, allowed, forbidden = [2, 5], [3, 4, 5, 6, 8, 10], [8]
    lo, hi = 1, 5
    c = Constraints(stop_token_ids=stops, min_new_tokens=lo, max_new_tokens=hi, allowed_token_ids=allowed,
                    forbidden_token_ids=forbidden)
    # hand-written completions of every length 1..5 over the legal tokens
    comps = [[3], [4, 6], [6, 6, 3], [10, 4, 3, 6], [3, 4, 6, 10, 10], [10], [6, 3, 4, 4, 4]]
    idx = torch.tensor([0, 1, 2, 3, 0, 3, 1])
    n = max(map(len, comps))
    tokens = torch.zeros(len(comps), n, dtype=torch.long)
    for i, z in enumerate(comps):
        tokens[i, : len(z)] = torch.tensor(z)
    lengths = torch.tensor([len(z) for z in comps])
    with torch.no_grad():
        sc = score(model, PROMPTS, idx, tokens, lengths, c)
    legal = torch.zeros(16, dtype=torch.bool)
    legal[[3, 4, 6, 10]] = True  # allowed minus forbidden minus stop
    for b, z in enumerate(comps):
        x = PROMPTS[int(idx[b])]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([x + z])).logits[0].double()  # no cache, no padding
        for t in range(len(z) + 1):
            row = logits[len(x) - 1 + t]
            ok = legal.clone() if t < hi else torch.zeros(16, dtype=torch.bool)
            if t >= lo:
                ok[stops] = True
            lp = row.masked_fill(~ok, -math.inf).log_softmax(-1)
            stop = torch.logsumexp(lp[stops], -1) if t >= lo else torch.tensor(-math.inf)
            if t >= lo:
                assert math.isclose(float(sc.log_pterm[b, t]), float(stop), abs_tol=2e-5)
            else:
                assert math.isinf(float(sc.log_pterm[b, t])) and float(sc.log_pterm[b, t]) < 0
            if t < len(z):
                assert math.isclose(float(sc.log_pf[b, t]), float(lp[z[t]]), abs_tol=2e-5)
        assert (sc.log_pf[b, len(z):] == 0).all()
        assert torch.isneginf(sc.log_pterm[b, len(z) + 1:]).all()


def test_empty_completions_score():
    model = make_tiny_lm(seed=7)
    c = Constraints(stop_token_ids=[2], max_new_tokens=3)
    with torch.no_grad():
        sc = score(model, PROMPTS[:2], torch.tensor([0, 1]), torch.zeros(2, 0, dtype=torch.long),
                   torch.tensor([0, 0]), c)
        assert sc.log_pf.shape == (2, 0) and sc.log_pterm.shape == (2, 1)
        for i, x in enumerate(PROMPTS[:2]):
            lp = model(input_ids=torch.tensor([x])).logits[0, -1].double().log_softmax(-1)
            assert math.isclose(float(sc.log_pterm[i, 0]), float(lp[2]), abs_tol=2e-5)


# ----------------------------------------------------------------------------------------------
# (d) the sampler draws from the distribution it reports (enumerable space)
# ----------------------------------------------------------------------------------------------


def _enumerate(model, prompt, c, letters, max_len):
    strings = [s for n in range(max_len + 1) for s in itertools.product(letters, repeat=n)]
    tokens = torch.zeros(len(strings), max_len, dtype=torch.long)
    for i, s in enumerate(strings):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in strings])
    with torch.no_grad():
        sc = score(model, [prompt], torch.zeros(len(strings), dtype=torch.long), tokens, lengths, c)
    return strings, sc


def _behaviour_probs(strings, sc, letters, max_len, temperature, epsilon):
    """Exact probability of each string under the tempered, ε-uniform behaviour policy, built
    from the policy's per-state action probabilities (read off the scores of all strings)."""
    index = {s: i for i, s in enumerate(strings)}
    probs = []
    for s in strings:
        p = 1.0
        for t in range(len(s) + 1):
            prefix = s[:t]
            i = index[prefix]
            if t == max_len:  # only stop is possible: probability 1 under any behaviour
                break
            # actions at this state: each letter, then stop
            logq = [float(sc.log_pf[index[prefix + (a,)], t]) for a in letters] + [float(sc.log_pterm[i, t])]
            w = torch.tensor(logq, dtype=torch.float64)
            beh = (w / temperature).softmax(0) * (1 - epsilon) + epsilon / len(logq)
            action = len(letters) if t == len(s) else letters.index(s[t])
            p *= float(beh[action])
        probs.append(p)
    return torch.tensor(probs, dtype=torch.float64)


@pytest.mark.parametrize("temperature,epsilon", [(1.0, 0.0), (1.8, 0.25)])
def test_sample_frequencies_match_probabilities(temperature, epsilon):
    model = make_tiny_lm(seed=8)
    with torch.no_grad():  # sharpen the random policy so that tempering changes it a lot
        model.lm_head.weight.mul_(6.0)
    letters, max_len = (3, 4), 3
    c = Constraints(stop_token_ids=[2], max_new_tokens=max_len, allowed_token_ids=list(letters))
    strings, sc = _enumerate(model, [1], c, letters, max_len)
    policy = (sc.log_pf.double().sum(1) + sc.log_pterm.double().gather(1, torch.tensor(
        [len(s) for s in strings])[:, None]).squeeze(1)).exp()
    assert math.isclose(float(policy.sum()), 1.0, abs_tol=1e-5)
    expected = _behaviour_probs(strings, sc, letters, max_len, temperature, epsilon)
    assert math.isclose(float(expected.sum()), 1.0, abs_tol=1e-9)
    if temperature == 1.0 and epsilon == 0.0:
        torch.testing.assert_close(expected, policy, atol=1e-6, rtol=1e-5)
    else:
        assert (expected - policy).abs().sum() > 0.05  # the behaviour really differs from the policy

    K = 4000
    s = sample(model, [[1]], [0] * K, c, temperature=temperature, epsilon=epsilon,
               generator=torch.Generator().manual_seed(123))
    index = {z: i for i, z in enumerate(strings)}
    counts = torch.zeros(len(strings), dtype=torch.float64)
    for z in s.completion_ids():
        counts[index[tuple(z)]] += 1
    # the reported log-prob of each sample is the policy's
    torch.testing.assert_close(s.log_prob.double(), policy.log()[[index[tuple(z)] for z in s.completion_ids()]],
                               atol=2e-5, rtol=1e-5)
    # Pearson chi-square over the 15 strings (14 degrees of freedom): 40 is far in the tail
    # (p ≈ 2e-4) for a correct sampler, while a wrong distribution gives hundreds
    exp_counts = expected * K
    chi2 = float(((counts - exp_counts) ** 2 / exp_counts).sum())
    assert chi2 < 40.0, (chi2, counts.tolist(), exp_counts.tolist())
    # and the test has power: the frequencies reject clearly different distributions
    wrongs = [torch.full_like(expected, 1.0 / len(strings))] + ([policy] if epsilon > 0 else [])
    for wrong in wrongs:
        assert float(((counts - wrong * K) ** 2 / (wrong * K)).sum()) > 100.0


# ----------------------------------------------------------------------------------------------
# (e) a LoRA-wrapped model
# ----------------------------------------------------------------------------------------------


def test_peft_model_sample_and_score():
    from peft import LoraConfig, get_peft_model

    base = make_tiny_lm(seed=9)
    c = Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=4, allowed_token_ids=[3, 4, 5, 6])
    idx = torch.tensor([0, 1, 2, 3] * 6)
    with torch.no_grad():
        s_base = sample(base, PROMPTS, idx, c, generator=torch.Generator().manual_seed(0))
        base_scores = score(base, PROMPTS, s_base.prompt_index, s_base.tokens, s_base.lengths, c)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False))
    model.eval()
    s = sample(model, PROMPTS, idx, c, temperature=1.3, epsilon=0.1, generator=torch.Generator().manual_seed(0))
    sc = _score(model, PROMPTS, s, c)
    _assert_same_logp(s.log_pf, sc.log_pf)
    _assert_same_logp(s.log_pterm, sc.log_pterm)
    # the adapters matter, and switching them off gives back the base model's scores
    with torch.no_grad():
        adapted = score(model, PROMPTS, s_base.prompt_index, s_base.tokens, s_base.lengths, c)
        with model.disable_adapter():
            off = score(model, PROMPTS, s_base.prompt_index, s_base.tokens, s_base.lengths, c)
    assert (adapted.log_pf - base_scores.log_pf).abs().max() > 1e-3
    _assert_same_logp(off.log_pf, base_scores.log_pf)
    _assert_same_logp(off.log_pterm, base_scores.log_pterm)
    # gradients reach the adapters only, through the KV-cached scoring pass
    model.train(False)
    sc = score(model, PROMPTS, s.prompt_index, s.tokens, s.lengths, c)
    (sc.log_pf.sum() + sc.log_pterm[torch.isfinite(sc.log_pterm)].sum()).backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("allowed", [None, [3, 4, 5, 7]])
def test_selected_log_probs_equal_the_full_distribution(allowed):
    """The scoring path (normaliser only) gives the same numbers as the sampler's full distribution,
    and its gradient is finite where stopping is impossible."""
    torch.manual_seed(0)
    c = Constraints(stop_token_ids=[2, 6], min_new_tokens=2, max_new_tokens=4, allowed_token_ids=allowed,
                    forbidden_token_ids=[4])
    logits = torch.randn(3, 6, 16, requires_grad=True)
    steps = torch.arange(6).expand(3, 6)
    nxt = torch.randint(0, 16, (3, 6))
    logp, stop = c.log_probs(logits, steps)
    tok_sel, stop_sel = c.selected_log_probs(logits, steps, nxt)
    full = logp.gather(2, nxt[:, :, None]).squeeze(2)
    # a stop id is not a token action: the scoring path gives it -inf (its mass is in stop_logp)
    full = torch.where((nxt == 2) | (nxt == 6), torch.full_like(full, float("-inf")), full)
    assert torch.equal(torch.isinf(full), torch.isinf(tok_sel)) and torch.equal(torch.isinf(stop), torch.isinf(stop_sel))
    fin = torch.isfinite(full)
    assert fin.any() and torch.allclose(full[fin], tok_sel[fin], atol=1e-5)
    assert torch.allclose(stop[torch.isfinite(stop)], stop_sel[torch.isfinite(stop_sel)], atol=1e-5)
    (torch.where(fin, tok_sel, 0).sum() + torch.where(torch.isfinite(stop_sel), stop_sel, 0).sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_prefix_cache_equals_reading_the_prefix_each_time():
    """A constant prefix encoded once and reused gives the logits of prefix + prompt + completion."""
    from gfnlm.scoring import PrefixCache, completion_logits

    model = make_tiny_lm(seed=3)
    prefix = [1, 7, 8, 9, 10]
    prompts = [[5, 6], [4, 11, 12, 13]]  # different lengths: left padding sits between prefix and prompt
    tokens = torch.tensor([[3, 4, 5], [6, 0, 0], [7, 8, 0]])
    lengths = torch.tensor([3, 1, 2])
    index = torch.tensor([0, 1, 1])
    cache = PrefixCache(model, prefix)
    with torch.no_grad():
        got, _ = completion_logits(model, prompts, index, tokens, lengths, prefix=cache)
        again, _ = completion_logits(model, prompts, index, tokens, lengths, prefix=cache)  # reusable
        for b in range(3):
            n = int(lengths[b])
            seq = prefix + prompts[int(index[b])] + tokens[b, :n].tolist()
            ref = model(input_ids=torch.tensor([seq])).logits[0, -(n + 1):]
            assert torch.allclose(got[b, : n + 1], ref, atol=1e-4)
    assert torch.equal(got, again)


def test_sampling_after_a_prefix_cache_equals_sampling_the_concatenated_prompt():
    """sample(prefix=...) draws the same episodes, with the same log q, as prefix + prompt."""
    from gfnlm.sampling import PrefixCache

    model = make_tiny_lm(seed=4)
    prefix = [1, 7, 8, 9, 10]
    prompts = [[5, 6], [4, 11, 12, 13]]
    cons = Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=6)
    index = [0, 0, 1, 1, 1]
    a = sample(model, prompts, index, cons, generator=torch.Generator().manual_seed(0), prefix=PrefixCache(model, prefix))
    b = sample(model, [prefix + p for p in prompts], index, cons, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert torch.allclose(a.log_pf, b.log_pf, atol=1e-5)
    fin = torch.isfinite(b.log_pterm)
    assert torch.equal(fin, torch.isfinite(a.log_pterm)) and torch.allclose(a.log_pterm[fin], b.log_pterm[fin], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# (f) the stop action is tempered as one action, however many ids stand for it
# ----------------------------------------------------------------------------------------------


def _fixed_policy_lm(probs: dict[int, float], vocab_size=16):
    """A tiny Llama whose next-token distribution is ``probs`` (id -> probability) in every state:
    its output layer has zero weights and the log-probabilities as bias (-inf for the other ids)."""
    model = make_tiny_lm(vocab_size=vocab_size)
    bias = torch.full((vocab_size,), -math.inf)
    bias[list(probs)] = torch.tensor(list(probs.values())).log()
    model.lm_head = torch.nn.Linear(model.config.hidden_size, vocab_size, bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.copy_(bias)
    return model


@pytest.mark.parametrize("restricted", [True, False], ids=["allowed-ids", "full-vocab"])
@pytest.mark.parametrize("temperature,epsilon", [(1.0, 0.0), (0.5, 0.0), (2.0, 0.0), (2.0, 0.5)])
def test_stop_ids_are_tempered_as_one_action(restricted, temperature, epsilon):
    """Stop ids 2 and 5 (0.3 each) against tokens 3 (0.25) and 4 (0.15): the behaviour stops with
    probability (1-ε) 0.6^(1/T) / (0.6^(1/T) + 0.25^(1/T) + 0.15^(1/T)) + ε/3 (three actions), not with
    the per-id tempering (0.3^(1/T) + 0.3^(1/T)) / (...) of four separate entries."""
    model = _fixed_policy_lm({2: 0.3, 5: 0.3, 3: 0.25, 4: 0.15})
    c = Constraints(stop_token_ids=[2, 5], max_new_tokens=1, allowed_token_ids=[3, 4] if restricted else None)
    stop, toks = 0.6 ** (1 / temperature), 0.25 ** (1 / temperature) + 0.15 ** (1 / temperature)
    expected = (1 - epsilon) * stop / (stop + toks) + epsilon / 3
    K = 4000
    s = sample(model, [[1]], [0] * K, c, temperature=temperature, epsilon=epsilon,
               generator=torch.Generator().manual_seed(0))
    freq = float((s.lengths == 0).double().mean())
    # binomial tolerance: 4.5 standard deviations (the per-id rule is off by 10 or more)
    assert abs(freq - expected) < 4.5 * math.sqrt(expected * (1 - expected) / K), (freq, expected)
    # the reported log-probabilities are the policy's at temperature 1
    torch.testing.assert_close(s.log_pterm[:, 0], torch.full((K,), math.log(0.6)))


@pytest.mark.parametrize("restricted", [True, False], ids=["allowed-ids", "full-vocab"])
def test_greedy_stops_when_the_stop_ids_together_are_most_likely(restricted):
    """Stop ids 0.3 + 0.3 against a token of 0.4: ⊤ (0.6) is the most likely action."""
    model = _fixed_policy_lm({2: 0.3, 5: 0.3, 3: 0.4})
    c = Constraints(stop_token_ids=[2, 5], max_new_tokens=3, allowed_token_ids=[3] if restricted else None)
    s = sample(model, [[1]], [0] * 64, c, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert (s.lengths == 0).all(), s.lengths.tolist()
