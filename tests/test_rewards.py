"""Rewards: TRL-style callables, the LM-likelihood prefix reward, weighting and checks."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.errors import RewardError
from gfnlm.rewards import (
    CallableReward,
    LMLikelihoodReward,
    PrefixRuleReward,
    Reward,
    RewardBatch,
    as_reward,
    compute_log_rewards,
)
from gfnlm.sampling import Constraints

PROMPT_IDS = [[1], [1, 3, 5]]
COMPS = [[3, 4], [], [5, 5, 3], [4], [3, 3, 3, 4]]
INDEX = [0, 1, 1, 0, 1]


def make_batch(comps=COMPS, index=INDEX, columns=None, tok=None) -> RewardBatch:
    tok = tok or make_tiny_tokenizer()
    n = max(len(c) for c in comps)
    tokens = torch.zeros(len(comps), n, dtype=torch.long)
    for i, c in enumerate(comps):
        tokens[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    texts = ["<s>", "<s> a c"]
    return RewardBatch(
        prompts=[texts[i] for i in index],
        prompt_ids=PROMPT_IDS,
        prompt_index=torch.tensor(index),
        tokens=tokens,
        lengths=torch.tensor([len(c) for c in comps]),
        completions=[tok.decode(c) for c in comps],
        columns=columns or {},
        tokenizer=tok,
    )


# ----------------------------------------------------------------------------------------------
# TRL-style callables
# ----------------------------------------------------------------------------------------------


def test_trl_callable_gets_columns_as_kwargs():
    seen = {}

    def count_target(prompts, completions, target, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, target=target, ids=completion_ids, kw=kwargs)
        return [float(c.split().count(t)) - 0.5 * len(p) for p, c, t in zip(prompts, completions, target)]

    targets = ["a", "b", "c", "b", "a"]
    batch = make_batch(columns={"target": targets, "weight": [1, 2, 3, 4, 5]})
    r = as_reward(count_target)
    assert isinstance(r, CallableReward) and r.prefix is False and r.name == "count_target"
    out = r(batch)
    assert out.shape == (5,) and out.dtype == torch.float32
    expected = [float(c.split().count(t)) - 0.5 * len(p) for p, c, t in zip(batch.prompts, batch.completions, targets)]
    torch.testing.assert_close(out, torch.tensor(expected))
    assert seen["target"] == targets
    assert seen["kw"] == {"weight": [1, 2, 3, 4, 5]}  # other columns arrive through **kwargs
    assert seen["ids"] == COMPS
    assert seen["completions"] == ["a b", "", "c c a", "b", "a a a b"]


def test_trl_callable_without_kwargs_gets_only_what_it_accepts():
    def by_length(completions):  # accepts neither prompts' columns nor **kwargs
        return [-float(len(c)) for c in completions]

    def with_prompts(prompts, completions, weight):
        return [float(w) for w in weight]

    batch = make_batch(columns={"target": list("abcba"), "weight": [1, 2, 3, 4, 5]})
    torch.testing.assert_close(compute_log_rewards([as_reward(by_length)], None, batch),
                               torch.tensor([-3.0, 0.0, -5.0, -1.0, -7.0]))
    torch.testing.assert_close(as_reward(with_prompts)(batch), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))


def test_trl_callable_wrong_count_or_none():
    batch = make_batch()
    with pytest.raises(RewardError, match=r"reward 'short'.*returned 2 values for 5"):
        CallableReward(lambda prompts, completions: [0.0, 1.0], name="short")(batch)
    with pytest.raises(RewardError, match="returned None"):
        CallableReward(lambda prompts, completions: [0.0, None, 1.0, 2.0, 3.0], name="nones")(batch)
    with pytest.raises(RewardError, match="not callable"):
        CallableReward(3.0)


def test_trl_callable_through_trainer_reward_batch(tmp_path):
    """Extra dataset columns reach the callable when the trainer builds the batch."""
    from gfnlm.config import GFNConfig
    from gfnlm.trainer import GFNTrainer

    def match(prompts, completions, answer):
        return [0.0 if c == a else -3.0 for c, a in zip(completions, answer)]

    rows = [{"prompt": "<s>", "answer": "a b"}, {"prompt": "<s> c", "answer": "c"}]
    args = GFNConfig(use_peft=False, max_new_tokens=3, loss_type="tb", chat_template="never", report_to=[],
                     disable_tqdm=True, output_dir=str(tmp_path), allowed_tokens=["a", "b", "c"])
    tr = GFNTrainer(make_tiny_lm(), match, args=args, train_dataset=rows, processing_class=make_tiny_tokenizer())
    tokens = torch.tensor([[3, 4], [5, 0], [3, 4]])
    lengths = torch.tensor([2, 1, 2])
    batch = tr.reward_batch([0, 1], torch.tensor([0, 1, 1]), tokens, lengths)
    assert batch.columns == {"answer": ["a b", "c", "c"]}
    torch.testing.assert_close(tr.log_rewards(batch), torch.tensor([0.0, 0.0, -3.0]))


# ----------------------------------------------------------------------------------------------
# LMLikelihoodReward == brute force, one forward pass per prefix
# ----------------------------------------------------------------------------------------------


def brute_force_lm_reward(model, prompt, comp, stop_ids, legal=None):
    """log p(z_1:t, stop | X) for t = 0..n, each from its own plain forward pass."""
    out = []
    for t in range(len(comp) + 1):
        ids = torch.tensor([prompt + comp[:t]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        total = 0.0
        for k in range(t + 1):
            row = logits[len(prompt) - 1 + k]
            if legal is not None:
                mask = torch.zeros_like(row, dtype=torch.bool)
                mask[legal + stop_ids] = True
                row = row.masked_fill(~mask, -math.inf)
            lp = row.log_softmax(-1)
            total += float(lp[comp[k]]) if k < t else float(torch.logsumexp(lp[stop_ids], -1))
        out.append(total)
    return out


@pytest.mark.parametrize("restricted", [False, True])
def test_lm_likelihood_every_prefix_equals_brute_force(restricted):
    model = make_tiny_lm(seed=11)
    stop_ids = [2, 6]
    if restricted:
        c = Constraints(stop_token_ids=stop_ids, min_new_tokens=2, max_new_tokens=2, allowed_token_ids=[3, 4, 5, 7])
        r = LMLikelihoodReward(model, constraints=c)  # length limits are ignored by the reward
    else:
        r = LMLikelihoodReward(model, stop_token_ids=stop_ids)
    batch = make_batch()
    out = r(batch)
    assert out.shape == (len(COMPS), max(map(len, COMPS)) + 1)
    for b, comp in enumerate(COMPS):
        expected = brute_force_lm_reward(model, PROMPT_IDS[INDEX[b]], comp, stop_ids,
                                         legal=[3, 4, 5, 7] if restricted else None)
        torch.testing.assert_close(out[b, : len(comp) + 1].double(), torch.tensor(expected, dtype=torch.float64),
                                   atol=3e-5, rtol=1e-5)


def _lora(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout,
                                            init_lora_weights=False))


def test_lm_likelihood_with_lora_uses_the_base_model():
    stop_ids = [2]
    reference = make_tiny_lm(seed=12)  # an identical copy of the base weights
    peft_model = _lora(make_tiny_lm(seed=12))
    r = LMLikelihoodReward(peft_model, stop_token_ids=stop_ids)
    batch = make_batch()
    out = r(batch)
    max_diff = 0.0
    for b, comp in enumerate(COMPS):
        n = len(comp)
        base_val = brute_force_lm_reward(reference, PROMPT_IDS[INDEX[b]], comp, stop_ids)
        torch.testing.assert_close(out[b, : n + 1].double(), torch.tensor(base_val, dtype=torch.float64),
                                   atol=3e-5, rtol=1e-5)
        # the adapted model (adapters back on after the reward ran) gives other values
        adapted_val = torch.tensor(brute_force_lm_reward(peft_model, PROMPT_IDS[INDEX[b]], comp, stop_ids))
        max_diff = max(max_diff, float((adapted_val - out[b, : n + 1].double()).abs().max()))
    assert max_diff > 1e-2
    # a model factory (callable returning the model) works too
    torch.testing.assert_close(LMLikelihoodReward(lambda: peft_model, stop_token_ids=stop_ids)(batch), out)


def test_lm_likelihood_runs_in_eval_mode_and_restores_mode():
    model = make_tiny_lm(seed=13)
    for m in model.modules():  # strong attention dropout, active in train mode
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    peft_model = _lora(model, dropout=0.3)
    batch = make_batch()
    r = LMLikelihoodReward(peft_model, stop_token_ids=[2])
    peft_model.eval()
    ref = r(batch)
    peft_model.train()
    # dropout really is active in train mode (so the test below can fail)
    with torch.no_grad():
        x = torch.tensor([[1, 3, 4, 5]])
        assert not torch.equal(peft_model(input_ids=x).logits, peft_model(input_ids=x).logits)
    a, b = r(batch), r(batch)
    assert peft_model.training and model.training  # mode restored
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref)


# ----------------------------------------------------------------------------------------------
# combination and checks
# ----------------------------------------------------------------------------------------------


class _Fixed(Reward):
    def __init__(self, values, prefix=True, name="fixed"):
        self.values, self.prefix, self.name = values, prefix, name

    def __call__(self, batch):
        return self.values


def test_weighted_sum_in_log_space():
    batch = make_batch()
    B, N1 = len(COMPS), max(map(len, COMPS)) + 1
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(B, N1, generator=g), torch.randn(B, N1, generator=g)
    term = torch.randn(B, generator=g)
    out = compute_log_rewards([_Fixed(v1), _Fixed(v2)], [0.5, 2.0], batch)
    torch.testing.assert_close(out, 0.5 * v1 + 2.0 * v2)
    torch.testing.assert_close(compute_log_rewards([_Fixed(v1), _Fixed(v2)], None, batch), v1 + v2)
    # a terminal reward in the mix: prefix rewards are read at the episode's end, result is [B]
    mixed = compute_log_rewards([_Fixed(v1), _Fixed(term, prefix=False)], [3.0, -1.0], batch)
    lengths = batch.lengths
    torch.testing.assert_close(mixed, 3.0 * v1.gather(1, lengths[:, None]).squeeze(1) - term)
    with pytest.raises(RewardError, match="2 reward_weights for 1 reward"):
        compute_log_rewards([_Fixed(v1)], [1.0, 2.0], batch)


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_non_finite_reward_is_an_error_naming_the_reward(bad, word):
    batch = make_batch()
    B, N1 = len(COMPS), max(map(len, COMPS)) + 1
    v = torch.zeros(B, N1)
    v[2, 1] = bad  # within row 2's length (3)
    with pytest.raises(RewardError) as e:
        compute_log_rewards([_Fixed(torch.zeros(B, N1)), _Fixed(v, name="my_prefix_reward")], None, batch)
    msg = str(e.value)
    assert "my_prefix_reward" in msg and f"returned {word} " in msg and "\n" not in msg
    assert repr(batch.completions[2]) in msg
    # terminal (TRL-style) rewards too
    vals = [0.0, 1.0, bad, 2.0, 3.0]

    def trl_reward(prompts, completions, **kw):
        return vals

    with pytest.raises(RewardError, match=rf"reward 'trl_reward' returned {word} "):
        compute_log_rewards([as_reward(trl_reward)], None, batch)


def test_non_finite_values_beyond_the_episode_are_ignored():
    batch = make_batch()
    B, N1 = len(COMPS), max(map(len, COMPS)) + 1
    v = torch.zeros(B, N1)
    v[1, 1:] = float("nan")  # row 1 is empty: only column 0 matters
    v[3, 2:] = float("-inf")  # row 3 has length 1
    out = compute_log_rewards([_Fixed(v)], [2.0], batch)
    assert torch.isfinite(out[0]).all() and out[1, 0] == 0 and out[3, :2].eq(0).all()


def test_wrong_shape_is_an_error():
    batch = make_batch()
    B, N1 = len(COMPS), max(map(len, COMPS)) + 1
    with pytest.raises(RewardError, match=r"reward 'short' returned shape \(5, 2\), expected \(5, %d\)" % N1):
        compute_log_rewards([_Fixed(torch.zeros(B, 2), name="short")], None, batch)
    with pytest.raises(RewardError, match=r"returned shape \(5, %d\), expected \(5,\)" % N1):
        compute_log_rewards([_Fixed(torch.zeros(B, N1), prefix=False, name="term")], None, batch)


def test_prefix_rule_reward_sees_every_prefix_text():
    calls = []

    def rule(prompt, text):
        calls.append((prompt, text))
        return -float(len(text.split())) + (1.5 if text.endswith("a") else 0.0)

    batch = make_batch()
    out = PrefixRuleReward(rule)(batch)
    n_calls = len(calls)
    assert out.shape == (len(COMPS), max(map(len, COMPS)) + 1)
    tok = batch.tokenizer
    for b, comp in enumerate(COMPS):
        for t in range(len(comp) + 1):
            text = tok.decode(comp[:t]) if t else ""
            assert (batch.prompts[b], text) in calls
            assert out[b, t] == rule(batch.prompts[b], text)
    assert n_calls == sum(len(c) + 1 for c in COMPS)
