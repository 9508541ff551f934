"""No repeated token n-gram (gfnlm.patterns.NoRepeatRule) as a constraint of the target, shared by the
sampler, the scoring pass, the LM reward, the generate baselines and checkpoints: each checked against
brute force over short strings."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from conftest import byte_tokenizer, make_tiny_lm
from gfnlm.baselines import decode
from gfnlm.config import GFNConfig
from gfnlm.errors import ConfigError
from gfnlm.patterns import NoRepeatRule
from gfnlm.rewards import LMLikelihoodReward, RewardBatch
from gfnlm.sampling import Constraints, sample
from gfnlm.scoring import score
from gfnlm.trainer import constraints_from_config

TOK = byte_tokenizer()
ALPHABET = "ab"
IDS = [TOK.convert_tokens_to_ids(ch) for ch in ALPHABET]
STOP = TOK.eos_token_id


def repeats(z, n) -> bool:
    """Brute force: some n consecutive tokens of z occur twice."""
    grams = [tuple(z[i:i + n]) for i in range(len(z) - n + 1)]
    return len(grams) != len(set(grams))


def constraints(n=2, max_new_tokens=5, min_new_tokens=0):
    return Constraints(stop_token_ids=[STOP], min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
                       allowed_token_ids=IDS, prefix_rule=NoRepeatRule(n))


def strings(max_len):
    for k in range(max_len + 1):
        yield from (list(s) for s in itertools.product(IDS, repeat=k))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_rule_agrees_with_brute_force_on_random_strings(n):
    rule, rng = NoRepeatRule(n), random.Random(n)
    for _ in range(300):
        z = [rng.randrange(6) for _ in range(rng.randint(0, 9))]
        states = rule.walk(z)
        for t in range(len(z) + 1):
            assert (states[t] is not None) == (not repeats(z[:t], n)) == rule.accepting(states[t]), (z, t)
            if states[t] is not None:
                mask = rule.allowed(states[t], 9 - t, 6, "cpu")
                assert mask.tolist() == [not repeats(z[:t] + [v], n) for v in range(6)], (z, t)
        assert rule.matches(z) == (not repeats(z, n))
    assert not rule.allowed(None, 3, 6, "cpu").any()


def test_masked_sampling_equals_scoring_and_never_repeats():
    model, c = make_tiny_lm(vocab_size=len(TOK) + 1, seed=3), constraints(n=2, max_new_tokens=5)
    prompts = [[1, IDS[0]], [1]]
    s = sample(model, prompts, [0, 1] * 16, c, temperature=1.4, epsilon=0.1, generator=torch.Generator().manual_seed(0))
    rows = s.completion_ids()
    assert all(not repeats(r, 2) for r in rows) and max(map(len, rows)) >= 4  # the rule binds: "ab" then not "ab"
    sc = score(model, prompts, s.prompt_index, s.tokens, s.lengths, c)
    torch.testing.assert_close(s.log_pf, sc.log_pf.detach(), atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(sc.log_pterm)
    assert torch.equal(fin, torch.isfinite(s.log_pterm))
    torch.testing.assert_close(s.log_pterm[fin], sc.log_pterm[fin].detach(), atol=1e-5, rtol=1e-5)


def enumerate_q(model, c, max_len):
    """log q of every string over the alphabet up to max_len, scored exactly (the policy's own pass)."""
    texts = list(strings(max_len))
    tokens = torch.zeros((len(texts), max_len), dtype=torch.long)
    for i, z in enumerate(texts):
        tokens[i, :len(z)] = torch.tensor(z, dtype=torch.long) if z else torch.zeros(0, dtype=torch.long)
    lengths = torch.tensor([len(z) for z in texts])
    with torch.no_grad():
        sc = score(model, [[1]], torch.zeros(len(texts), dtype=torch.long), tokens, lengths, c)
    return texts, sc.log_pf.sum(1) + sc.log_pterm.gather(1, lengths[:, None]).squeeze(1)


def test_the_masked_policy_is_the_renormalised_lm_on_the_strings_without_repeats():
    """Every string with a repeated bigram has q = 0; the others have exactly the LM's step-by-step
    distribution renormalised over the actions the rule allows (brute force, one forward per prefix),
    and the sampler's frequencies follow them."""
    model, c = make_tiny_lm(vocab_size=len(TOK) + 1, seed=5), constraints(n=2, max_new_tokens=5)
    texts, logq = enumerate_q(model, c, 5)
    q = logq.exp()
    ok = torch.tensor([not repeats(z, 2) for z in texts])
    assert torch.all(q[~ok] == 0) and math.isclose(float(q.sum()), 1.0, rel_tol=1e-5)
    for z, lq in zip(texts, logq.tolist()):
        if repeats(z, 2):
            continue
        want = 0.0
        for t in range(len(z) + 1):
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([[1] + z[:t]])).logits[0, -1].log_softmax(-1)
            acts = [v for v in IDS if not repeats(z[:t] + [v], 2)] if t < 5 else []
            lse = torch.logsumexp(lp[acts + [STOP]], 0)
            want += float((lp[z[t]] if t < len(z) else lp[STOP]) - lse)
        assert lq == pytest.approx(want, abs=1e-4), z
    n = 3000
    s = sample(model, [[1]], [0] * n, c, generator=torch.Generator().manual_seed(1))
    index = {tuple(z): i for i, z in enumerate(texts)}
    counts = torch.zeros(len(texts))
    for row in s.completion_ids():
        counts[index[tuple(row)]] += 1
    exp, keep = q * n, q * n > 5
    chi2 = float(((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    assert counts[~ok].sum() == 0 and chi2 < 3 * int(keep.sum()) + 20, chi2


def test_the_lm_reward_gives_the_invalid_floor_to_texts_that_repeat():
    model, c = make_tiny_lm(vocab_size=len(TOK) + 1, seed=7), constraints(n=2)
    a, b = IDS
    z = [a, b, a, b]  # "ab" twice: c = 0 from the 4th token on
    batch = RewardBatch(prompts=["p"], prompt_ids=[[1]], prompt_index=torch.tensor([0]), tokens=torch.tensor([z]),
                        lengths=torch.tensor([4]), completions=["abab"], tokenizer=TOK)
    got = LMLikelihoodReward(model, stop_token_ids=[STOP], constraints=c, prefixes="stoppable",
                             invalid_log_reward=-99.0)(batch)[0].tolist()
    assert got[4] == -99.0 and all(v > -99.0 for v in got[:4])


def test_generate_baselines_obey_the_rule_and_their_log_q_is_the_policys():
    """A sampler through transformers' generate under the rule writes no repeat, and its log q (from
    generate's processed scores) equals the exact log q of the same masked distribution (the
    policy's scoring pass on the base model at T = 1)."""
    model, c = make_tiny_lm(vocab_size=len(TOK) + 1, seed=5), constraints(n=2, max_new_tokens=5)
    texts, logq = enumerate_q(model, c, 5)
    exact = {tuple(z): v for z, v in zip(texts, logq.tolist())}
    (d,) = decode(model, TOK, [[1]], c, "sampling", 200, seed=0)
    assert d.completions and all(not repeats(z, 2) for z in d.completions)
    assert max(map(len, d.completions)) >= 3
    for z, lq in zip(d.completions, d.log_q):
        assert lq == pytest.approx(exact[tuple(z)], abs=1e-4), z
    (g,) = decode(model, TOK, [[1]], c, "beam", 4)
    assert all(not repeats(z, 2) for z in g.completions)


def test_config_builds_the_rule_and_bad_values_are_one_line_errors():
    c = constraints_from_config(GFNConfig(no_repeat_ngram_size=3, stop_tokens=[STOP]), TOK)
    assert isinstance(c.prefix_rule, NoRepeatRule) and c.prefix_rule.n == 3
    assert constraints_from_config(GFNConfig(stop_tokens=[STOP]), TOK).prefix_rule is None
    with pytest.raises(ConfigError, match="no_repeat_ngram_size=-1 must be 0"):
        GFNConfig(no_repeat_ngram_size=-1)


def test_soft_labels_under_the_rule_are_the_masked_distribution():
    """action_log_probs (soft-label distillation) under the rule: each state's distribution is the
    LM's renormalised over the tokens the rule allows (and the stop), summing to one."""
    from gfnlm.scoring import action_log_probs, completion_logits

    model, c = make_tiny_lm(vocab_size=len(TOK) + 1, seed=5), constraints(n=1, max_new_tokens=4)
    a, b = IDS
    tokens, lengths = torch.tensor([[a, b], [b, 0]]), torch.tensor([2, 1])
    with torch.no_grad():
        logits, _ = completion_logits(model, [[1]], torch.zeros(2, dtype=torch.long), tokens, lengths)
        got = action_log_probs(logits, c, tokens, lengths)  # [2, 3, V+1]
    V = logits.shape[-1]
    for r, z in enumerate([[a, b], [b]]):
        for t in range(len(z) + 1):
            lp = logits[r, t].float().log_softmax(-1)
            acts = [v for v in IDS if v not in z[:t]]
            lse = torch.logsumexp(lp[acts + [STOP]], 0)
            want = torch.full((V + 1,), float("-inf"))
            want[acts] = lp[acts] - lse
            want[V] = lp[STOP] - lse
            torch.testing.assert_close(got[r, t], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="tokens and lengths"):
        action_log_probs(logits, c)
