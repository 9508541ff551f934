"""Tool use inside an episode: the calculator writes its answer into the state, and sampling,
scoring, replay and the reward all see the same state; tool tokens are not actions."""

from __future__ import annotations

import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.config import GFNConfig
from gfnlm.replay import ReplayBuffer, pad_action_masks
from gfnlm.rewards import PrefixRuleReward
from gfnlm.sampling import Constraints, sample
from gfnlm.scoring import score
from gfnlm.tools import Calculator
from gfnlm.trainer import GFNTrainer

WORDS = [str(d) for d in range(10)] + ["+", "-", "=", ",", "<q>", "<r>"]


def tokenizer():
    """Digits and operators are single tokens, split as SmolLM2 splits them; decoding fuses them."""
    from tokenizers import decoders, pre_tokenizers

    tok = make_tiny_tokenizer(words=WORDS)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    tok.backend_tokenizer.decoder = decoders.Fuse()  # "1", "+", "2" -> "1+2"
    return tok


def model_and_constraints(tok, max_new=6):
    model = make_tiny_lm(vocab_size=len(tok), seed=5)
    allowed = tok.convert_tokens_to_ids([str(d) for d in range(10)] + ["+", "-", "=", ","])
    return model, Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=max_new, allowed_token_ids=allowed)


def sample_with_tool(seed=0, n=64, max_tool_tokens=8):
    tok = tokenizer()
    model, cons = model_and_constraints(tok)
    prompts = [tok.convert_tokens_to_ids(["<s>", "<q>", "3", "+", "4"]), tok.convert_tokens_to_ids(["<s>", "<r>"])]
    s = sample(model, prompts, [0] * (n // 2) + [1] * (n // 2), cons, generator=torch.Generator().manual_seed(seed),
               temperature=1.5, tool=Calculator(max_operands=None), tokenizer=tok, max_tool_tokens=max_tool_tokens)
    return tok, model, cons, prompts, s


def test_tool_output_is_inserted_and_not_an_action():
    tok, model, cons, prompts, s = sample_with_tool()
    eq = tok.convert_tokens_to_ids("=")
    calc = Calculator(max_operands=None)
    assert s.action_mask is not None
    fired = 0
    for b in range(s.tokens.shape[0]):
        n = int(s.lengths[b])
        ids, mask = s.tokens[b, :n].tolist(), s.action_mask[b, :n].tolist()
        assert sum(mask) <= cons.max_new_tokens  # only actions count towards the length
        assert n - sum(mask) <= 8  # tool budget
        for t in range(n):
            if not mask[t]:
                continue
            # after an action, the tool's answer (if any) follows as non-action tokens
            out = calc(tok.decode(ids[: t + 1]))
            following = []
            k = t + 1
            while k < n and not mask[k]:
                following.append(ids[k])
                k += 1
            if out is not None and ids[t] == eq and following:
                fired += 1
                assert tok.decode(following) == out.strip()
            if out is None:
                assert following == []
    assert fired > 0, "the test should exercise the tool"


def test_sampling_and_scoring_agree_with_tool_tokens():
    tok, model, cons, prompts, s = sample_with_tool(seed=1, n=256)  # the calculator fires in a few % of episodes
    with torch.no_grad():
        sc = score(model, prompts, s.prompt_index, s.tokens, s.lengths, cons, action_mask=s.action_mask)
    assert torch.allclose(sc.log_pf, s.log_pf, atol=1e-5)
    both_inf = torch.isinf(sc.log_pterm) & torch.isinf(s.log_pterm)
    assert torch.equal(torch.isinf(sc.log_pterm), torch.isinf(s.log_pterm))
    assert torch.allclose(sc.log_pterm[~both_inf], s.log_pterm[~both_inf], atol=1e-5)
    # tool tokens have log_pf 0 and the policy cannot stop in the middle of (or right before) tool output
    tool_pos = ~s.action_mask & s.mask
    assert tool_pos.any()
    assert (sc.log_pf[tool_pos] == 0).all()
    assert torch.isinf(sc.log_pterm[:, :-1][tool_pos]).all()
    # scoring without the mask treats the tool tokens as actions: a different (wrong) answer
    with torch.no_grad():
        wrong = score(model, prompts, s.prompt_index, s.tokens, s.lengths, cons)
    assert not torch.allclose(wrong.log_pf, s.log_pf, atol=1e-3)


def test_replay_keeps_the_action_mask():
    tok, model, cons, prompts, s = sample_with_tool(seed=2, n=8)
    buf = ReplayBuffer(capacity=50)
    log_r = torch.zeros(8, s.tokens.shape[1] + 1)
    buf.add_batch(["p"] * 8, s.tokens, s.lengths, log_r, s.action_mask)
    entries = buf.entries("p")
    masks = pad_action_masks(entries, s.tokens.shape[1])
    for e, m in zip(entries, masks):
        row = [i for i in range(8) if s.tokens[i, : s.lengths[i]].tolist() == list(e.tokens)][0]
        assert m[: len(e.tokens)].tolist() == s.action_mask[row, : s.lengths[row]].tolist()
    state = buf.state_dict()
    other = ReplayBuffer()
    other.load_state_dict(state)
    assert [e.action_mask for e in other.entries("p")] == [e.action_mask for e in entries]


def test_trainer_with_calculator_trains_and_seeds_tool_states(tmp_path):
    tok = tokenizer()
    model, _ = model_and_constraints(tok, max_new=6)
    seen = []

    def rule(prompt, text):  # the reward sees the full state, calculator answers included
        seen.append(text)
        return 0.0 if text.endswith("=7") else -5.0

    cfg = GFNConfig(use_peft=False, max_new_tokens=6, min_new_tokens=1,
                    allowed_tokens=[str(d) for d in range(10)] + ["+", "-", "=", ","], chat_template="never",
                    report_to=[], disable_tqdm=True, learning_rate=1e-3, samples_per_prompt=8, max_steps=3,
                    output_dir=str(tmp_path), replay_fraction=0.5, max_tool_tokens=6)
    trainer = GFNTrainer(model, PrefixRuleReward(rule), cfg, train_dataset=["<s> 3 + 4"], processing_class=tok,
                         tool=Calculator(max_operands=None))
    added = trainer.seed_buffer({"<s> 3 + 4": ["3+4="]})
    assert added == 1
    (entry,) = trainer.buffer.entries(0)
    assert tok.decode(list(entry.tokens)) == "3+4=7"
    assert entry.action_mask == (True, True, True, True, False)
    assert entry.log_r_terminal == 0.0
    hist = trainer.train()
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert any("=" in t and t.split("=")[-1] for t in seen)  # states with calculator answers were rewarded


def test_stop_after_tool_only_stops_after_a_result_and_scoring_agrees():
    tok = tokenizer()
    model, cons = model_and_constraints(tok, max_new=8)
    cons.stop_after_tool = True
    prompts = [tok.convert_tokens_to_ids(["<s>", "<q>", "3", "+", "4"]), tok.convert_tokens_to_ids(["<s>", "<r>"])]
    # a random policy seldom stops right after a result (a few in 1000 episodes): sample many
    s = sample(model, prompts, [0] * 512 + [1] * 512, cons, generator=torch.Generator().manual_seed(3), temperature=2.0,
               tool=Calculator(max_operands=None), tokenizer=tok, max_tool_tokens=8)
    after_result = 0
    for b in range(s.tokens.shape[0]):
        n = int(s.lengths[b])
        mask = s.action_mask[b, :n].tolist()
        finite = torch.isfinite(s.log_pterm[b, : n + 1]).nonzero().squeeze(1).tolist()
        for t in finite:  # stopping possible only right after tool output, or when forced at the length limit
            ends_with_tool = t > 0 and not mask[t - 1] and (t == n or mask[t])
            assert ends_with_tool or sum(mask[:t]) >= cons.max_new_tokens, (t, mask)
        if sum(mask) < cons.max_new_tokens:  # the episode stopped by choice: right after a result
            assert n > 0 and not mask[-1]
            after_result += 1
    assert after_result > 0, "the test should see episodes that stop after a result"
    with torch.no_grad():
        sc = score(model, prompts, s.prompt_index, s.tokens, s.lengths, cons, action_mask=s.action_mask)
    assert torch.allclose(sc.log_pf, s.log_pf, atol=1e-5)
    assert torch.equal(torch.isinf(sc.log_pterm), torch.isinf(s.log_pterm))
    ok = torch.isfinite(s.log_pterm)
    assert torch.allclose(sc.log_pterm[ok], s.log_pterm[ok], atol=1e-5)
    # the rule changes the policy: token probabilities are renormalised where stopping is impossible
    free = Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=8, allowed_token_ids=cons.allowed_token_ids)
    with torch.no_grad():
        other = score(model, prompts, s.prompt_index, s.tokens, s.lengths, free, action_mask=s.action_mask)
    assert not torch.allclose(other.log_pf, sc.log_pf, atol=1e-4)


def test_stop_after_tool_needs_a_tool(tmp_path):
    import pytest

    from gfnlm.errors import ConfigError, DataError

    tok = tokenizer()
    model, cons = model_and_constraints(tok)
    cons.stop_after_tool = True
    with pytest.raises(DataError, match="no tool"):
        sample(model, [[1, 5]], [0], cons)
    cfg = GFNConfig(use_peft=False, chat_template="never", report_to=[], output_dir=str(tmp_path), stop_after_tool=True,
                    loss_type="vargrad")
    with pytest.raises(ConfigError, match="stop_after_tool"):
        GFNTrainer(model, lambda prompts, completions, **kw: [0.0] * len(prompts), cfg, train_dataset=["<s> 3"],
                   processing_class=tok)
