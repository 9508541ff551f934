r"""How close is a sampler ``q(Z | X)`` to its target ``p(Z | X) = R(X, Z) / Z(X)``?

Pure functions of tensors: no model, no module state. All values named ``log_*`` are
natural-log quantities (log space); the log-weight of an outcome is
``log_w = log R - log q``. Inputs of any floating dtype are upcast and every figure is
computed in ``float64``; results are Python floats.

:func:`sampler_diagnostics` estimates the figures from ``K`` samples of ``q`` per prompt
(what a training run can afford); :func:`exact_diagnostics` computes them exactly when the
outcome space can be enumerated (a small task, a unit test).

At the optimum (``q = p``) ``log_w = log Z`` for every outcome, so ``elbo``, ``log_z_is``,
``iw_bound`` and ``log_z`` coincide, ``ess == 1`` and ``log_w_var == 0``.

Both also give ``target_mean_log_r``, the mean log-reward ``E_p[log R]`` of the target itself: what
a sampler that matched the target would score, the yardstick for comparing a sampler's mean log R
with a reward maximiser's (best-of-n reranking).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

__all__ = ["elbo_difference", "elbo_standard_error", "elbo_text", "exact_diagnostics", "sampler_diagnostics",
           "target_means"]

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _as_float64(x, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real tensor, got dtype {x.dtype}")
    return x.detach().to(device="cpu", dtype=torch.float64)


def _log_mean_exp(x: Tensor, dim: int = -1) -> Tensor:
    """``log mean exp(x)`` along ``dim`` (log space)."""
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def _check_iw_k(iw_k, K: int) -> int:
    if iw_k is None:
        return K
    try:
        k = operator.index(iw_k)
    except TypeError:
        raise ValueError(f"iw_k must be an integer in [1, K] = [1, {K}], got {iw_k!r}") from None
    if isinstance(iw_k, bool) or not 1 <= k <= K:
        raise ValueError(f"iw_k must be an integer in [1, K] = [1, {K}], got {iw_k!r}")
    return k


# ----------------------------------------------------------------------------
# from samples
# ----------------------------------------------------------------------------


def _sample_inputs(log_r, log_q) -> tuple[Tensor, Tensor]:
    """Validate and return ``(log_r, log_q)`` as float64 ``[P, K]``."""
    log_r, log_q = _as_float64(log_r, "log_r"), _as_float64(log_q, "log_q")
    if log_r.shape != log_q.shape:
        raise ValueError(f"log_r and log_q must have the same shape, got {tuple(log_r.shape)} "
                         f"and {tuple(log_q.shape)}")
    if log_r.dim() not in (1, 2):
        raise ValueError(f"log_r and log_q must be [P, K] or [K], got shape {tuple(log_r.shape)}")
    if log_r.dim() == 1:
        log_r, log_q = log_r[None], log_q[None]
    if log_r.shape[0] < 1 or log_r.shape[1] < 1:
        raise ValueError(f"need at least one prompt and one sample, got shape {tuple(log_r.shape)}")
    for name, x in (("log_r", log_r), ("log_q", log_q)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} has non-finite values ({int(torch.isnan(x).sum())} NaN, "
                             f"{int(torch.isinf(x).sum())} inf): every sample needs a finite "
                             "log-reward and log-probability")
    return log_r, log_q


def _ess_fraction(log_w: Tensor) -> Tensor:
    """``(sum w)^2 / (K sum w^2)`` along the last dim of ``log_w`` ``[..., K]`` (log space inside)."""
    K = log_w.shape[-1]
    return torch.exp(2.0 * torch.logsumexp(log_w, -1) - math.log(K) - torch.logsumexp(2.0 * log_w, -1))


def sampler_diagnostics(log_r, log_q, iw_k: int | None = None) -> dict[str, float]:
    """Sample estimates of how far ``q`` is from ``p ∝ R``, averaged over prompts.

    ``log_r`` : ``[P, K]`` (or ``[K]``, read as ``P = 1``), log space
        ``log R(X_i, Z_ij)`` for ``K`` samples ``Z_ij ~ q(. | X_i)`` of each of ``P`` prompts.
    ``log_q`` : same shape, log space
        ``log q(Z_ij | X_i)`` of the same samples.
    ``iw_k`` : int in ``[1, K]`` (default ``K``)
        group size of the importance-weighted bound.

    With ``log_w = log_r - log_q``, each figure is computed per prompt over its ``K``
    samples, then averaged (mean over ``P``):

    * ``elbo``: ``mean log_w``, an unbiased estimate of ``E_q[log R - log q] <= log Z``;
    * ``elbo_se``: the standard error of ``elbo`` from the sampling of ``Z`` on these prompts
      (:func:`elbo_standard_error`; ``nan`` when ``K = 1``); compare two samplers with
      :func:`elbo_difference`;
    * ``log_z_is``: ``log mean exp(log_w)``, the importance-sampling estimate of ``log Z``
      (a lower bound on ``log Z`` in expectation, by Jensen);
    * ``iw_bound``: the IWAE bound with ``iw_k`` samples: the ``K`` samples are split into
      ``floor(K / iw_k)`` disjoint consecutive groups of ``iw_k`` (the last ``K mod iw_k``
      samples are left out), ``log mean exp(log_w)`` is taken within each group and the
      groups are averaged. ``iw_k = 1`` gives ``elbo``, ``iw_k = K`` gives ``log_z_is``;
    * ``ess``: the effective-sample-size fraction ``(sum w)^2 / (K sum w^2)`` of the
      weights ``w = R / q``, in ``(0, 1]``, ``1`` at the optimum;
    * ``log_w_var``: the unbiased variance (divisor ``K - 1``; ``0`` when ``K = 1``) of
      ``log_w``, ``0`` at the optimum; ``log_w_std`` the mean over prompts of its square root;
    * ``target_mean_log_r``: the self-normalised importance estimate of the target's own mean
      log-reward ``E_p[log R]``, ``sum_j w_j log_r_j / sum_j w_j``. Consistent as ``K -> inf`` but
      biased at small ``ESS``: it can only weigh the samples ``q`` drew, so where ``q`` misses
      high-reward regions of ``p`` it falls short of ``E_p[log R]``. At the optimum it is the plain
      mean of ``log_r``;
    * ``n_samples`` = ``K`` and ``n_prompts`` = ``P``.

    Raises :class:`ValueError` on shape mismatch, empty input, non-finite values (a sample
    of ``q`` has finite ``log q``; a reward of zero has no place in these estimates) and an
    ``iw_k`` that is not an integer in ``[1, K]``.
    """
    log_r, log_q = _sample_inputs(log_r, log_q)
    P, K = log_r.shape
    k = _check_iw_k(iw_k, K)
    log_w = log_r - log_q  # [P, K]
    groups = log_w[:, : (K // k) * k].reshape(P, K // k, k)  # [P, G, k]
    var = log_w.var(dim=1, correction=1) if K > 1 else torch.zeros(P, dtype=log_w.dtype)
    out = {
        "elbo": log_w.mean(1).mean().item(),
        "log_z_is": _log_mean_exp(log_w).mean().item(),
        "iw_bound": _log_mean_exp(groups).mean(1).mean().item(),
        "ess": _ess_fraction(log_w).mean().item(),
        "log_w_var": var.mean().item(),
        "log_w_std": var.sqrt().mean().item(),
        "target_mean_log_r": _snis_mean(log_w, log_r)[0].mean().item(),
        "n_samples": K,
        "n_prompts": P,
    }
    out["elbo_se"] = elbo_standard_error(out)
    return out


def _snis_mean(log_w: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """Per prompt, the self-normalised importance estimate ``sum_j w_j f_j / sum_j w_j`` of ``E_p[f]``
    and its delta-method variance ``sum_j wn_j^2 (f_j - mean)^2`` (``wn`` the normalised weights).
    ``log_w``, ``f``: ``[P, K]``; returns two ``[P]`` tensors."""
    wn = torch.softmax(log_w, 1)  # [P, K], each row sums to 1
    mean = (wn * f).sum(1)
    return mean, (wn ** 2 * (f - mean[:, None]) ** 2).sum(1)


def target_means(log_r, log_q, values: dict) -> dict[str, dict[str, float]]:
    """What a sampler that matched the target would score on per-sample statistics, estimated from
    ``q``'s samples: for each ``values[name]`` (``[P, K]``, or ``[K]``, a figure of each sample such as
    its length or its BLEU score against a reference), averaged over the ``P`` prompts:

    * ``sampler``: the plain mean, an estimate of ``E_q[f]`` (what ``q`` itself scores);
    * ``target``: the self-normalised importance estimate of ``E_p[f]``, ``p ∝ R``, with weights
      ``w = R / q`` normalised within each prompt (as ``target_mean_log_r`` of
      :func:`sampler_diagnostics`, which is this estimate for ``f = log R``);
    * ``target_se``: its delta-method standard error, ``sqrt(sum_p sum_j wn_pj^2 (f_pj - mean_p)^2) / P``.
      It only measures the spread of the samples ``q`` drew: at a small ESS, where ``q`` misses
      regions of ``p``, the estimate is biased towards ``q``'s own mean and the error understates it.
      Estimates from different proposals that disagree by more than their errors show this.

    With samples from ``m`` proposals (``k`` each per prompt, concatenated along the sample axis), pass
    as ``log_q`` each sample's log density under their equal mixture, ``logsumexp_j log q_j - log m``
    (multiple importance sampling with the balance heuristic): a sample one proposal rarely draws but
    another often draws is then weighed by both.

    ``log_r``, ``log_q``: as :func:`sampler_diagnostics` (log space). Raises :class:`ValueError` on
    shapes that differ or values that are not finite."""
    log_r, log_q = _sample_inputs(log_r, log_q)
    P = log_r.shape[0]
    log_w = log_r - log_q
    out = {}
    for name, v in values.items():
        f = _as_float64(v, str(name))
        f = f[None] if f.dim() == 1 else f
        if f.shape != log_w.shape:
            raise ValueError(f"values[{name!r}] must have the samples' shape {tuple(log_w.shape)}, got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError(f"values[{name!r}] has non-finite values: every sample needs a finite figure")
        mean, var = _snis_mean(log_w, f)
        out[name] = {"sampler": f.mean(1).mean().item(), "target": mean.mean().item(),
                     "target_se": var.sum().sqrt().item() / P}
    return out


def elbo_standard_error(diag: dict) -> float:
    """The standard error of ``diag["elbo"]`` from the sampling of ``Z`` on its fixed prompts:
    ``sqrt(log_w_var / (K P))``, with ``log_w_var`` the mean over the ``P`` prompts of each prompt's
    unbiased variance of ``log_w`` over its ``K`` samples (``nan`` when ``K = 1``). Reads only the
    fields of a :func:`sampler_diagnostics` dict, so it also serves results saved before
    ``elbo_se`` was one of them."""
    K, P = diag["n_samples"], diag["n_prompts"]
    return math.sqrt(diag["log_w_var"] / (K * P)) if K > 1 else float("nan")


def elbo_difference(a: dict, b: dict) -> tuple[float, float]:
    """``(elbo_a - elbo_b, its standard error)`` for two :func:`sampler_diagnostics` dicts computed
    from independent samples on the same prompts: the prompts' own spread cancels, and the error
    is ``sqrt(se_a^2 + se_b^2)``. A difference within about two standard errors is not shown to be
    one."""
    return a["elbo"] - b["elbo"], math.hypot(elbo_standard_error(a), elbo_standard_error(b))


def elbo_text(diag: dict, digits: int = 2) -> str:
    """``"<elbo> ± <standard error>"`` for a table cell (the error left out when ``K = 1``)."""
    se = elbo_standard_error(diag)
    return f"{diag['elbo']:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


# ----------------------------------------------------------------------------
# exact, on an enumerable outcome space
# ----------------------------------------------------------------------------


def _exact_inputs(log_r, log_q) -> tuple[Tensor, Tensor]:
    """Validate and return ``(log_r, log_q)`` as float64 ``[M]``."""
    log_r, log_q = _as_float64(log_r, "log_r"), _as_float64(log_q, "log_q")
    if log_r.dim() != 1 or log_r.shape != log_q.shape:
        raise ValueError(f"log_r and log_q must both be [M], got shapes {tuple(log_r.shape)} "
                         f"and {tuple(log_q.shape)}")
    for name, x in (("log_r", log_r), ("log_q", log_q)):
        if torch.isnan(x).any() or (x == float("inf")).any():
            raise ValueError(f"{name} has NaN or +inf values (-inf, a zero, is allowed)")
    if not (log_r > NEG_INF).any():
        raise ValueError("log_r is -inf on every outcome: the target is undefined (Z = 0)")
    if not (log_q > NEG_INF).any():
        raise ValueError("log_q is -inf on every outcome: q puts no mass on the enumerated set")
    return log_r, log_q


def _weighted_sum(weight: Tensor, value: Tensor, mask: Tensor) -> Tensor:
    """``sum weight * value`` over ``mask`` (entries outside ``mask`` never touch the sum)."""
    return torch.where(mask, weight * value, torch.zeros_like(value)).sum()


def exact_diagnostics(log_r, log_q) -> dict[str, float]:
    """Exact figures of ``q`` against ``p = softmax(log_r)`` on an enumerated outcome space.

    ``log_r`` : ``[M]``, log space
        ``log R`` of every outcome (``-inf`` for a zero reward).
    ``log_q`` : ``[M]``, log space
        ``log q`` of every outcome (``-inf`` for ``q = 0``). ``q`` may sum to less than one if
        the policy puts mass outside the ``M`` outcomes (e.g. on invalid strings).

    Write ``m = sum q`` (the mass on the set) and ``q~ = q / m`` (the policy conditioned on
    the set). Returns

    * ``log_z``: ``logsumexp(log_r)``;
    * ``q_mass_outside``: ``1 - m``, clamped at ``0``;
    * ``elbo``: ``sum q (log_r - log q)`` over the outcomes with ``q > 0``. When ``m = 1``
      this is the ELBO ``E_q[log R - log q] = log Z - KL(q || p) <= log Z``, with equality
      iff ``q = p``. When ``m < 1`` it is the enumerated part of the ELBO only (the outcomes
      outside add terms whose rewards are unknown here), and
      ``elbo = m (log Z - kl_q_p) - m log m``;
    * ``kl_q_p``: ``KL(q~ || p)`` (``inf`` if ``q > 0`` where ``R = 0``);
    * ``kl_p_q``: ``KL(p || q~)`` (``inf`` if ``R > 0`` where ``q = 0``);
    * ``tv``: ``0.5 sum |p - q| + 0.5 q_mass_outside``, the total variation between ``p`` and
      ``q`` with the outside mass as one more outcome (of target probability ``0``);
    * ``log_w_var``: ``Var_{q~}(log_r - log q)`` (``inf`` if ``q > 0`` where ``R = 0``);
      ``log_w_std`` its square root;
    * ``ess``: the ESS fraction ``(E_{q~}[w])^2 / E_{q~}[w^2]`` of ``w = R / q~``, the limit
      of :func:`sampler_diagnostics`'s ``ess`` as ``K -> inf``;
    * ``target_mean_log_r``: ``E_p[log R] = sum p log_r`` over the outcomes with ``R > 0``, the
      limit of :func:`sampler_diagnostics`'s estimate when ``q > 0`` wherever ``p > 0``.

    ``kl_q_p``, ``kl_p_q``, ``log_w_var`` and ``ess`` describe the shape of ``q`` on the set
    (they do not change when ``q`` is scaled); the outside mass shows in
    ``q_mass_outside``, ``tv`` and ``elbo``. Raises :class:`ValueError` on shape mismatch,
    NaN or ``+inf``, or when ``R`` or ``q`` is zero on every outcome.
    """
    log_r, log_q = _exact_inputs(log_r, log_q)
    on_q, on_p = log_q > NEG_INF, log_r > NEG_INF  # [M] supports
    log_z = torch.logsumexp(log_r, 0)
    log_p = log_r - log_z
    log_qt = log_q - torch.logsumexp(log_q, 0)  # log q~
    q, p, qt = log_q.exp(), log_p.exp(), log_qt.exp()
    log_w = log_r - log_q  # finite or -inf on on_q
    w_finite = bool(torch.isfinite(log_w[on_q]).all())
    if w_finite:
        mean = _weighted_sum(qt, log_w, on_q)
        var = _weighted_sum(qt, (log_w - mean) ** 2, on_q).clamp(min=0.0)
    else:
        var = torch.tensor(float("inf"), dtype=torch.float64)
    log_ew = torch.logsumexp(log_r[on_q], 0)  # log E_q~[w]
    log_ew2 = torch.logsumexp((2.0 * log_r - log_qt)[on_q], 0)  # log E_q~[w^2]
    outside = max(1.0 - q.sum().item(), 0.0)
    return {
        "log_z": log_z.item(),
        "q_mass_outside": outside,
        "elbo": _weighted_sum(q, log_w, on_q).item(),
        "kl_q_p": _weighted_sum(qt, log_qt - log_p, on_q).item(),
        "kl_p_q": _weighted_sum(p, log_p - log_qt, on_p).item(),
        "tv": 0.5 * (p - q).abs().sum().item() + 0.5 * outside,
        "log_w_var": var.item(),
        "log_w_std": var.sqrt().item(),
        "ess": torch.exp(2.0 * log_ew - log_ew2).item() if log_ew > NEG_INF else 0.0,
        "target_mean_log_r": _weighted_sum(p, log_r, on_p).item(),
    }
