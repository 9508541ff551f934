r"""GFlowNet training objectives for autoregressive language-model policies.

Every function here is a pure function of tensors: no model, no module state.
The setting is that of Hu et al. (2024), *Amortizing intractable inference in
large language models*: an episode appends tokens ``z_1 .. z_n`` to a prompt and
then takes the stop action ``⊤``. Every prefix ``z_1:t`` may (in principle) be
terminated, so every prefix has a reward.

Conventions
-----------
All values named ``log_*`` are natural-log quantities. ``B`` is the batch size
(number of trajectories) and ``N`` the padded number of generated tokens.

``log_pf`` : ``[B, N]`` float, log space
    ``log q(z_t | z_<t)`` for ``t = 1..N`` (column ``t - 1``).
``log_pterm`` : ``[B, N + 1]`` float, log space
    ``log q(⊤ | z_1:t)`` for ``t = 0..N`` (column ``t``). ``-inf`` marks a prefix
    at which stopping is impossible (e.g. below a minimum length).
``log_r`` : ``[B, N + 1]`` float, log space
    ``log R(z_1:t ⊤)`` for every prefix ``t = 0..N``, *already tempered* (see
    :func:`tempered`). The trajectory-level losses (TB, VarGrad) also accept the
    terminal reward alone, ``[B]``.
``lengths`` : ``[B]`` integer
    ``n_b`` in ``[0, N]``; ``0`` is the empty trajectory (stop immediately).

Padding (``log_pf`` columns ``>= n_b``, ``log_pterm``/``log_r`` columns ``> n_b``)
and ``log_r`` where stopping is impossible are never read arithmetically: they
are removed with ``torch.where`` (not by multiplying with a mask), so ``±inf``
or huge garbage there can put neither NaN nor inf in a loss or its gradient;
those entries get an exact zero gradient. NaN in padding is also harmless.
The values that *are* used must be finite.

Computation happens in the promoted floating dtype of the inputs, at least
``float32`` (bf16/fp16 inputs are upcast); results have that dtype.

Potentials
----------
Write ``C_t = sum_{k<=t} log_pf[:, k-1]`` (``C_0 = 0``, log space) and define
the potential of prefix ``t``

    ``F_t = log R(z_1:t ⊤) - C_t - log q(⊤ | z_1:t)``.

For a perfectly trained policy ``log R(z_1:t ⊤) - log q(⊤|z_1:t) = log F(z_1:t)``
(the state flow) and ``F(z_1:t) = Z * exp(C_t)``, so every ``F_t`` equals
``log Z``. Position ``t`` of row ``b`` is *valid* when ``t <= n_b`` and
``log_pterm[b, t]`` is finite. The modified sub-trajectory balance residual of a
pair ``i < j`` is

    ``delta(i, j) = log R(z_1:i ⊤) + sum_{k=i+1..j} log q(z_k|z_<k)
    + log q(⊤|z_1:j) - log R(z_1:j ⊤) - log q(⊤|z_1:i) = F_i - F_j``.

Normalisation of each loss
--------------------------
Every loss takes ``reduction``: ``"none"`` returns the per-trajectory values
``[B]``; ``"mean"`` returns a scalar, the mean of those values over the
*contributing* rows defined below (rows that do not contribute have per-row
value exactly ``0``). If no row contributes, ``"mean"`` returns a zero that is
still attached to the autograd graph of the inputs.

* :func:`modified_subtb_loss` (alias ``"subtb"``): per row, the
  ``lamda``-weighted **mean** of ``delta(i, j)**2`` over valid pairs ``i < j``,
  weights ``w(i, j) = lamda ** (j - i - 1)`` (so adjacent positions weigh 1),
  i.e. ``sum w * delta**2 / sum w``. For ``lamda == 1`` this is the plain mean
  over the ``m (m - 1) / 2`` pairs of the ``m`` valid positions, which equals
  ``2 / (m - 1) * sum_t (F_t - mean F)**2`` (twice the unbiased sample
  variance of the valid potentials) and is computed in O(N) that way.
  Contributing rows: those with at least one valid pair (of nonzero weight,
  relevant only for ``lamda == 0``). If ``log_z`` is given, rows whose position
  0 is not valid get position 0 back with ``F_0 := log_z[b]``.
* :func:`modified_db_loss`: per row, the **mean** of ``(F_t - F_{t+1})**2``
  over transitions ``t -> t+1`` (``0 <= t < n_b``) whose both ends are valid;
  contributing rows: those with at least one such transition. It equals
  :func:`modified_subtb_loss` with ``lamda = 0``.
* :func:`trajectory_balance_loss`: per row, ``(log Z + log q(τ) - log R(τ))**2``
  with ``log q(τ) = sum_{t<n_b} log_pf + log_pterm[n_b]``; every row
  contributes, so ``"mean"`` is the mean over ``B``.
* :func:`vargrad_loss`: per row, ``(log q(τ_b) + logZ_hat_g - log R(τ_b))**2``
  where ``logZ_hat_g`` is the mean of ``log R - log q`` over the row's group
  (not detached; detaching would not change the gradient of the group sum).
  Averaged over a group of size ``k`` this is the **biased (population)
  variance, divisor ``k``**, of the log-ratio ``log R - log q`` in the group
  (i.e. ``(k - 1) / k`` times the unbiased sample variance). Contributing rows:
  those in groups of size ``>= 2``; ``"mean"`` averages over those rows, so a
  group weighs in proportion to its size.

All losses are squared residuals in log space (units: nats squared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "LOSSES",
    "LossSpec",
    "modified_db_loss",
    "modified_subtb_loss",
    "subtb_loss",
    "tempered",
    "trajectory_balance_loss",
    "vargrad_loss",
]

_REDUCTIONS = ("mean", "none")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def tempered(log_r: Tensor, temperature: float) -> Tensor:
    """Temper a log reward: returns ``log_r / temperature`` (log space, same shape).

    ``R ** (1 / temperature)`` in linear space. ``temperature`` must be a finite
    number ``> 0``; anything else raises :class:`ValueError`.
    """
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}") from None
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return log_r / t


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _float_dtype(*tensors: Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_common(log_pf: Tensor, log_pterm: Tensor, lengths: Tensor) -> tuple[int, int]:
    """Validate shapes of the common inputs; return ``(B, N)``."""
    if log_pf.dim() != 2:
        raise ValueError(f"log_pf must be [B, N], got shape {tuple(log_pf.shape)}")
    B, N = log_pf.shape
    if tuple(log_pterm.shape) != (B, N + 1):
        raise ValueError(
            f"log_pterm must be [B, N + 1] = {(B, N + 1)}, got shape {tuple(log_pterm.shape)}"
        )
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be [B] = ({B},), got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if B > 0 and (int(lengths.min()) < 0 or int(lengths.max()) > N):
        raise ValueError(f"lengths must lie in [0, N] = [0, {N}]")
    return B, N


def _check_prefix_log_r(log_r: Tensor, B: int, N: int) -> None:
    if tuple(log_r.shape) != (B, N + 1):
        raise ValueError(
            f"log_r must be [B, N + 1] = {(B, N + 1)} (one reward per prefix), "
            f"got shape {tuple(log_r.shape)}"
        )


def _as_batch_vector(x: Tensor, B: int, name: str) -> Tensor:
    """Accept a scalar, ``[1]``, ``[B]`` or ``[B, 1]`` tensor and return ``[B]``."""
    if x.numel() == 1:
        return x.reshape(1).expand(B)
    if x.numel() == B and (x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1)):
        return x.reshape(B)
    raise ValueError(f"{name} must be a scalar or [B] = ({B},), got shape {tuple(x.shape)}")


def _token_mask(lengths: Tensor, N: int) -> Tensor:
    """``[B, N]`` bool: column ``k`` holds a real token (``k < n_b``)."""
    return torch.arange(N, device=lengths.device)[None, :] < lengths[:, None]


def _prefix_mask(lengths: Tensor, N: int) -> Tensor:
    """``[B, N + 1]`` bool: prefix ``t`` exists (``t <= n_b``)."""
    return torch.arange(N + 1, device=lengths.device)[None, :] <= lengths[:, None]


def _reduce(per_row: Tensor, contributes: Tensor, reduction: str) -> Tensor:
    """Mean of ``per_row`` over contributing rows (per_row is 0 elsewhere)."""
    if reduction == "none":
        return per_row
    count = contributes.sum().clamp(min=1).to(per_row.dtype)
    # per_row is finite and 0 on non-contributing rows, so when nothing
    # contributes this is an exact 0 that is still attached to the graph.
    return per_row.sum() / count


def _stoppable(log_pterm: Tensor, lengths: Tensor) -> Tensor:
    """``[B, N + 1]`` bool: prefix ``t`` exists (``t <= n_b``) and may stop (finite ``log_pterm``)."""
    lengths = lengths.to(device=log_pterm.device, dtype=torch.long)
    return _prefix_mask(lengths, log_pterm.shape[1] - 1) & torch.isfinite(log_pterm)


def _transitions(valid: Tensor) -> Tensor:
    """``[B, N]`` bool: positions ``t`` and ``t + 1`` both valid (a transition ``t -> t+1``)."""
    return valid[:, :-1] & valid[:, 1:]


def _groups(group: Tensor | None, B: int, device) -> tuple[Tensor, Tensor]:
    """``(inv [B], counts [G])``: each row's group index in ``0..G-1`` and the size of each group
    (``group`` None: one group)."""
    if group is None:
        inv = torch.zeros(B, dtype=torch.long, device=device)
    else:
        if tuple(group.shape) != (B,):
            raise ValueError(f"group must be [B] = ({B},), got shape {tuple(group.shape)}")
        _, inv = torch.unique(group.to(device), return_inverse=True)
    return inv, torch.bincount(inv, minlength=int(inv.max()) + 1 if B > 0 else 0)


def _potentials(
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    lengths: Tensor,
    log_z: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Potentials ``F_t`` and validity mask.

    Returns ``(F, valid)``, both ``[B, N + 1]``: ``F[b, t] = log_r - C_t -
    log_pterm`` (log space) where ``valid[b, t]``, exactly 0 elsewhere. With
    ``log_z`` ([B], log space), rows whose position 0 is invalid get
    ``F[b, 0] = log_z[b]`` and ``valid[b, 0] = True``.
    """
    B, N = log_pf.shape
    dtype = _float_dtype(log_pf, log_pterm, log_r, log_z)
    lengths = lengths.to(device=log_pf.device, dtype=torch.long)
    tok = _token_mask(lengths, N)
    zero = torch.zeros((), dtype=dtype, device=log_pf.device)
    pf = torch.where(tok, log_pf.to(dtype), zero)
    cum = torch.cat([torch.zeros(B, 1, dtype=dtype, device=pf.device), pf.cumsum(dim=1)], dim=1)
    pterm = log_pterm.to(dtype)
    valid = _stoppable(log_pterm, lengths)
    raw = log_r.to(dtype) - cum - pterm
    F = torch.where(valid, raw, zero)
    if log_z is not None:
        lz = _as_batch_vector(log_z, B, "log_z").to(dtype)
        anchor = ~valid[:, 0]
        F0 = torch.where(anchor, lz, F[:, 0])
        F = torch.cat([F0[:, None], F[:, 1:]], dim=1)
        valid = valid.clone()
        valid[:, 0] = True
    return F, valid


def _subtb_closed_form(F: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``lamda == 1``: mean over valid pairs of ``(F_i - F_j)**2`` in O(N).

    Uses ``sum_{i<j} (F_i - F_j)**2 = m * sum_t (F_t - mean F)**2`` with ``m``
    valid positions, divided by the ``m (m - 1) / 2`` pairs; centring first
    avoids the cancellation of ``m * sum F**2 - (sum F)**2``.
    Returns ``(per_row [B], has_pair [B] bool)``.
    """
    zero = torch.zeros((), dtype=F.dtype, device=F.device)
    m = valid.sum(dim=1)
    has_pair = m >= 2
    mf = m.to(F.dtype)
    mean = torch.where(valid, F, zero).sum(dim=1) / mf.clamp(min=1)
    dev = torch.where(valid, F - mean[:, None], zero)
    ss = dev.pow(2).sum(dim=1)
    per_row = torch.where(has_pair, 2.0 * ss / (mf - 1).clamp(min=1), zero)
    return per_row, has_pair


def _subtb_pairs(F: Tensor, valid: Tensor, lamda: float) -> tuple[Tensor, Tensor]:
    """General ``lamda``: weighted mean over a masked ``[B, N+1, N+1]`` pair matrix.

    Weights ``lamda ** (j - i - 1)`` are rescaled per row (a weighted mean is
    invariant to that) so that they neither underflow nor overflow.
    Returns ``(per_row [B], has_pair [B] bool)``.
    """
    B, P = F.shape
    zero = torch.zeros((), dtype=F.dtype, device=F.device)
    idx = torch.arange(P, device=F.device)
    gap = (idx[None, :] - idx[:, None] - 1).to(F.dtype)  # [i, j] -> j - i - 1
    upper = idx[:, None] < idx[None, :]
    pair = upper[None] & valid[:, :, None] & valid[:, None, :]  # [B, i, j]
    if lamda == 0.0:
        w = torch.where(pair & (gap == 0)[None], torch.ones((), dtype=F.dtype, device=F.device), zero)
    else:
        neg_inf = torch.full((), -math.inf, dtype=F.dtype, device=F.device)
        log_w = torch.where(pair, (gap * math.log(lamda))[None], neg_inf)
        row_max = log_w.flatten(1).amax(dim=1)
        row_max = torch.where(torch.isfinite(row_max), row_max, zero)
        w = torch.where(pair, torch.exp(log_w - row_max[:, None, None]), zero)
    delta = torch.where(pair, F[:, :, None] - F[:, None, :], zero)
    num = (w * delta.pow(2)).flatten(1).sum(dim=1)
    den = w.flatten(1).sum(dim=1)
    has_pair = den > 0
    per_row = torch.where(has_pair, num / torch.where(has_pair, den, torch.ones_like(den)), zero)
    return per_row, has_pair


# ----------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------


def modified_subtb_loss(
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    lengths: Tensor,
    lamda: float = 1.0,
    log_z: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Modified sub-trajectory balance, every prefix may stop (Hu et al. 2024, eq. 5).

    Args:
        log_pf: ``[B, N]`` log space, ``log q(z_t | z_<t)`` (column ``t - 1``).
        log_pterm: ``[B, N + 1]`` log space, ``log q(⊤ | z_1:t)``; ``-inf`` =
            stopping impossible at that prefix (the position is then skipped).
        log_r: ``[B, N + 1]`` log space, tempered ``log R(z_1:t ⊤)`` per prefix.
        lengths: ``[B]`` integer ``n_b`` in ``[0, N]``.
        lamda: ``>= 0``; pair ``(i, j)`` weighs ``lamda ** (j - i - 1)``.
            ``1`` uses an O(N) closed form, anything else an O(N^2) pair matrix.
        log_z: optional ``[B]`` (or scalar) log partition, log space. For rows
            whose position 0 is not valid it becomes valid with ``F_0 = log_z``
            (``log F(s_0) = log Z``), which puts the first tokens (before the
            first valid stop) into residuals. Unused for rows where stopping at
            the empty sequence is possible.
        reduction: ``"mean"`` (scalar: mean over rows with >= 1 valid pair) or
            ``"none"`` (``[B]``; rows without a pair are 0).

    Returns:
        Per row, ``sum_{i<j} w(i,j) delta(i,j)**2 / sum_{i<j} w(i,j)`` over valid
        pairs, with ``delta(i, j) = F_i - F_j`` (see the module docstring);
        squared log-space residuals.
    """
    _check_reduction(reduction)
    B, N = _check_common(log_pf, log_pterm, lengths)
    _check_prefix_log_r(log_r, B, N)
    lamda = float(lamda)
    if not (math.isfinite(lamda) and lamda >= 0.0):
        raise ValueError(f"lamda must be a finite number >= 0, got {lamda!r}")
    F, valid = _potentials(log_pf, log_pterm, log_r, lengths, log_z)
    if lamda == 1.0:
        per_row, has_pair = _subtb_closed_form(F, valid)
    else:
        per_row, has_pair = _subtb_pairs(F, valid, lamda)
    return _reduce(per_row, has_pair, reduction)


#: Alias: in gfnlm "SubTB" always means the modified (every-prefix-stops) variant.
subtb_loss = modified_subtb_loss


def modified_db_loss(
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    lengths: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Modified detailed balance (Deleu et al. 2022), every prefix may stop.

    Args:
        log_pf: ``[B, N]`` log space, ``log q(z_t | z_<t)``.
        log_pterm: ``[B, N + 1]`` log space, ``log q(⊤ | z_1:t)``; ``-inf`` =
            stopping impossible.
        log_r: ``[B, N + 1]`` log space, tempered per-prefix log rewards.
        lengths: ``[B]`` integer ``n_b`` in ``[0, N]``.
        reduction: ``"mean"`` (scalar: mean over rows with >= 1 transition) or
            ``"none"`` (``[B]``; rows without a transition are 0).

    Returns:
        Per row, the mean over transitions ``t -> t+1`` (``0 <= t < n_b``, both
        ends valid) of ``(F_t - F_{t+1})**2`` =
        ``(log R_t + log q(z_{t+1}|z_1:t) + log q(⊤|z_1:t+1) - log R_{t+1}
        - log q(⊤|z_1:t))**2``.
    """
    _check_reduction(reduction)
    B, N = _check_common(log_pf, log_pterm, lengths)
    _check_prefix_log_r(log_r, B, N)
    F, valid = _potentials(log_pf, log_pterm, log_r, lengths)
    zero = torch.zeros((), dtype=F.dtype, device=F.device)
    trans = _transitions(valid)  # [B, N]
    res = torch.where(trans, F[:, :-1] - F[:, 1:], zero)
    count = trans.sum(dim=1)
    has = count > 0
    per_row = torch.where(has, res.pow(2).sum(dim=1) / count.clamp(min=1).to(F.dtype), zero)
    return _reduce(per_row, has, reduction)


def _log_q_trajectory(log_pf: Tensor, log_pterm: Tensor, lengths: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B]`` log space: ``sum_{t<n_b} log_pf + log_pterm[n_b]``."""
    N = log_pf.shape[1]
    lengths = lengths.to(device=log_pf.device, dtype=torch.long)
    zero = torch.zeros((), dtype=dtype, device=log_pf.device)
    pf_sum = torch.where(_token_mask(lengths, N), log_pf.to(dtype), zero).sum(dim=1)
    stop = log_pterm.to(dtype).gather(1, lengths[:, None]).squeeze(1)
    return pf_sum + stop


def _terminal_log_r(log_r: Tensor, lengths: Tensor, B: int, N: int, dtype: torch.dtype) -> Tensor:
    """``[B]`` log space: ``log_r`` itself if ``[B]``, else gathered at ``n_b``."""
    if log_r.dim() == 1 and log_r.shape[0] == B:
        return log_r.to(dtype)
    if tuple(log_r.shape) == (B, N + 1):
        idx = lengths.to(device=log_r.device, dtype=torch.long)[:, None]
        return log_r.to(dtype).gather(1, idx).squeeze(1)
    raise ValueError(
        f"log_r must be [B] = ({B},) (terminal) or [B, N + 1] = {(B, N + 1)} (per prefix), "
        f"got shape {tuple(log_r.shape)}"
    )


def trajectory_balance_loss(
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    lengths: Tensor,
    log_z: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Trajectory balance (Malkin et al. 2022) with a learned ``log Z``.

    Args:
        log_pf: ``[B, N]`` log space, ``log q(z_t | z_<t)``.
        log_pterm: ``[B, N + 1]`` log space; only ``log q(⊤ | z_1:n_b)`` at the
            actual stop is used, and it must be finite.
        log_r: tempered log reward, log space: ``[B]`` (terminal) or
            ``[B, N + 1]`` (per prefix; column ``n_b`` is used).
        lengths: ``[B]`` integer ``n_b`` in ``[0, N]``.
        log_z: ``[B]`` (or scalar) learned log partition, log space.
        reduction: ``"mean"`` (scalar: mean over all ``B`` rows) or ``"none"``.

    Returns:
        Per row ``(log_z + sum_{t<n_b} log_pf + log_pterm[n_b] - log_r_n_b)**2``.
    """
    _check_reduction(reduction)
    B, N = _check_common(log_pf, log_pterm, lengths)
    dtype = _float_dtype(log_pf, log_pterm, log_r, log_z)
    lz = _as_batch_vector(log_z, B, "log_z").to(dtype)
    log_q = _log_q_trajectory(log_pf, log_pterm, lengths, dtype)
    lr = _terminal_log_r(log_r, lengths, B, N, dtype)
    per_row = (lz + log_q - lr).pow(2)
    return _reduce(per_row, torch.ones(B, dtype=torch.bool, device=per_row.device), reduction)


def vargrad_loss(
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    lengths: Tensor,
    group: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """VarGrad / log-partition-variance loss (Richter et al. 2020; Zhang et al. 2023).

    ``log Z`` is estimated per group as ``logZ_hat_g = mean_{b in g}
    (log R(τ_b) - log q(τ_b))`` (log space, not detached).

    Args:
        log_pf: ``[B, N]`` log space, ``log q(z_t | z_<t)``.
        log_pterm: ``[B, N + 1]`` log space; only the finite ``log q(⊤|z_1:n_b)``
            at the actual stop is used.
        log_r: tempered log reward, ``[B]`` (terminal) or ``[B, N + 1]``.
        lengths: ``[B]`` integer ``n_b`` in ``[0, N]``.
        group: optional ``[B]`` integer group ids (e.g. the prompt index of
            each sample); ``None`` puts all rows into one group.
        reduction: ``"mean"`` (scalar: mean over rows in groups of size >= 2)
            or ``"none"`` (``[B]``; rows of singleton groups are 0).

    Returns:
        Per row ``(log q(τ_b) + logZ_hat_g - log R(τ_b))**2``. The mean of this
        over a group of size ``k`` is the population variance (divisor ``k``,
        i.e. ``(k - 1) / k`` times the unbiased variance) of ``log R - log q``.
    """
    _check_reduction(reduction)
    B, N = _check_common(log_pf, log_pterm, lengths)
    dtype = _float_dtype(log_pf, log_pterm, log_r)
    log_q = _log_q_trajectory(log_pf, log_pterm, lengths, dtype)
    lr = _terminal_log_r(log_r, lengths, B, N, dtype)
    ratio = lr - log_q  # [B] log space: per-sample estimate of log Z
    zero = torch.zeros((), dtype=dtype, device=ratio.device)
    inv, counts = _groups(group, B, ratio.device)
    sums = torch.zeros(len(counts), dtype=dtype, device=ratio.device).index_add(0, inv, ratio)
    log_z_hat = sums / counts.clamp(min=1).to(dtype)
    in_group = counts[inv] >= 2
    per_row = torch.where(in_group, (log_z_hat[inv] - ratio).pow(2), zero)
    return _reduce(per_row, in_group, reduction)


def stepwise_kl(target_logp: Tensor, policy_logp: Tensor, lengths: Tensor) -> Tensor:
    """Sum over the visited states of KL(p(. | s_t) || q(. | s_t)), per episode: the soft-label
    distillation loss of a teacher sampler p into the policy q.

    Args:
        target_logp: [B, N+1, A] the teacher's log-probabilities of the A actions at every prefix
            t = 0..N (each row normalised; -inf where the teacher gives no mass). No gradient is
            taken through it.
        policy_logp: [B, N+1, A] the policy's, on the same actions (-inf where it gives no mass).
        lengths: [B] integer n_b: states 0..n_b were visited; the rest is padding.

    Returns:
        [B] float, nats: sum_{t <= n_b} sum_a p(a | s_t) (log p(a | s_t) - log q(a | s_t)). Actions the
        teacher gives no mass contribute 0; one it gives mass and the policy none, +inf. Along episodes
        drawn from p this is an unbiased estimate of the sequence-level KL(p(Z) || q(Z)) (the chain
        rule) with far less variance than the likelihood of the sampled actions alone.
    """
    if target_logp.shape != policy_logp.shape or target_logp.dim() != 3:
        raise ValueError(f"target_logp {tuple(target_logp.shape)} and policy_logp {tuple(policy_logp.shape)} "
                         "must both be [B, N+1, A]")
    B, T, _ = target_logp.shape
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B] = [{B}], got {tuple(lengths.shape)}")
    dtype = _float_dtype(target_logp, policy_logp)
    t_lp = target_logp.detach().to(dtype)
    p = t_lp.exp()
    diff = torch.where(p > 0, t_lp - policy_logp.to(dtype), torch.zeros((), dtype=dtype, device=p.device))
    per_state = (p * diff).sum(-1)  # [B, N+1]
    visited = torch.arange(T, device=lengths.device)[None, :] <= lengths[:, None]
    return torch.where(visited.to(per_state.device), per_state, torch.zeros_like(per_state)).sum(1)


@dataclass(frozen=True)
class LossSpec:
    """What an objective needs from the trainer.

    Attributes:
        fn: the loss function.
        prefix_rewards: needs log R of every prefix (``[B, N+1]``), not only the terminal one.
        log_z: ``"required"`` (TB), ``"anchor"`` (modified SubTB: used only where the empty
            prefix cannot stop) or ``"unused"``.
        adjacent_pairs_only: residuals only between consecutive stoppable positions (modified
            DB), so a rule that makes stoppable positions non-adjacent leaves nothing to train.
        grouped: estimates log Z per group of episodes of the same prompt (VarGrad).
    """

    fn: Callable[..., Tensor]
    prefix_rewards: bool = False
    log_z: str = "unused"
    adjacent_pairs_only: bool = False
    grouped: bool = False

    def contributing(self, log_pterm: Tensor, lengths: Tensor, *, log_z: Tensor | None = None,
                     group: Tensor | None = None, lamda: float = 1.0) -> Tensor:
        """``[B]`` bool: the episodes that give this objective at least one residual; the others add
        nothing to the loss (modified SubTB without log Z: an episode with fewer than two stoppable
        prefixes, or with ``lamda == 0`` no two consecutive ones; modified DB: no two consecutive ones;
        VarGrad: a prompt with one episode). Arguments as for :meth:`__call__` (``log_pterm``
        [B, N + 1] log space, ``lengths`` [B])."""
        B, device = log_pterm.shape[0], log_pterm.device
        if self.grouped:
            inv, counts = _groups(group, B, device)
            return counts[inv] >= 2
        if not self.prefix_rewards:
            return torch.ones(B, dtype=torch.bool, device=device)
        valid = _stoppable(log_pterm, lengths)
        if self.log_z == "anchor" and log_z is not None:
            valid[:, 0] = True  # F_0 = log Z where the empty prefix cannot stop
        if self.adjacent_pairs_only or float(lamda) == 0.0:  # only pairs of consecutive prefixes weigh
            return _transitions(valid).any(dim=1)
        return valid.sum(dim=1) >= 2

    def __call__(self, log_pf: Tensor, log_pterm: Tensor, log_r: Tensor, lengths: Tensor, *,
                 log_z: Tensor | None = None, group: Tensor | None = None, lamda: float = 1.0) -> Tensor:
        """The mean loss of a batch (see each function for the shapes; log space)."""
        if self.log_z == "required":
            return self.fn(log_pf, log_pterm, log_r, lengths, log_z)
        if self.log_z == "anchor":
            return self.fn(log_pf, log_pterm, log_r, lengths, lamda=lamda, log_z=log_z)
        if self.grouped:
            return self.fn(log_pf, log_pterm, log_r, lengths, group=group)
        return self.fn(log_pf, log_pterm, log_r, lengths)


#: Name -> objective. ``"subtb"`` is an alias of ``"modified_subtb"``.
LOSSES: dict[str, LossSpec] = {
    "modified_subtb": LossSpec(modified_subtb_loss, prefix_rewards=True, log_z="anchor"),
    "subtb": LossSpec(modified_subtb_loss, prefix_rewards=True, log_z="anchor"),
    "tb": LossSpec(trajectory_balance_loss, log_z="required"),
    "vargrad": LossSpec(vargrad_loss, grouped=True),
    "modified_db": LossSpec(modified_db_loss, prefix_rewards=True, adjacent_pairs_only=True),
}
