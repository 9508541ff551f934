"""Tests of gfnlm.diagnostics against brute force written from the definitions."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from gfnlm.diagnostics import elbo_difference, elbo_standard_error, exact_diagnostics, sampler_diagnostics

INF = float("inf")


# ----------------------------------------------------------------------------
# brute force, straight from the definitions (Python floats, loops)
# ----------------------------------------------------------------------------


def _lme(xs):
    """log mean exp of a list of floats (shifted by the max)."""
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs) / len(xs))


def brute_sampler(log_r, log_q, iw_k=None):
    """Per-prompt figures with loops over the samples, then the mean over prompts."""
    lr, lq = log_r.tolist(), log_q.tolist()
    if log_r.dim() == 1:
        lr, lq = [lr], [lq]
    P, K = len(lr), len(lr[0])
    k = K if iw_k is None else iw_k
    per = {"elbo": [], "log_z_is": [], "iw_bound": [], "ess": [], "log_w_var": [], "log_w_std": [],
           "target_mean_log_r": []}
    elbo_var = 0.0  # variance of the mean over prompts of the per-prompt sample means
    for i in range(P):
        lw = [lr[i][j] - lq[i][j] for j in range(K)]
        mean = sum(lw) / K
        var = sum((x - mean) ** 2 for x in lw) / (K - 1) if K > 1 else 0.0
        groups = [lw[g * k:(g + 1) * k] for g in range(K // k)]
        m = max(lw)
        w = [math.exp(x - m) for x in lw]  # weights up to a common factor
        per["elbo"].append(mean)
        per["log_z_is"].append(_lme(lw))
        per["iw_bound"].append(sum(_lme(g) for g in groups) / len(groups))
        per["ess"].append(sum(w) ** 2 / (K * sum(x * x for x in w)))
        per["log_w_var"].append(var)
        per["log_w_std"].append(math.sqrt(var))
        per["target_mean_log_r"].append(sum(wj * rj for wj, rj in zip(w, lr[i])) / sum(w))
        elbo_var += var / K / P ** 2
    out = {key: sum(v) / P for key, v in per.items()}
    out.update(n_samples=K, n_prompts=P, elbo_se=math.sqrt(elbo_var) if K > 1 else math.nan)
    return out


def brute_exact(log_r, log_q):
    """Every figure of exact_diagnostics by a loop over the outcomes (numpy float64)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero p or q gives inf, as it should
        return _brute_exact(np.asarray(log_r, dtype=np.float64), np.asarray(log_q, dtype=np.float64))


def _brute_exact(lr, lq):
    Z = np.exp(lr).sum()
    p, q = np.exp(lr) / Z, np.exp(lq)
    m = q.sum()
    qt = q / m
    elbo = kl_qp = kl_pq = ew = ew2 = lw_mean = mean_log_r = 0.0
    for i in range(len(lr)):
        if q[i] > 0:
            elbo += q[i] * (lr[i] - lq[i])
            kl_qp += qt[i] * math.log(qt[i] / p[i])
            ew += qt[i] * (np.exp(lr[i]) / qt[i])
            ew2 += qt[i] * (np.exp(lr[i]) / qt[i]) ** 2
            lw_mean += qt[i] * (lr[i] - lq[i])
        if p[i] > 0:
            kl_pq += p[i] * math.log(p[i] / qt[i])
            mean_log_r += p[i] * lr[i]
    var = sum(qt[i] * (lr[i] - lq[i] - lw_mean) ** 2 for i in range(len(lr)) if q[i] > 0)
    outside = max(1.0 - m, 0.0)
    return {
        "log_z": math.log(Z), "q_mass_outside": outside, "elbo": elbo, "kl_q_p": kl_qp, "kl_p_q": kl_pq,
        "tv": 0.5 * sum(abs(p[i] - q[i]) for i in range(len(lr))) + 0.5 * outside,
        "log_w_var": var, "log_w_std": math.sqrt(var), "ess": ew ** 2 / ew2,
        "target_mean_log_r": mean_log_r,
    }


def assert_close(got: dict, want: dict, rel=1e-9, abs=1e-9):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=abs, nan_ok=True), key


def random_logits(M, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, generator=g, dtype=torch.float64) * scale


# ----------------------------------------------------------------------------
# sampler_diagnostics
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampler_at_the_optimum_every_bound_is_log_z(dtype):
    """q = R / Z: log_w = log Z for every sample, so the bounds meet and the weights are flat."""
    g = torch.Generator().manual_seed(0)
    P, K = 4, 12
    log_r = torch.randn(P, K, generator=g, dtype=torch.float64) * 3
    log_z = torch.randn(P, generator=g, dtype=torch.float64) * 5
    log_q = log_r - log_z[:, None]
    d = sampler_diagnostics(log_r.to(dtype), log_q.to(dtype), iw_k=3)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    expected = log_z.mean().item()
    for key in ("elbo", "log_z_is", "iw_bound"):
        assert d[key] == pytest.approx(expected, abs=tol * 10), key
    assert d["ess"] == pytest.approx(1.0, abs=tol)
    assert d["log_w_var"] == pytest.approx(0.0, abs=tol * 10)
    assert d["n_samples"] == K and d["n_prompts"] == P
    # flat weights: the target's mean log R is the samples' plain mean
    assert d["target_mean_log_r"] == pytest.approx(log_r.mean().item(), abs=tol * 100)


@pytest.mark.parametrize("P,K,iw_k", [(3, 8, None), (3, 8, 8), (3, 8, 1), (3, 8, 2), (2, 10, 3), (5, 7, 4), (1, 1, 1)])
def test_sampler_matches_brute_force(P, K, iw_k):
    g = torch.Generator().manual_seed(P * 100 + K)
    log_r = torch.randn(P, K, generator=g, dtype=torch.float64) * 4 - 2
    log_q = -torch.rand(P, K, generator=g, dtype=torch.float64) * 6
    assert_close(sampler_diagnostics(log_r, log_q, iw_k=iw_k), brute_sampler(log_r, log_q, iw_k))


def test_sampler_accepts_one_prompt_as_a_vector():
    g = torch.Generator().manual_seed(1)
    log_r, log_q = torch.randn(9, generator=g) * 2, -torch.rand(9, generator=g) * 5
    d = sampler_diagnostics(log_r, log_q, iw_k=4)
    assert_close(d, brute_sampler(log_r.double(), log_q.double(), 4), rel=1e-6, abs=1e-6)
    assert d == sampler_diagnostics(log_r[None], log_q[None], iw_k=4)
    assert d["n_prompts"] == 1 and d["n_samples"] == 9


def test_sampler_bounds_are_ordered_and_ess_in_range():
    """Per prompt, the mean of log_w <= any IW group bound average <= log mean exp (Jensen)."""
    g = torch.Generator().manual_seed(2)
    log_r, log_q = torch.randn(4, 12, generator=g) * 3, -torch.rand(4, 12, generator=g) * 4
    d = {k: sampler_diagnostics(log_r, log_q, iw_k=k) for k in (1, 2, 3, 4, 6, 12)}
    assert d[1]["iw_bound"] == pytest.approx(d[1]["elbo"], abs=1e-6)
    assert d[12]["iw_bound"] == pytest.approx(d[12]["log_z_is"], abs=1e-6)
    for k in (2, 3, 4, 6, 12):
        assert d[1]["elbo"] - 1e-6 <= d[k]["iw_bound"] <= d[12]["log_z_is"] + 1e-6
    assert 0.0 < d[1]["ess"] <= 1.0


def test_sampler_is_stable_for_huge_log_weights():
    log_r = torch.tensor([[1000.0, 1001.0, 999.0]], dtype=torch.float64)
    log_q = torch.zeros(1, 3, dtype=torch.float64)
    d = sampler_diagnostics(log_r, log_q)
    assert all(math.isfinite(v) for v in d.values())
    assert_close(d, brute_sampler(log_r, log_q))


@pytest.mark.parametrize("bad", [float("nan"), INF, -INF])
@pytest.mark.parametrize("which", ["log_r", "log_q"])
def test_sampler_rejects_non_finite(bad, which):
    x = {"log_r": torch.zeros(2, 4), "log_q": -torch.ones(2, 4)}
    x[which][1, 2] = bad
    with pytest.raises(ValueError, match=f"{which} has non-finite"):
        sampler_diagnostics(x["log_r"], x["log_q"])


@pytest.mark.parametrize("iw_k", [0, -1, 5, 2.5, True, "2"])
def test_sampler_rejects_bad_iw_k(iw_k):
    with pytest.raises(ValueError, match="iw_k"):
        sampler_diagnostics(torch.zeros(2, 4), -torch.ones(2, 4), iw_k=iw_k)


@pytest.mark.parametrize("shape_r,shape_q", [((2, 4), (2, 3)), ((4,), (1, 4)), ((2, 2, 2), (2, 2, 2)),
                                             ((0, 4), (0, 4)), ((3, 0), (3, 0)), ((), ())])
def test_sampler_rejects_bad_shapes(shape_r, shape_q):
    with pytest.raises(ValueError):
        sampler_diagnostics(torch.zeros(shape_r), torch.zeros(shape_q))


# ----------------------------------------------------------------------------
# exact_diagnostics
# ----------------------------------------------------------------------------


def test_exact_at_the_optimum():
    log_r = random_logits(7, 0, scale=3.0) + 2.0
    log_q = torch.log_softmax(log_r, 0)
    d = exact_diagnostics(log_r, log_q)
    log_z = torch.logsumexp(log_r, 0).item()
    assert d["log_z"] == pytest.approx(log_z, abs=1e-12)
    assert d["elbo"] == pytest.approx(log_z, abs=1e-12)
    for key in ("kl_q_p", "kl_p_q", "tv", "log_w_var", "log_w_std", "q_mass_outside"):
        assert d[key] == pytest.approx(0.0, abs=1e-7), key
    assert d["ess"] == pytest.approx(1.0, abs=1e-12)
    assert d["target_mean_log_r"] == pytest.approx((log_q.exp() * log_r).sum().item(), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_exact_matches_brute_force_and_elbo_identity(seed):
    log_r = random_logits(9, seed, scale=2.0) - 1.0
    log_q = torch.log_softmax(random_logits(9, seed + 100), 0)
    d = exact_diagnostics(log_r, log_q)
    assert_close(d, brute_exact(log_r, log_q))
    # ELBO = log Z - KL(q || p) < log Z for q != p; TV written directly
    assert d["elbo"] == pytest.approx(d["log_z"] - d["kl_q_p"], abs=1e-12)
    assert d["elbo"] < d["log_z"] - 1e-6 and d["kl_q_p"] > 1e-6 and d["kl_p_q"] > 1e-6
    p, q = torch.softmax(log_r, 0), log_q.exp()
    assert d["tv"] == pytest.approx(sum(abs(a - b) for a, b in zip(p.tolist(), q.tolist())) / 2, abs=1e-12)
    assert 0.0 < d["ess"] < 1.0


def test_exact_elbo_reaches_log_z_only_at_p():
    """Along q_t = (1 - t) p + t u the gap log Z - ELBO is 0 at t = 0 only and grows with t."""
    log_r = random_logits(6, 3, scale=2.0)
    p = torch.softmax(log_r, 0)
    u = torch.full_like(p, 1 / 6)
    gaps = [exact_diagnostics(log_r, ((1 - t) * p + t * u).log()) for t in (0.0, 0.1, 0.4, 1.0)]
    gaps = [d["log_z"] - d["elbo"] for d in gaps]
    assert gaps[0] == pytest.approx(0.0, abs=1e-12)
    assert all(b > a + 1e-6 for a, b in zip(gaps, gaps[1:]))


def test_exact_with_mass_outside():
    """q puts 30% outside: shape figures see q renormalised, tv/elbo/q_mass_outside see the 30%."""
    log_r = random_logits(8, 5)
    q_in = torch.softmax(random_logits(8, 6), 0)
    m = 0.7
    d = exact_diagnostics(log_r, (m * q_in).log())
    full = exact_diagnostics(log_r, q_in.log())
    assert_close(d, brute_exact(log_r, (m * q_in).log()))
    assert d["q_mass_outside"] == pytest.approx(1 - m, abs=1e-12)
    for key in ("kl_q_p", "kl_p_q", "log_w_var", "ess"):
        assert d[key] == pytest.approx(full[key], abs=1e-12), key
    assert d["elbo"] == pytest.approx(m * (d["log_z"] - d["kl_q_p"]) - m * math.log(m), abs=1e-12)
    p = torch.softmax(log_r, 0)
    direct_tv = 0.5 * ((p - m * q_in).abs().sum().item() + (1 - m))
    assert d["tv"] == pytest.approx(direct_tv, abs=1e-12)


def test_exact_zeros_give_infinities_not_nan():
    log_r = torch.tensor([0.0, -1.0, -INF, 0.5], dtype=torch.float64)
    # q = 0 where R > 0 (outcome 1): KL(p || q) = inf; q > 0 where R > 0 elsewhere
    log_q = torch.log(torch.tensor([0.5, 0.0, 0.0, 0.5], dtype=torch.float64))
    d = exact_diagnostics(log_r, log_q)
    assert d["kl_p_q"] == INF and math.isfinite(d["kl_q_p"]) and math.isfinite(d["elbo"])
    assert_close({k: v for k, v in d.items() if k != "kl_p_q"},
                  {k: v for k, v in brute_exact(log_r, log_q).items() if k != "kl_p_q"})
    # q > 0 where R = 0 (outcome 2): ELBO = -inf, KL(q || p) = inf, Var = inf
    log_q = torch.log(torch.tensor([0.4, 0.2, 0.1, 0.3], dtype=torch.float64))
    d = exact_diagnostics(log_r, log_q)
    assert d["elbo"] == -INF and d["kl_q_p"] == INF and d["log_w_var"] == INF and math.isfinite(d["kl_p_q"])
    assert not any(math.isnan(v) for v in d.values())
    assert d["ess"] == pytest.approx(brute_exact(log_r, log_q)["ess"], rel=1e-12)


@pytest.mark.parametrize("log_r,log_q", [
    ([0.0, 1.0], [-1.0]),
    ([[0.0, 1.0]], [[-1.0, -1.0]]),
    ([0.0, float("nan")], [-1.0, -1.0]),
    ([0.0, INF], [-1.0, -1.0]),
    ([0.0, 1.0], [float("nan"), -1.0]),
    ([0.0, 1.0], [INF, -1.0]),
    ([-INF, -INF], [-1.0, -1.0]),
    ([0.0, 1.0], [-INF, -INF]),
])
def test_exact_rejects_bad_input(log_r, log_q):
    with pytest.raises(ValueError):
        exact_diagnostics(torch.tensor(log_r), torch.tensor(log_q))


# ----------------------------------------------------------------------------
# Monte Carlo: sampler_diagnostics on many draws of q converges to exact_diagnostics
# ----------------------------------------------------------------------------


def test_sampler_converges_to_exact():
    """n draws from a categorical q; each estimate must lie within 5 standard errors of the
    exact value, the standard error computed exactly from q (CLT / delta method)."""
    M, n = 6, 200_000
    log_r = random_logits(M, 10)
    log_q = torch.log_softmax(random_logits(M, 11, scale=0.8), 0)
    exact = exact_diagnostics(log_r, log_q)
    idx = torch.multinomial(log_q.exp(), n, replacement=True, generator=torch.Generator().manual_seed(12))
    est = sampler_diagnostics(log_r[idx], log_q[idx])

    q = log_q.exp().numpy()
    lw = (log_r - log_q).numpy()
    w = np.exp(lw - lw.max())  # ESS is scale-free
    E = lambda f: float((q * f).sum())  # noqa: E731  expectation under q
    mu = E(lw)
    c2, c4 = E((lw - mu) ** 2), E((lw - mu) ** 4)
    # elbo: a mean, se = sd / sqrt(n); log_w_var: a sample variance, se = sqrt((mu4 - s^4) / n)
    assert abs(est["elbo"] - exact["elbo"]) < 5 * math.sqrt(c2 / n)
    assert abs(est["log_w_var"] - exact["log_w_var"]) < 5 * math.sqrt((c4 - c2 ** 2) / n)
    # ess = a^2 / b with a = mean w, b = mean w^2: delta method on (a, b)
    a, b = E(w), E(w ** 2)
    cov = np.array([[b - a * a, E(w ** 3) - a * b], [E(w ** 3) - a * b, E(w ** 4) - b * b]])
    grad = np.array([2 * a / b, -a * a / b ** 2])
    assert abs(est["ess"] - exact["ess"]) < 5 * math.sqrt(grad @ cov @ grad / n)
    # log_z_is = log mean w: se = sd(w) / E[w] / sqrt(n)
    assert abs(est["log_z_is"] - exact["log_z"]) < 5 * math.sqrt((b - a * a) / n) / a
    # target_mean_log_r = E_q[w r] / E_q[w]: delta method, se = sqrt(E_q[w^2 (r - mu)^2] / n) / E_q[w]
    r, mu = log_r.numpy(), exact["target_mean_log_r"]
    assert abs(est["target_mean_log_r"] - mu) < 5 * math.sqrt(E(w ** 2 * (r - mu) ** 2) / n) / a
    # and the estimates are not trivially equal to the exact values: the test has teeth
    assert exact["log_w_var"] > 0.1 and exact["ess"] < 0.95
    assert abs(mu - E(r)) > 0.1  # E_p[log R] is not the samples' plain mean E_q[log R]


def test_elbo_se_is_the_spread_of_the_elbo_over_repeated_evaluations():
    """Evaluate two samplers of the same 3 prompts 4000 times (K = 8 draws each): the standard
    deviation of each ELBO estimate, and of their difference, matches the standard error that
    sampler_diagnostics and elbo_difference report, and the exact difference lies within 2 reported
    standard errors about 95 % of the time."""
    M, P, K, reps = 6, 3, 8, 4000
    log_r = torch.stack([random_logits(M, 20 + i) for i in range(P)])  # [P, M]
    log_qs = [torch.stack([torch.log_softmax(random_logits(M, s + i, scale=0.8), 0) for i in range(P)])
              for s in (30, 50)]
    exact = [statistics.fmean(exact_diagnostics(log_r[i], lq[i])["elbo"] for i in range(P)) for lq in log_qs]
    g = torch.Generator().manual_seed(40)
    elbo, se, diff, diff_se = [], [], [], []
    for _ in range(reps):
        ds = []
        for lq in log_qs:
            idx = torch.multinomial(lq.exp(), K, replacement=True, generator=g)  # [P, K]
            ds.append(sampler_diagnostics(log_r.gather(1, idx), lq.gather(1, idx)))
        elbo.append(ds[0]["elbo"])
        se.append(ds[0]["elbo_se"])
        assert ds[0]["elbo_se"] == elbo_standard_error(ds[0])
        d, s = elbo_difference(ds[0], ds[1])
        diff.append(d)
        diff_se.append(s)
    assert statistics.fmean(se) == pytest.approx(statistics.stdev(elbo), rel=0.05)
    assert statistics.fmean(diff_se) == pytest.approx(statistics.stdev(diff), rel=0.05)
    covered = statistics.fmean(abs(d - (exact[0] - exact[1])) < 2 * s for d, s in zip(diff, diff_se))
    assert 0.92 < covered < 0.97
    assert statistics.stdev(elbo) > 0.1 and abs(exact[0] - exact[1]) > 0.1  # the test has teeth


def test_elbo_se_needs_two_samples_a_prompt():
    assert math.isnan(sampler_diagnostics(torch.zeros(3, 1), -torch.ones(3, 1))["elbo_se"])


# ----------------------------------------------------------------------------
# target_means: what a sampler that matched the target would score
# ----------------------------------------------------------------------------


def test_target_means_equal_brute_force_loops():
    """Per prompt, sum_j w_j f_j / sum_j w_j with w = exp(log_r - log_q) and the delta-method error
    sqrt(sum_p sum_j (w_j / sum w)^2 (f_j - mean_p)^2) / P, by loops over Python floats."""
    from gfnlm.diagnostics import target_means

    g = torch.Generator().manual_seed(3)
    P, K = 4, 7
    log_r = torch.randn(P, K, generator=g, dtype=torch.float64) * 3
    log_q = torch.randn(P, K, generator=g, dtype=torch.float64) - 2
    f = torch.rand(P, K, generator=g, dtype=torch.float64) * 10
    got = target_means(log_r, log_q, {"f": f, "log_r": log_r})
    means, var_sum = [], 0.0
    for i in range(P):
        lw = [float(log_r[i, j] - log_q[i, j]) for j in range(K)]
        m = max(lw)
        w = [math.exp(x - m) for x in lw]
        wn = [x / sum(w) for x in w]
        mu = sum(a * float(b) for a, b in zip(wn, f[i]))
        means.append(mu)
        var_sum += sum(a * a * (float(b) - mu) ** 2 for a, b in zip(wn, f[i]))
    assert got["f"]["target"] == pytest.approx(sum(means) / P, abs=1e-12)
    assert got["f"]["target_se"] == pytest.approx(math.sqrt(var_sum) / P, abs=1e-12)
    assert got["f"]["sampler"] == pytest.approx(f.double().mean().item(), abs=1e-12)
    # one implementation: f = log R is sampler_diagnostics' target_mean_log_r
    assert got["log_r"]["target"] == pytest.approx(sampler_diagnostics(log_r, log_q)["target_mean_log_r"], abs=1e-12)
    assert abs(got["f"]["target"] - got["f"]["sampler"]) > 0.1  # the weights matter here


def test_target_means_converge_to_the_targets_expectation():
    """Draws from a categorical q ≠ p: the estimate of E_p[f] lies within 5 of its reported standard
    errors of the exact sum_m p_m f_m, and far from E_q[f]; with q = p it is the plain mean."""
    from gfnlm.diagnostics import target_means

    M, n = 6, 100_000
    log_r = random_logits(M, 20)
    log_q = torch.log_softmax(random_logits(M, 21, scale=0.8), 0)
    f = torch.tensor([3.0, 9.0, 4.0, 12.0, 7.0, 5.0], dtype=torch.float64)  # e.g. a length
    p = torch.softmax(log_r.double(), 0)
    exact = float((p * f).sum())
    idx = torch.multinomial(log_q.exp(), n, replacement=True, generator=torch.Generator().manual_seed(22))
    got = target_means(log_r[idx], log_q[idx], {"f": f[idx]})["f"]
    assert abs(got["target"] - exact) < 5 * got["target_se"]
    assert abs(got["sampler"] - float((log_q.exp() * f).sum())) < 0.05
    assert abs(exact - float((log_q.exp() * f).sum())) > 1.0  # E_p[f] is not E_q[f]: the test has teeth
    same = target_means(log_r[idx], log_r[idx] - 1.7, {"f": f[idx]})["f"]  # q ∝ R: equal weights
    assert same["target"] == pytest.approx(same["sampler"], abs=1e-9)


def test_target_means_reject_bad_values():
    from gfnlm.diagnostics import target_means

    log_r, log_q = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"values\['f'\] must have the samples' shape"):
        target_means(log_r, log_q, {"f": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="non-finite"):
        target_means(log_r, log_q, {"f": torch.tensor([[0.0, float("nan"), 1.0], [0, 0, 0]])})


def test_target_means_pool_two_proposals_through_their_mixture():
    """Two proposals that each see only half of the outcomes: weighed against their equal mixture
    (balance heuristic), their pooled samples estimate E_p[f] within 5 reported errors, while either
    proposal alone estimates the mean over its own half only."""
    from gfnlm.diagnostics import target_means

    f = torch.tensor([3.0, 9.0, 4.0, 12.0, 7.0, 5.0], dtype=torch.float64)
    log_r = torch.tensor([0.5, -1.0, 0.0, 1.0, 2.0, 0.3], dtype=torch.float64)
    q1 = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0], dtype=torch.float64)
    q2 = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.2, 0.6], dtype=torch.float64)
    exact = float((torch.softmax(log_r, 0) * f).sum())
    n = 40_000
    g = torch.Generator().manual_seed(30)
    a, b = torch.multinomial(q1, n, True, generator=g), torch.multinomial(q2, n, True, generator=g)
    idx = torch.cat([a, b])
    log_mix = torch.log(0.5 * (q1 + q2))
    pooled = target_means(log_r[idx], log_mix[idx], {"f": f[idx]})["f"]
    assert abs(pooled["target"] - exact) < 5 * pooled["target_se"]
    for own, q in ((a, q1), (b, q2)):
        alone = target_means(log_r[own], q.log()[own], {"f": f[own]})["f"]
        assert abs(alone["target"] - exact) > 20 * alone["target_se"] + 0.5
