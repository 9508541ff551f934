"""The per-prompt replay buffer: capacity, eviction, dedup, prioritised sampling, state."""

from __future__ import annotations


import pytest
import torch

from gfnlm.replay import ReplayBuffer, pad_entries


def test_capacity_is_per_prompt_and_evicts_the_lowest_reward():
    buf = ReplayBuffer(capacity=3)
    assert buf.add("p", [3], -1.0) and buf.add("p", [4], -5.0) and buf.add("p", [5], -2.0)
    assert buf.add("q", [3], -9.0)  # another prompt: its own capacity
    assert buf.size("p") == 3 and buf.size("q") == 1 and len(buf) == 4
    # a worse entry than the worst one is rejected
    assert not buf.add("p", [6], -7.0)
    assert sorted(e.tokens for e in buf.entries("p")) == [(3,), (4,), (5,)]
    # a better one replaces the lowest-reward entry (tokens (4,), log R -5)
    assert buf.add("p", [6, 6], -3.0)
    assert sorted(e.tokens for e in buf.entries("p")) == [(3,), (5,), (6, 6)]
    assert buf.add("p", [7], 0.5)
    assert sorted(e.log_r_terminal for e in buf.entries("p")) == [-2.0, -1.0, 0.5]
    assert buf.size("p") == 3
    # "q" untouched by "p"'s evictions
    assert [e.tokens for e in buf.entries("q")] == [(3,)]
    assert buf.size("unknown") == 0 and buf.entries("unknown") == [] and buf.sample("unknown", 4) == []


def test_duplicates_are_stored_once_with_the_latest_reward():
    buf = ReplayBuffer(capacity=4)
    assert buf.add("p", [3, 4], -1.0)
    assert not buf.add("p", (3, 4), -2.0)  # same completion (list or tuple): no new entry
    assert not buf.add("p", torch.tensor([3, 4]).tolist(), -0.5)
    assert buf.size("p") == 1
    assert buf.entries("p")[0].log_r_terminal == -0.5
    assert buf.add("p", [3, 4, 5], -1.0) and buf.add("p", [], -1.0)  # a prefix and the empty one are distinct
    assert buf.size("p") == 3
    # add_batch: rows with identical completions count once
    toks = torch.tensor([[5, 5, 0], [5, 5, 0], [6, 0, 0], [3, 4, 0]])
    added = buf.add_batch(["q", "q", "q", "p"], toks, torch.tensor([2, 2, 1, 2]), torch.tensor([1.0, 1.0, 2.0, 0.0]))
    assert added == 2 and buf.size("q") == 2 and buf.size("p") == 3


def test_prioritised_sampling_frequencies():
    torch.manual_seed(0)
    log_r = [0.0, -1.0, 1.5, -3.0, 0.7]
    for temp in (1.0, 2.5):
        buf = ReplayBuffer(capacity=10, priority_temperature=temp)
        for i, v in enumerate(log_r):
            buf.add("p", [3 + i], v)
        K = 20000
        got = buf.sample("p", K, generator=torch.Generator().manual_seed(7))
        assert len(got) == K
        counts = torch.zeros(len(log_r), dtype=torch.float64)
        for e in got:
            counts[e.tokens[0] - 3] += 1
        p = torch.softmax(torch.tensor(log_r, dtype=torch.float64) / temp, 0)
        # Pearson chi-square, 4 degrees of freedom: 25 has p ≈ 5e-5 for a correct sampler
        chi2 = float(((counts - K * p) ** 2 / (K * p)).sum())
        assert chi2 < 25.0, (temp, chi2, (counts / K).tolist(), p.tolist())
        # and it is not uniform / not at the other temperature
        other = torch.softmax(torch.tensor(log_r, dtype=torch.float64) / (3.5 - temp), 0)
        assert float(((counts - K * other) ** 2 / (K * other)).sum()) > 200.0
    assert buf.sample("p", 0) == []


def test_prefix_log_rewards_come_back_via_pad_entries():
    buf = ReplayBuffer(capacity=8)
    tokens = torch.tensor([[3, 4, 5], [6, 0, 0], [0, 0, 0], [4, 4, 0]])
    lengths = torch.tensor([3, 1, 0, 2])
    log_r = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                          [-1.0, -2.0, 99.0, 99.0],  # beyond length: not stored
                          [5.0, 99.0, 99.0, 99.0],
                          [-0.5, -0.25, -0.125, 99.0]])
    assert buf.add_batch(["p"] * 4, tokens, lengths, log_r) == 4
    entries = sorted(buf.entries("p"), key=lambda e: -len(e.tokens))
    log_r[0, 0] = 123.0  # the buffer keeps its own copy
    t, n, prefix, term = pad_entries(entries, pad_id=0)
    assert t.tolist() == [[3, 4, 5], [4, 4, 0], [6, 0, 0], [0, 0, 0]]
    assert n.tolist() == [3, 2, 1, 0]
    assert prefix.shape == (4, 4)
    torch.testing.assert_close(prefix[0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(prefix[1, :3], torch.tensor([-0.5, -0.25, -0.125]))
    torch.testing.assert_close(prefix[2, :2], torch.tensor([-1.0, -2.0]))
    torch.testing.assert_close(prefix[3, :1], torch.tensor([5.0]))
    # the terminal log-reward is the prefix reward at the episode's length
    torch.testing.assert_close(term, torch.tensor([0.4, -0.125, -2.0, 5.0]))
    # terminal-only entries: no prefix tensor
    buf.add_batch(["t"] * 2, tokens[:2], lengths[:2], torch.tensor([1.0, 2.0]))
    t2, n2, prefix2, term2 = pad_entries(buf.entries("t"))
    assert prefix2 is None and sorted(term2.tolist()) == [1.0, 2.0]
    # eviction uses the terminal value of prefix entries
    small = ReplayBuffer(capacity=1)
    small.add_batch(["p", "p"], tokens[:2], lengths[:2], log_r[:2])
    assert [e.tokens for e in small.entries("p")] == [(3, 4, 5)]


def test_state_dict_round_trip(tmp_path):
    buf = ReplayBuffer(capacity=3, priority_temperature=0.7)
    buf.add("p", [3, 4], -1.0, torch.tensor([0.0, -0.5, -1.0]))
    buf.add("p", [5], -2.0, torch.tensor([0.0, -2.0]))
    buf.add("q", [], 1.0, torch.tensor([1.0]))
    torch.save(buf.state_dict(), tmp_path / "buf.pt")
    other = ReplayBuffer(capacity=50)
    other.load_state_dict(torch.load(tmp_path / "buf.pt", weights_only=False))
    assert other.capacity == 3 and other.priority_temperature == 0.7 and len(other) == 3
    for key in ("p", "q"):
        a, b = buf.entries(key), other.entries(key)
        assert [e.tokens for e in a] == [e.tokens for e in b]
        assert [e.log_r_terminal for e in a] == [e.log_r_terminal for e in b]
        for ea, eb in zip(a, b):
            assert torch.equal(ea.log_r_prefix, eb.log_r_prefix)
    # same state, same generator: same draws
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [e.tokens for e in buf.sample("p", 50, g1)] == [e.tokens for e in other.sample("p", 50, g2)]
    # and the restored buffer keeps working (dedup, eviction)
    assert not other.add("p", [3, 4], -1.5)
    assert other.add("p", [6], -0.1) and not other.add("p", [7], -9.0) and other.size("p") == 3


def test_invalid_capacity():
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=0)
