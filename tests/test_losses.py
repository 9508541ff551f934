"""Tests of gfnlm.losses against brute-force loops written from the definitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gfnlm import losses as L
from gfnlm.losses import (
    LOSSES,
    modified_db_loss,
    modified_subtb_loss,
    tempered,
    trajectory_balance_loss,
    vargrad_loss,
)

NEG_INF = float("-inf")
LAMDAS = [1.0, 0.9, 0.5]


# ----------------------------------------------------------------------------
# fixtures: a random batch with variable lengths and -inf stop masks
# ----------------------------------------------------------------------------


def make_batch(seed: int = 0, B: int = 9, N: int = 6, dtype=torch.float64, garbage: bool = True):
    """Random batch. Lengths include 0 and N; some rows cannot stop at t=0 / t<=1.

    Padding holds -inf / +inf / huge garbage when ``garbage`` (never NaN).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, N, 3, 1, N, 2, 5, 4, N][:B], dtype=torch.long)
    log_pf = -torch.rand(B, N, generator=g, dtype=dtype) * 3.0
    log_pterm = -torch.rand(B, N + 1, generator=g, dtype=dtype) * 3.0
    log_r = torch.randn(B, N + 1, generator=g, dtype=dtype) * 2.0
    log_z = torch.randn(B, generator=g, dtype=dtype)
    # minimum lengths: row 1, 2 cannot stop at the empty prefix; rows 4, 6 not below 2
    for b in (1, 2):
        log_pterm[b, 0] = NEG_INF
    for b in (4, 6):
        log_pterm[b, :2] = NEG_INF
    # a row whose only valid position is its end (no pair without log_z)
    log_pterm[3, 0] = NEG_INF  # row 3 has length 1 -> only t=1 valid
    if garbage:
        for b in range(B):
            n = int(lengths[b])
            log_pf[b, n:] = NEG_INF
            log_pterm[b, n + 1 :] = float("inf") if b % 2 else NEG_INF
            log_r[b, n + 1 :] = 1e30 if b % 3 else NEG_INF
            # log_r where stopping is impossible: garbage too
            log_r[b, : n + 1][torch.isinf(log_pterm[b, : n + 1])] = NEG_INF
    return log_pf, log_pterm, log_r, lengths, log_z


def leaves(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


# ----------------------------------------------------------------------------
# brute force, straight from the definitions (Python floats, double loops)
# ----------------------------------------------------------------------------


def _lists(log_pf, log_pterm, log_r, lengths):
    return log_pf.tolist(), log_pterm.tolist(), log_r.tolist(), lengths.tolist()


def _valid_positions(pterm_row, n):
    return [t for t in range(n + 1) if math.isfinite(pterm_row[t])]


def brute_subtb(log_pf, log_pterm, log_r, lengths, lamda, log_z=None):
    """Per-row list and batch mean; delta(i, j) written out term by term."""
    pf, pt, lr, ns = _lists(log_pf, log_pterm, log_r, lengths)
    lz = None if log_z is None else log_z.tolist()
    rows, contributing = [], []
    for b, n in enumerate(ns):
        pos = _valid_positions(pt[b], n)
        z_anchor = lz is not None and 0 not in pos
        if z_anchor:
            pos = [0] + pos

        def head(i):  # log R(z_1:i ⊤) - log q(⊤|z_1:i), or log F(s_0) = log Z
            if i == 0 and z_anchor:
                return lz[b]
            return lr[b][i] - pt[b][i]

        num = den = 0.0
        for a in range(len(pos)):
            for c in range(a + 1, len(pos)):
                i, j = pos[a], pos[c]
                delta = head(i)
                for k in range(i + 1, j + 1):
                    delta += pf[b][k - 1]
                delta += pt[b][j] - lr[b][j]
                w = lamda ** (j - i - 1)
                num += w * delta**2
                den += w
        if den > 0:
            rows.append(num / den)
            contributing.append(num / den)
        else:
            rows.append(0.0)
    mean = sum(contributing) / len(contributing) if contributing else 0.0
    return rows, mean


def brute_db(log_pf, log_pterm, log_r, lengths):
    pf, pt, lr, ns = _lists(log_pf, log_pterm, log_r, lengths)
    rows, contributing = [], []
    for b, n in enumerate(ns):
        res = []
        for t in range(n):
            if math.isfinite(pt[b][t]) and math.isfinite(pt[b][t + 1]):
                d = lr[b][t] + pf[b][t] + pt[b][t + 1] - lr[b][t + 1] - pt[b][t]
                res.append(d * d)
        if res:
            rows.append(sum(res) / len(res))
            contributing.append(rows[-1])
        else:
            rows.append(0.0)
    mean = sum(contributing) / len(contributing) if contributing else 0.0
    return rows, mean


def _brute_log_q_and_r(log_pf, log_pterm, log_r, lengths):
    pf, pt, lr, ns = _lists(log_pf, log_pterm, log_r, lengths)
    log_q, r = [], []
    for b, n in enumerate(ns):
        s = 0.0
        for t in range(n):
            s += pf[b][t]
        log_q.append(s + pt[b][n])
        r.append(lr[b] if isinstance(lr[b], float) else lr[b][n])
    return log_q, r


def brute_tb(log_pf, log_pterm, log_r, lengths, log_z):
    log_q, r = _brute_log_q_and_r(log_pf, log_pterm, log_r, lengths)
    lz = log_z.tolist()
    rows = [(lz[b] + log_q[b] - r[b]) ** 2 for b in range(len(r))]
    return rows, sum(rows) / len(rows)


def brute_vargrad(log_pf, log_pterm, log_r, lengths, group=None):
    log_q, r = _brute_log_q_and_r(log_pf, log_pterm, log_r, lengths)
    B = len(r)
    gid = [0] * B if group is None else group.tolist()
    rows, contributing = [], []
    for b in range(B):
        members = [c for c in range(B) if gid[c] == gid[b]]
        if len(members) < 2:
            rows.append(0.0)
            continue
        z_hat = sum(r[c] - log_q[c] for c in members) / len(members)
        rows.append((log_q[b] + z_hat - r[b]) ** 2)
        contributing.append(rows[-1])
    mean = sum(contributing) / len(contributing) if contributing else 0.0
    return rows, mean


def assert_close(actual, expected, rtol=1e-9, atol=1e-9):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64).detach(),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )


# ----------------------------------------------------------------------------
# agreement with brute force
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lamda", LAMDAS)
@pytest.mark.parametrize("use_z", [False, True])
def test_subtb_matches_brute_force(seed, lamda, use_z):
    log_pf, log_pterm, log_r, lengths, log_z = make_batch(seed)
    z = log_z if use_z else None
    rows, mean = brute_subtb(log_pf, log_pterm, log_r, lengths, lamda, z)
    got_rows = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, lamda, z, reduction="none")
    assert got_rows.shape == lengths.shape
    assert_close(got_rows, rows)
    assert_close(modified_subtb_loss(log_pf, log_pterm, log_r, lengths, lamda, z), mean)


def test_subtb_log_z_only_used_where_position_zero_invalid():
    log_pf, log_pterm, log_r, lengths, log_z = make_batch(0)
    with_z = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 0.9, log_z, reduction="none")
    without = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 0.9, None, reduction="none")
    pos0_valid = torch.isfinite(log_pterm[:, 0])
    assert torch.equal(with_z[pos0_valid], without[pos0_valid])
    # row 3 (length 1, t=0 impossible) has no pair without log_z but one with it
    assert without[3] == 0 and with_z[3] > 0
    # scalar log_z broadcasts
    s = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 1.0, log_z[2], reduction="none")
    full = modified_subtb_loss(
        log_pf, log_pterm, log_r, lengths, 1.0, log_z[2].expand(9), reduction="none"
    )
    assert_close(s, full)


def test_closed_form_matches_pair_matrix():
    log_pf, log_pterm, log_r, lengths, log_z = make_batch(3)
    for z in (None, log_z):
        F, valid = L._potentials(log_pf, log_pterm, log_r, lengths, z)
        closed, has_c = L._subtb_closed_form(F, valid)
        pairs, has_p = L._subtb_pairs(F, valid, 1.0)
        assert torch.equal(has_c, has_p)
        assert_close(closed, pairs, rtol=1e-10, atol=1e-10)
        a = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 1.0, z, reduction="none")
        b = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 1.0 - 1e-12, z, reduction="none")
        assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_closed_form_is_stable_in_float32():
    """A large common offset of the potentials must not cause cancellation."""
    log_pf, log_pterm, log_r, lengths, _ = make_batch(4, garbage=False)
    ref = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 1.0, reduction="none")
    shifted = (log_r + 3.0e4).float()
    got = modified_subtb_loss(
        log_pf.float(), log_pterm.float(), shifted, lengths, 1.0, reduction="none"
    )
    assert got.dtype == torch.float32
    # float32 spacing at 3e4 is ~2e-3, so potentials are only accurate to ~1e-3
    assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_low_precision_inputs_are_upcast():
    log_pf, log_pterm, log_r, lengths, log_z = make_batch(0)
    out = modified_subtb_loss(
        log_pf.bfloat16(), log_pterm.bfloat16(), log_r.bfloat16(), lengths, 0.9, log_z.bfloat16()
    )
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_db_matches_brute_force_and_equals_subtb_lamda_zero():
    for seed in (0, 1, 2):
        log_pf, log_pterm, log_r, lengths, _ = make_batch(seed)
        rows, mean = brute_db(log_pf, log_pterm, log_r, lengths)
        assert_close(modified_db_loss(log_pf, log_pterm, log_r, lengths, reduction="none"), rows)
        assert_close(modified_db_loss(log_pf, log_pterm, log_r, lengths), mean)
        sub0 = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 0.0, reduction="none")
        assert_close(sub0, rows)


@pytest.mark.parametrize("prefix_r", [True, False])
def test_tb_matches_brute_force(prefix_r):
    log_pf, log_pterm, log_r, lengths, log_z = make_batch(5)
    if not prefix_r:
        log_r = log_r.gather(1, lengths[:, None]).squeeze(1)
    rows, mean = brute_tb(log_pf, log_pterm, log_r, lengths, log_z)
    assert_close(trajectory_balance_loss(log_pf, log_pterm, log_r, lengths, log_z, "none"), rows)
    assert_close(trajectory_balance_loss(log_pf, log_pterm, log_r, lengths, log_z), mean)


@pytest.mark.parametrize("prefix_r", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
def test_vargrad_matches_brute_force(prefix_r, grouped):
    log_pf, log_pterm, log_r, lengths, _ = make_batch(6)
    if not prefix_r:
        log_r = log_r.gather(1, lengths[:, None]).squeeze(1)
    # arbitrary ids; id 42 is a singleton group
    group = torch.tensor([7, 3, 7, 42, 3, 3, 7, -1, -1]) if grouped else None
    rows, mean = brute_vargrad(log_pf, log_pterm, log_r, lengths, group)
    got = vargrad_loss(log_pf, log_pterm, log_r, lengths, group, reduction="none")
    assert_close(got, rows)
    assert_close(vargrad_loss(log_pf, log_pterm, log_r, lengths, group), mean)
    if grouped:
        assert got[3] == 0


def test_vargrad_is_population_variance_per_group():
    log_pf, log_pterm, log_r, lengths, _ = make_batch(7)
    log_q = L._log_q_trajectory(log_pf, log_pterm, lengths, torch.float64)
    ratio = log_r.gather(1, lengths[:, None]).squeeze(1) - log_q
    got = vargrad_loss(log_pf, log_pterm, log_r, lengths)
    assert_close(got, ratio.var(unbiased=False))


# ----------------------------------------------------------------------------
# edge cases: no contributing rows, padding garbage, gradients
# ----------------------------------------------------------------------------


def _all_losses(log_pf, log_pterm, log_r, lengths, log_z, reduction="mean"):
    out = {}
    for lam in LAMDAS + [0.0]:
        out[f"subtb{lam}"] = modified_subtb_loss(
            log_pf, log_pterm, log_r, lengths, lam, None, reduction
        )
        out[f"subtb{lam}_z"] = modified_subtb_loss(
            log_pf, log_pterm, log_r, lengths, lam, log_z, reduction
        )
    out["db"] = modified_db_loss(log_pf, log_pterm, log_r, lengths, reduction)
    out["tb"] = trajectory_balance_loss(log_pf, log_pterm, log_r, lengths, log_z, reduction)
    out["vargrad"] = vargrad_loss(log_pf, log_pterm, log_r, lengths, None, reduction)
    return out


def test_gradients_finite_with_garbage_padding_and_flow_to_inputs():
    base = make_batch(8)
    log_pf, log_pterm, log_r, lengths, log_z = base
    for name, _ in _all_losses(*base).items():
        pf, pt, r, z = leaves(log_pf, log_pterm, log_r, log_z)
        loss = _all_losses(pf, pt, r, lengths, z)[name]
        assert torch.isfinite(loss), name
        loss.backward()
        for t, tname in ((pf, "log_pf"), (pt, "log_pterm"), (r, "log_r")):
            assert t.grad is not None and torch.isfinite(t.grad).all(), (name, tname)
            assert t.grad.abs().sum() > 0, (name, tname)
        # padding and impossible-stop entries get exactly zero gradient
        tok = torch.arange(log_pf.shape[1])[None] < lengths[:, None]
        assert torch.all(pf.grad[~tok] == 0), name
        pre = torch.arange(log_pf.shape[1] + 1)[None] <= lengths[:, None]
        assert torch.all(pt.grad[~pre] == 0), name
        assert torch.all(r.grad[~torch.isfinite(log_r)] == 0), name
        if name == "tb" or name.endswith("_z"):
            assert z.grad is not None and torch.isfinite(z.grad).all()
            assert z.grad.abs().sum() > 0, name
        if name.endswith("_z"):
            # log_z reaches only rows that cannot stop at the empty prefix
            assert torch.all(z.grad[torch.isfinite(log_pterm[:, 0])] == 0), name


def test_no_contributing_rows_gives_attached_zero():
    B, N = 3, 4
    log_pf = torch.full((B, N), NEG_INF).requires_grad_(True)
    log_pterm = torch.full((B, N + 1), NEG_INF)
    log_pterm[:, 0] = -1.0  # each row: empty trajectory, single stop position
    log_pterm.requires_grad_(True)
    log_r = torch.randn(B, N + 1).requires_grad_(True)
    lengths = torch.zeros(B, dtype=torch.long)
    for lam in (1.0, 0.5):
        loss = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, lam)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        loss.backward()
        assert torch.isfinite(log_pf.grad).all() and torch.isfinite(log_pterm.grad).all()
    loss = modified_db_loss(log_pf, log_pterm, log_r, lengths)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    one = vargrad_loss(log_pf[:1], log_pterm[:1], log_r[:1], lengths[:1])
    assert one.item() == 0.0 and one.grad_fn is not None
    singletons = vargrad_loss(log_pf, log_pterm, log_r, lengths, torch.arange(B))
    assert singletons.item() == 0.0 and singletons.grad_fn is not None
    singletons.backward()
    assert torch.isfinite(log_r.grad).all()


def test_weights_do_not_underflow_for_small_lamda():
    """Only positions 0 and N valid: a single pair of weight lamda**(N-1) ~ 0."""
    B, N = 2, 60
    g = torch.Generator().manual_seed(0)
    log_pf = -torch.rand(B, N, generator=g)
    log_pterm = torch.full((B, N + 1), NEG_INF)
    log_pterm[:, 0] = -0.5
    log_pterm[:, N] = 0.0
    log_r = torch.randn(B, N + 1, generator=g)
    lengths = torch.full((B,), N)
    got = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 0.01, reduction="none")
    ref = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 1.0, reduction="none")
    assert torch.isfinite(got).all()
    assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_lengths_zero_and_full_rows():
    log_pf, log_pterm, log_r, lengths, log_z = make_batch(0)
    N = log_pf.shape[1]
    rows = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 1.0, reduction="none")
    assert rows[0] == 0  # empty trajectory alone has one position, no pair
    assert (rows[lengths == N] > 0).all()
    tb = trajectory_balance_loss(log_pf, log_pterm, log_r, lengths, log_z, reduction="none")
    assert_close(tb[0], (log_z[0] + log_pterm[0, 0] - log_r[0, 0]) ** 2)


def test_input_validation_and_registry():
    log_pf, log_pterm, log_r, lengths, log_z = make_batch(0)
    with pytest.raises(ValueError):
        modified_subtb_loss(log_pf, log_pterm, log_r, lengths, reduction="sum")
    with pytest.raises(ValueError):
        modified_subtb_loss(log_pf, log_pterm, log_r, lengths, lamda=-0.5)
    with pytest.raises(ValueError):
        modified_subtb_loss(log_pf, log_pterm[:, :-1], log_r, lengths)
    with pytest.raises(ValueError):
        modified_db_loss(log_pf, log_pterm, log_r[:, 0], lengths)
    with pytest.raises(ValueError):
        trajectory_balance_loss(log_pf, log_pterm, log_r, lengths + 1, log_z)
    with pytest.raises(ValueError):
        vargrad_loss(log_pf, log_pterm, log_r, lengths, group=torch.zeros(2, dtype=torch.long))
    assert set(LOSSES) == {"modified_subtb", "subtb", "tb", "vargrad", "modified_db"}
    assert LOSSES["subtb"].fn is LOSSES["modified_subtb"].fn is modified_subtb_loss
    assert LOSSES["tb"].fn is trajectory_balance_loss
    assert LOSSES["vargrad"].fn is vargrad_loss and LOSSES["modified_db"].fn is modified_db_loss


def test_tempered():
    x = torch.tensor([-2.0, 0.0, 3.0])
    assert_close(tempered(x, 2.0), x / 2.0)
    assert_close(tempered(x, 1), x)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            tempered(x, bad)


# ----------------------------------------------------------------------------
# perfect solution on a small enumerable problem
# ----------------------------------------------------------------------------


def _perfect_problem(min_len: int, seed: int = 0):
    """All strings over {0, 1} of length <= 3; random rewards, flow-consistent policy.

    R(s) > 0 for len(s) >= min_len (0 below). F(s) = R(s) + sum_x F(sx)
    (F(s) = R(s) at length 3), q(x|s) = F(sx)/F(s), q(⊤|s) = R(s)/F(s),
    Z = F(empty). Returns every string as a padded trajectory, plus log Z.
    """
    N = 3
    g = torch.Generator().manual_seed(seed)
    strings = [s for n in range(N + 1) for s in itertools.product((0, 1), repeat=n)]
    R = {s: (float(torch.rand((), generator=g)) + 0.1 if len(s) >= min_len else 0.0) for s in strings}
    F = {}
    for s in sorted(strings, key=len, reverse=True):
        F[s] = R[s] + (sum(F[s + (x,)] for x in (0, 1)) if len(s) < N else 0.0)
    log = lambda v: math.log(v) if v > 0 else NEG_INF  # noqa: E731
    trajs = [s for s in strings if len(s) >= min_len]
    B = len(trajs)
    log_pf = torch.full((B, N), NEG_INF, dtype=torch.float64)
    log_pterm = torch.full((B, N + 1), float("inf"), dtype=torch.float64)
    log_r = torch.full((B, N + 1), 1e30, dtype=torch.float64)
    lengths = torch.tensor([len(s) for s in trajs])
    for b, s in enumerate(trajs):
        for t in range(len(s) + 1):
            p = s[:t]
            log_pterm[b, t] = log(R[p] / F[p])
            log_r[b, t] = log(R[p])
            if t < len(s):
                log_pf[b, t] = log(F[s[: t + 1]] / F[p])
    log_z = torch.full((B,), math.log(F[()]), dtype=torch.float64)
    return log_pf, log_pterm, log_r, lengths, log_z


@pytest.mark.parametrize("min_len", [0, 1, 2])
def test_perfect_policy_has_zero_loss_and_perturbation_breaks_it(min_len):
    log_pf, log_pterm, log_r, lengths, log_z = _perfect_problem(min_len)
    # sanity: the policy is normalised at every prefix (stop + both tokens)
    if min_len == 0:
        assert_close(log_pterm[0, 0].exp() + log_pf[lengths == 1, 0].exp().sum(), 1.0)
    perfect = _all_losses(log_pf, log_pterm, log_r, lengths, log_z, reduction="none")
    for name, v in perfect.items():
        assert torch.isfinite(v).all(), name
        assert v.abs().max() < 1e-20, (name, v)
    g = torch.Generator().manual_seed(1)
    noisy = log_pf + 0.3 * torch.randn(log_pf.shape, generator=g, dtype=log_pf.dtype)
    broken = _all_losses(noisy, log_pterm, log_r, lengths, log_z)
    for name, v in broken.items():
        assert v > 1e-4, (name, v)
    # without log_z and with min length 2, tokens 1-2 appear in no residual of
    # SubTB/DB: perturbing only them goes unnoticed, with log_z it does not
    if min_len == 2:
        early = log_pf.clone()
        early[:, :2] += 0.3
        blind = modified_subtb_loss(early, log_pterm, log_r, lengths, 1.0)
        anchored = modified_subtb_loss(early, log_pterm, log_r, lengths, 1.0, log_z)
        assert blind < 1e-20 and anchored > 1e-4


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("use_z", [False, True])
@pytest.mark.parametrize("lamda", [1.0, 0.5, 0.0])
def test_contributing_rows_match_brute_force_and_the_losses(seed, use_z, lamda):
    """``LossSpec.contributing``: the rows with at least one residual, by a double loop over the
    pairs (transitions, groups) of each objective (modified SubTB with ``lamda == 0`` weighs only
    pairs of consecutive prefixes); exactly the rows whose per-row loss is not 0."""
    log_pf, log_pterm, log_r, lengths, log_z = make_batch(seed)
    z = log_z if use_z else None
    group = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    pterm, lens = log_pterm.tolist(), lengths.tolist()
    B = len(lens)
    expected = {}
    for name in ("modified_subtb", "modified_db", "tb", "vargrad"):
        rows = []
        for b in range(B):
            pos = _valid_positions(pterm[b], lens[b])
            if name == "modified_subtb" and z is not None and 0 not in pos:
                pos = [0] + pos  # F_0 = log Z
            if name == "modified_subtb":
                rows.append(any(i < j and (lamda > 0 or j == i + 1) for i in pos for j in pos))
            elif name == "modified_db":
                rows.append(any(t + 1 in pos for t in pos))
            elif name == "tb":
                rows.append(True)
            else:
                rows.append(sum(int(group[c]) == int(group[b]) for c in range(B)) >= 2)
        expected[name] = rows
        got = LOSSES[name].contributing(log_pterm, lengths, log_z=z, group=group, lamda=lamda)
        assert got.dtype == torch.bool and got.tolist() == rows, name
    assert not all(expected["modified_subtb"]) and any(expected["modified_subtb"])  # the batch has both kinds
    assert LOSSES["vargrad"].contributing(log_pterm, lengths).tolist() == [True] * B  # no group: one group
    assert LOSSES["vargrad"].contributing(log_pterm[:1], lengths[:1]).tolist() == [False]
    per_row = {"modified_subtb": modified_subtb_loss(log_pf, log_pterm, log_r, lengths, lamda, z, reduction="none"),
               "modified_db": modified_db_loss(log_pf, log_pterm, log_r, lengths, reduction="none"),
               "vargrad": vargrad_loss(log_pf, log_pterm, log_r, lengths, group, reduction="none")}
    for name, rows in per_row.items():
        assert (rows != 0).tolist() == expected[name], name


# ----------------------------------------------------------------------------
# soft-label distillation: sum over visited states of KL(p || q)
# ----------------------------------------------------------------------------


def _random_distributions(B, T, A, seed, zeros):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, A, generator=g, dtype=torch.float64) * 2
    x = x.masked_fill(zeros, NEG_INF)
    return x.log_softmax(-1)


def test_stepwise_kl_matches_brute_force_and_is_zero_only_at_a_match():
    B, T, A = 4, 5, 7
    g = torch.Generator().manual_seed(0)
    zeros = torch.rand(B, T, A, generator=g) < 0.3  # actions the constraints forbid: no mass for either
    zeros[..., 0] = False
    p, q = _random_distributions(B, T, A, 1, zeros), _random_distributions(B, T, A, 2, zeros)
    q[0, 4] = float("nan")  # beyond row 0's length: never read
    lengths = torch.tensor([3, 4, 0, 2])
    got = L.stepwise_kl(p, q, lengths)
    for b in range(B):
        want = 0.0
        for t in range(int(lengths[b]) + 1):
            for a in range(A):
                pa = math.exp(p[b, t, a].item())
                if pa > 0:
                    want += pa * (p[b, t, a].item() - q[b, t, a].item())
        assert got[b].item() == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert want > 0
    assert torch.equal(L.stepwise_kl(p, p.clone(), lengths), torch.zeros(B, dtype=torch.float64))

    qq = q.clone().requires_grad_(True)
    L.stepwise_kl(p, qq, lengths).sum().backward()
    assert torch.isfinite(qq.grad).all()  # -inf entries and padding get exact zero gradient
    assert (qq.grad[zeros] == 0).all() and (qq.grad[0, 4:] == 0).all()
    assert torch.allclose(qq.grad[1, 0], -p[1, 0].exp())  # d/dq of -sum_a p_a log q_a

    q_missing = q.clone()
    q_missing[1, 2, 0] = NEG_INF  # the teacher gives the action mass, the policy none
    assert math.isinf(L.stepwise_kl(p, q_missing, lengths)[1].item())
    with pytest.raises(ValueError, match=r"must both be \[B, N\+1, A\]"):
        L.stepwise_kl(p, q[:, :, :3], lengths)
    with pytest.raises(ValueError, match="lengths must be"):
        L.stepwise_kl(p, q, lengths[:2])
