"""Benchmark of one GFlowNet training step (modified SubTB, LM-likelihood reward, LoRA).

Three things are timed in the same run, on the same shapes (B samples of N tokens continuing
one prompt), interleaved repetition by repetition so that machine noise hits all of them alike:

* **optimised**: the gfnlm engine, as :class:`gfnlm.trainer.GFNTrainer` runs it —
  ``gfnlm.sampling.sample`` (no grad, KV cache, prompt encoded once), ``LMLikelihoodReward``
  (one forward of the base model, adapters off), ``gfnlm.scoring.score`` (one teacher-forced
  pass with grad), ``gfnlm.losses.modified_subtb_loss``, backward, clip + AdamW step.
* **floor**: the bare model on the same shapes — one HF ``generate`` (B x N new tokens,
  sampling, from the same prompt, LoRA model), one no-grad forward over the B x (prompt+N)
  sequences (adapters off, as the reward), one forward+backward over the same (LoRA model,
  loss = mean of the logits).  Floor total = generate + forward + forward/backward.
* **naive**: what the paper's reference code does — sampling token by token with a KV cache
  and autograd *on* (log-probs accumulated with grad, the prompt repeated in every row), the
  reward recomputed by a separate forward per prefix (t = 0..N, N+1 passes over
  [B, prompt+t]; the reference code's own ``score_fast`` does one pass, timed beside it and
  reported as context, not in the naive total), the modified SubTB loss as a Python loop over window lengths (cumsum
  trick), backward through the sampling graph, then the same optimiser step.

Every repetition restores the LoRA weights to one snapshot and re-seeds the sampler, so each
repetition samples the same episodes.  The naive and optimised losses are also compared on
the same samples (they are the same objective, so they must agree up to float rounding).

Usage::

    .venv/bin/python bench/step.py            # ~3 min on 2 quiet CPU cores
    .venv/bin/python bench/step.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# OpenMP's wait policy is left as users have it (libgomp's default: spin a while, then sleep). On a
# quiet machine OMP_WAIT_POLICY=PASSIVE made the decode loop about 2x slower (every small op wakes
# sleeping workers); on a machine shared with other busy processes spinning can be far worse (a
# forward 18x slower once), so set OMP_WAIT_POLICY=PASSIVE in the environment there.
# The compilation of the decoder's step is timed cold, as a user's first run meets it: torch.compile's
# on-disk caches go to a fresh folder (unless --warm-compile-cache or TORCHINDUCTOR_CACHE_DIR is set).
if "--warm-compile-cache" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gfnlm-bench-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without installing

from gfnlm.losses import modified_subtb_loss, tempered  # noqa: E402
from gfnlm.policy import base_model  # noqa: E402
from gfnlm.rewards import LMLikelihoodReward, RewardBatch, compute_log_rewards  # noqa: E402
from gfnlm.sampling import Constraints, cache_kwargs, output_cache, sample  # noqa: E402
from gfnlm.scoring import completion_logits, score  # noqa: E402

REF_REWARD = "reward, one pass (reference score_fast)"
SHARED_PARTS = ["shared-prompt forward (no grad)", "shared-prompt forward+backward"]
MODEL_FORWARD = "engine sampler through the model's forward (merged adapters)"
EAGER_DECODER = "engine sampler, lean decoder not compiled"
OPT_PARTS = ["sampling", "reward", "policy forward", "loss", "backward", "optimiser step"]
FLOOR_PARTS = {"sampling": "generate", "reward": "forward (no grad)", "policy forward": "forward+backward"}

SYSTEM = "You are a storyteller."
USER = "Write a long story about a dragon."


# ----------------------------------------------------------------------------------- helpers


def now() -> float:
    return time.perf_counter()


def build_prompt(tok) -> list[int]:
    """A chat-templated prompt of about 30 tokens (short system message, no default one)."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tok(SYSTEM + "\n" + USER + "\n", add_special_tokens=True)["input_ids"])


def lora_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def snapshot(params):
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params, snap):
    for p, s in zip(params, snap):
        p.copy_(s)


def optimiser_step(params, opt, max_grad_norm=1.0):
    """What GFNTrainer.training_step does after the backward: clip, step, zero_grad."""
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def backward_and_step(loss, ctx, t: dict, times: dict | None) -> None:
    """Time backward and the optimiser step into ``t``, then append every part of ``t`` to ``times``."""
    t0 = now()
    loss.backward()
    t["backward"] = now() - t0

    t0 = now()
    optimiser_step(ctx["params"], ctx["opt"])
    t["optimiser step"] = now() - t0

    if times is not None:
        for k, v in t.items():
            times.setdefault(k, []).append(v)


# --------------------------------------------------------------------------------- optimised


def optimised_step(ctx, seed, times=None, keep=False):
    """One step of the engine. Fills ``times[part]`` (seconds). Returns what the check needs."""
    model, tok, prompt, B = ctx["model"], ctx["tok"], ctx["prompt"], ctx["B"]
    cons, reward, pad, T = ctx["cons"], ctx["reward"], ctx["pad"], ctx["reward_temperature"]
    log_z = ctx["log_z"]
    t = {}
    gen = torch.Generator().manual_seed(seed)
    index = torch.zeros(B, dtype=torch.long)

    t0 = now()
    s = sample(model, [prompt], index, cons, pad_id=pad, generator=gen, compile_decoder=ctx["compile"])
    t["sampling"] = now() - t0

    t0 = now()
    completions = [tok.decode(s.tokens[b, : int(s.lengths[b])].tolist(), skip_special_tokens=False) for b in range(B)]
    batch = RewardBatch(prompts=[USER] * B, prompt_ids=[prompt], prompt_index=s.prompt_index, tokens=s.tokens,
                        lengths=s.lengths, completions=completions, tokenizer=tok)
    log_r_raw = compute_log_rewards([reward], None, batch)
    log_r = tempered(log_r_raw, T)
    t["reward"] = now() - t0

    t0 = now()
    sc = score(model, [prompt], s.prompt_index, s.tokens, s.lengths, cons, pad_id=pad)
    if not torch.isfinite(sc.log_pf).all():
        raise RuntimeError("non-finite log_pf")
    t["policy forward"] = now() - t0

    t0 = now()
    loss = modified_subtb_loss(sc.log_pf, sc.log_pterm, log_r, s.lengths, lamda=1.0,
                               log_z=None if log_z is None else log_z.expand(B))
    loss_value = float(loss.detach())
    t["loss"] = now() - t0

    backward_and_step(loss, ctx, t, times)
    out = {"loss": loss_value, "lengths": s.lengths.tolist()}
    if keep:
        out.update(samples=s, log_r_raw=log_r_raw, log_r=log_r, log_pf=sc.log_pf.detach(),
                   log_pterm=sc.log_pterm.detach())
    return out


# ------------------------------------------------------------------------------------- floor


def floor_step(ctx, times):
    model, prompt, B, N, pad = ctx["model"], ctx["prompt"], ctx["B"], ctx["N"], ctx["pad"]
    L = len(prompt)
    ids = torch.tensor(prompt, dtype=torch.long)[None].expand(B, L).contiguous()

    t0 = now()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             min_new_tokens=N, max_new_tokens=N, temperature=1.0, top_k=0, top_p=1.0,
                             pad_token_id=pad)
    times.setdefault("generate", []).append(now() - t0)
    if out.shape != (B, L + N):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(B, L + N)}")
    seqs = out.detach()

    t0 = now()
    with torch.no_grad(), base_model(model) as base:
        base(input_ids=seqs).logits
    times.setdefault("forward (no grad)", []).append(now() - t0)

    t0 = now()
    logits = model(input_ids=seqs).logits
    logits.mean().backward()
    times.setdefault("forward+backward", []).append(now() - t0)
    del logits
    ctx["opt"].zero_grad(set_to_none=True)

    # informational: the engine's sampler without the lean decoder (the model's own forward, its LoRA
    # updates folded into temporary weights), as it runs for models other than Llama
    t0 = now()
    sample(model, [prompt], torch.zeros(B, dtype=torch.long), ctx["cons"], pad_id=pad,
           generator=torch.Generator().manual_seed(0), fast_decode=False)
    times.setdefault(MODEL_FORWARD, []).append(now() - t0)
    if ctx["compile"]:  # informational: the lean decoder run eagerly (compile_decoder=False, the default)
        t0 = now()
        sample(model, [prompt], torch.zeros(B, dtype=torch.long), ctx["cons"], pad_id=pad,
               generator=torch.Generator().manual_seed(0))
        times.setdefault(EAGER_DECODER, []).append(now() - t0)

    # informational: the same two passes on the engine's token count (prompt encoded once, its
    # KV cache shared by the B rows: gfnlm.scoring.completion_logits) without the constrained
    # log-softmax, the loss or anything else of the engine
    cont = seqs[:, L:]
    index = torch.zeros(B, dtype=torch.long)
    lengths = torch.full((B,), N, dtype=torch.long)
    t0 = now()
    with torch.no_grad(), base_model(model) as base:
        completion_logits(base, [prompt], index, cont, lengths, pad)
    times.setdefault("shared-prompt forward (no grad)", []).append(now() - t0)
    t0 = now()
    logits, _ = completion_logits(model, [prompt], index, cont, lengths, pad)
    logits.mean().backward()
    times.setdefault("shared-prompt forward+backward", []).append(now() - t0)
    del logits
    ctx["opt"].zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------- naive


def naive_sample(model, prompt, B, cons, pad, generator, forced=None):
    """Reference-style sampling: token by token, KV cache, autograd ON, prompt repeated per row.

    The log-probabilities are those of the same constrained policy as gfnlm's (same
    ``Constraints``), accumulated with grad; the draws use the same recipe and generator as
    ``gfnlm.sampling.sample``, so with the same seed and weights they give the same episodes.
    ``forced`` = (tokens [B, n], lengths [B]) replays given episodes instead of drawing
    (teacher forcing inside the loop, as the reference code's ``action_seq``).
    """
    N = cons.max_new_tokens
    token_ids = torch.tensor(prompt, dtype=torch.long)[None].repeat(B, 1)
    cache, stop_mask = None, None
    alive = torch.ones(B, dtype=torch.bool)
    lengths = torch.zeros(B, dtype=torch.long)
    temp = torch.ones(B, 1)
    tokens, log_pf, log_pterm = [], [], []
    for t in range(N + 1):
        kw = cache_kwargs(model, cache) if cache is not None else {}
        out = model(input_ids=token_ids, use_cache=True, **kw)
        cache = output_cache(out)
        logits = out.logits[:, -1, :]
        logp, stop_lp = cons.log_probs(logits, torch.full((B,), t, dtype=torch.long))
        if stop_mask is None:
            stop_mask = cons.token_mask(logits.shape[-1], logits.device)[1]
        log_pterm.append(torch.where(alive, stop_lp, torch.full_like(stop_lp, float("-inf"))))
        if t == N:
            break
        if forced is None:
            with torch.no_grad():
                beh = torch.softmax(logp.detach() / temp, dim=-1)
                choice = torch.multinomial(beh, 1, generator=generator).squeeze(1)
        else:
            f_tok, f_len = forced
            col = f_tok[:, t] if t < f_tok.shape[1] else torch.full((B,), pad, dtype=torch.long)
            choice = torch.where(t < f_len, col, torch.full_like(col, cons.stop_token_ids[0]))
        stopped = stop_mask[choice] & alive
        cont = alive & ~stopped
        tokens.append(torch.where(cont, choice, torch.full_like(choice, pad)))
        log_pf.append(torch.where(cont, logp.gather(1, choice[:, None]).squeeze(1), torch.zeros_like(stop_lp)))
        lengths = lengths + cont.long()
        alive = cont
        if not alive.any():
            break
        token_ids = torch.where(alive, choice, torch.full_like(choice, pad))[:, None]
    w = int(lengths.max())  # width = longest episode, as gfnlm.sampling.sample returns
    toks = torch.stack(tokens, 1)[:, :w] if tokens else torch.zeros((B, 0), dtype=torch.long)
    pf = torch.stack(log_pf, 1)[:, :w] if log_pf else torch.zeros((B, 0))
    pterm = torch.stack(log_pterm, 1)[:, : w + 1]
    return toks, lengths, pf, pterm


@torch.no_grad()
def naive_reward(model, prompt, tokens, lengths, rcons):
    """log p_base(z_1:t ⊤ | X) for t = 0..n, one separate forward per prefix (adapters off)."""
    B, n = tokens.shape
    L = len(prompt)
    p = torch.tensor(prompt, dtype=torch.long)[None].repeat(B, 1)
    cols = []
    with base_model(model) as base:
        for t in range(n + 1):
            seq = torch.cat([p, tokens[:, :t]], dim=1)
            logits = base(input_ids=seq).logits[:, L - 1:, :]  # next-token logits after X, z_1..z_t
            lp, stop = rcons.log_probs(logits, torch.zeros(logits.shape[:2], dtype=torch.long))
            if t:
                tok = lp[:, :-1, :].gather(2, tokens[:, :t, None]).squeeze(2)
                tok = torch.where(torch.arange(t)[None, :] < lengths[:, None], tok, torch.zeros_like(tok))
                cols.append(tok.sum(1) + stop[:, -1])
            else:
                cols.append(stop[:, -1])
    return torch.stack(cols, 1)


@torch.no_grad()
def reference_reward(model, prompt, tokens, lengths, rcons):
    """The reference code's ``score_fast``: ONE forward over [B, prompt+n] (prompt repeated per
    row, adapters off), full log-softmax, cumsum: log p_base(z_1:t ⊤ | X) for every t."""
    B, n = tokens.shape
    L = len(prompt)
    seq = torch.cat([torch.tensor(prompt, dtype=torch.long)[None].repeat(B, 1), tokens], dim=1)
    with base_model(model) as base:
        logits = base(input_ids=seq).logits[:, L - 1:, :]
    lp, stop = rcons.log_probs(logits, torch.zeros(logits.shape[:2], dtype=torch.long))
    tok = lp[:, :-1, :].gather(2, tokens[:, :, None]).squeeze(2)
    tok = torch.where(torch.arange(n)[None, :] < lengths[:, None], tok, torch.zeros_like(tok))
    return torch.cat([torch.zeros(B, 1), tok.cumsum(1)], 1) + stop


def naive_subtb(log_pf, log_pterm, log_r, lengths, log_z=None):
    """Modified SubTB (lamda = 1) as a Python loop over window lengths with the cumsum trick.

    delta_t = a_t + log_pf_t - a_{t+1} with a_t = log R(z_1:t ⊤) - log q(⊤|z_1:t), so that a
    window (i, i+k) has residual D_{i+k} - D_i with D = cumsum(delta).  Per row: the mean over
    valid pairs (both ends t <= n and stopping possible there); then the mean over rows with a
    pair (gfnlm's normalisation, so the value is comparable with modified_subtb_loss).
    """
    B, N = log_pf.shape
    pos = torch.arange(N + 1)[None, :]
    valid = (pos <= lengths[:, None]) & torch.isfinite(log_pterm)
    a = torch.where(valid, log_r - log_pterm, torch.zeros_like(log_r))
    if log_z is not None:
        anchor = ~valid[:, 0]
        a = torch.cat([torch.where(anchor, log_z.expand(B), a[:, 0])[:, None], a[:, 1:]], 1)
        valid = valid.clone()
        valid[:, 0] = True
    pf = torch.where(pos[:, 1:] <= lengths[:, None], log_pf, torch.zeros_like(log_pf))
    delta = a[:, :-1] + pf - a[:, 1:]
    D = torch.cat([torch.zeros_like(delta[:, :1]), delta], 1).cumsum(1)
    num = torch.zeros(B)
    den = torch.zeros(B)
    for k in range(1, N + 1):
        m = valid[:, :-k] & valid[:, k:]
        term = torch.where(m, (D[:, k:] - D[:, :-k]) ** 2, torch.zeros_like(D[:, k:]))
        num = num + term.sum(1)
        den = den + m.sum(1)
    has = den > 0
    per_row = torch.where(has, num / den.clamp(min=1), torch.zeros_like(num))
    return per_row.sum() / has.sum().clamp(min=1)


def naive_step(ctx, seed, times=None, forced=None):
    model, prompt, B, cons, pad, T = ctx["model"], ctx["prompt"], ctx["B"], ctx["cons"], ctx["pad"], ctx["reward_temperature"]
    t = {}
    gen = torch.Generator().manual_seed(seed)

    t0 = now()
    toks, lengths, log_pf, log_pterm = naive_sample(model, prompt, B, cons, pad, gen, forced)
    t["sampling"] = now() - t0

    t0 = now()
    log_r_raw = naive_reward(model, prompt, toks, lengths, ctx["reward"].constraints)
    log_r = log_r_raw / T
    t["reward"] = now() - t0

    # informational, not in the naive total: the reference code's one-pass reward (score_fast)
    t0 = now()
    log_r_ref = reference_reward(model, prompt, toks, lengths, ctx["reward"].constraints)
    t["reward, one pass (reference score_fast)"] = now() - t0

    t["policy forward"] = 0.0  # the log-probabilities came out of the sampling loop

    t0 = now()
    loss = naive_subtb(log_pf, log_pterm, log_r, lengths, ctx["log_z"])
    loss_value = float(loss.detach())
    t["loss"] = now() - t0

    backward_and_step(loss, ctx, t, times)
    return {"loss": loss_value, "tokens": toks, "lengths": lengths, "log_r_raw": log_r_raw, "log_r_ref": log_r_ref,
            "log_pf": log_pf.detach(), "log_pterm": log_pterm.detach()}


# -------------------------------------------------------------------------------------- main


def machine_info(threads: int) -> dict:
    import peft
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def stats(xs):
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "n": len(xs), "values": xs}


def totals(times: dict, parts) -> list[float]:
    n = min(len(times[p]) for p in parts)
    return [sum(times[p][i] for p in parts) for i in range(n)]


def fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def run_profile(ctx, seed, out_dir: Path) -> str:
    """torch.profiler over one optimised step; returns the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import gfnlm.scoring as gsc

    # hand splits of the scoring pass and of the constrained log-softmax (before the profiler:
    # timings taken right after a profiled region were inflated)
    model, prompt, B, cons, pad = ctx["model"], ctx["prompt"], ctx["B"], ctx["cons"], ctx["pad"]
    s = sample(model, [prompt], torch.zeros(B, dtype=torch.long), cons, pad_id=pad,
               generator=torch.Generator().manual_seed(seed))
    V = model.config.vocab_size
    reps = 3
    split = {}
    for _ in range(reps):
        t0 = now()
        logits, _ = gsc.completion_logits(model, [prompt], s.prompt_index, s.tokens, s.lengths, pad)
        t1 = now()
        steps = torch.arange(logits.shape[1]).expand(B, -1)
        logp, stop = cons.log_probs(logits, steps)
        t2 = now()
        tok = logp[:, :-1, :].gather(2, s.tokens[:, :, None]).squeeze(2)
        (tok.sum() + stop.sum()).backward()
        t3 = now()
        ctx["opt"].zero_grad(set_to_none=True)
        for k, v in (("completion_logits fwd", t1 - t0), ("Constraints.log_probs fwd", t2 - t1),
                     ("gather + backward", t3 - t2)):
            split.setdefault(k, []).append(v)
    # the same backward without the full-vocabulary fp32 log-softmax (logits gathered directly)
    for _ in range(reps):
        logits, _ = gsc.completion_logits(model, [prompt], s.prompt_index, s.tokens, s.lengths, pad)
        t0 = now()
        lse = torch.logsumexp(logits, -1)
        sel = logits[:, :-1, :].gather(2, s.tokens[:, :, None]).squeeze(2) - lse[:, :-1]
        stop = logits[..., cons.stop_token_ids].logsumexp(-1) - lse
        t1 = now()
        (sel.sum() + stop.sum()).backward()
        t2 = now()
        ctx["opt"].zero_grad(set_to_none=True)
        split.setdefault("lean log-softmax fwd (logsumexp + gathers)", []).append(t1 - t0)
        split.setdefault("lean gather + backward", []).append(t2 - t1)
    # the reward's constrained log-softmax (no grad) against the same gathers, and the draw
    rcons = ctx["reward"].constraints
    with torch.no_grad(), base_model(model) as base:
        logits, _ = gsc.completion_logits(base, [prompt], s.prompt_index, s.tokens, s.lengths, pad)
    for _ in range(reps):
        t0 = now()
        lp, stop = rcons.log_probs(logits, torch.zeros(logits.shape[:2], dtype=torch.long))
        lp[:, :-1, :].gather(2, s.tokens[:, :, None])
        t1 = now()
        lse = torch.logsumexp(logits, -1)
        logits[:, :-1, :].gather(2, s.tokens[:, :, None]).squeeze(2) - lse[:, :-1]
        logits[..., rcons.stop_token_ids].logsumexp(-1) - lse
        t2 = now()
        split.setdefault("reward: Constraints.log_probs + gather (no grad)", []).append(t1 - t0)
        split.setdefault("reward: lean logsumexp + gathers (no grad)", []).append(t2 - t1)
    probs = torch.softmax(logits[:, -1, :], -1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(reps):
        t0 = now()
        torch.multinomial(probs, 1, generator=g)
        t1 = now()
        torch.searchsorted(probs.cumsum(-1), torch.rand(B, 1, generator=g) * probs.sum(-1, keepdim=True))
        t2 = now()
        split.setdefault(f"sampling: torch.multinomial [{B}, V] (x N per step)", []).append(t1 - t0)
        split.setdefault(f"sampling: cumsum + searchsorted [{B}, V]", []).append(t2 - t1)
    del logits

    lines = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("## optimised step"):
            optimised_step(ctx, seed)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    lines.append("# torch.profiler, one optimised step, top 30 ops by self CPU time\n")
    lines.append(table)
    table2 = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
    lines.append("\n# grouped by input shape\n")
    lines.append(table2)

    lines.append(f"\n# hand split of score() (B={B}, N={s.tokens.shape[1]}, V={V}), median of {reps}\n")
    for k, v in split.items():
        lines.append(f"{k:52s} {statistics.median(v):.4f} s")
    text = "\n".join(lines)
    (out_dir / "step_profile.txt").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="gfnlm.models.load_model name or path")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (2 timed, 1 naive)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5, --quick 2)")
    ap.add_argument("--naive-reps", type=int, default=None, help="timed naive repetitions (default 2, --quick 1)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--min-new-tokens", type=int, default=0,
                    help="0 (default): every prefix may stop, as in the paper's modified SubTB. "
                         "= --new-tokens forces the length, but then log q(⊤|z_1:t) = -inf for t < N, "
                         "so SubTB has no pair and a learned log Z anchors position 0 (as GFNTrainer's log_z=auto)")
    ap.add_argument("--reward-temperature", type=float, default=0.8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also profile one optimised step")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="sample without compiling the lean decoder's step (compile_decoder=False)")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="let torch.compile reuse its on-disk caches of earlier runs (default: a fresh folder, so "
                         "the compilation is timed cold)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    naive_reps = args.naive_reps if args.naive_reps is not None else (1 if args.quick else 2)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    t_start = now()

    from peft import LoraConfig, get_peft_model

    from gfnlm.models import load_model
    from gfnlm.trainer import disable_dropout

    t0 = now()
    model, tok = load_model(args.model)
    load_s = now() - t0
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    disable_dropout(model)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = tok.eos_token_id
    prompt = build_prompt(tok)
    B, N = args.batch, args.new_tokens
    cons = Constraints(stop_token_ids=[eos], min_new_tokens=args.min_new_tokens, max_new_tokens=N)
    params = lora_params(model)
    log_z = None
    groups = [{"params": params, "lr": args.lr}]
    if args.min_new_tokens > 0:
        log_z = torch.nn.Parameter(torch.zeros(1))
        groups.append({"params": [log_z], "lr": 0.1})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    all_params = params + ([log_z] if log_z is not None else [])
    ctx = dict(model=model, tok=tok, prompt=prompt, B=B, N=N, cons=cons, pad=pad, log_z=log_z,
               reward=LMLikelihoodReward(model, constraints=cons),
               reward_temperature=args.reward_temperature, params=all_params, opt=opt, compile=args.compile)
    n_lora = sum(p.numel() for p in params)
    print(f"model {args.model} loaded in {load_s:.1f} s; LoRA r=16 all-linear: {n_lora:,} trainable params; "
          f"prompt {len(prompt)} tokens; B={B}, N={N}, min_new_tokens={args.min_new_tokens}; "
          f"threads={torch.get_num_threads()}", flush=True)

    # the lean decoder packs the frozen weights at its first use (once per model): timed apart
    from gfnlm.decoding import LlamaDecoder

    t0 = now()
    dec = LlamaDecoder.for_model(model, B)
    pack_s = now() - t0
    if dec is None:
        decoder_info = {"used": "the model's own forward (the lean decoder does not apply to this model)",
                        "first_use_s": pack_s, "note": ""}
    else:
        what = "weights packed for oneDNN" if dec.pack_rows else "weights not packed (no oneDNN, or not frozen fp32 on CPU)"
        decoder_info = {"used": f"`gfnlm.decoding.LlamaDecoder` (static KV cache, {what}, LoRA read from the adapters)",
                        "first_use_s": pack_s,
                        "note": f"The decoder's first use (packing, once per model) took {pack_s:.3f} s, not in the "
                                "timings."}
    print(f"decoder: {decoder_info['used']}; first use {pack_s:.3f} s", flush=True)

    # compilation (compile_decoder=True): the first compiled sample, timed apart
    compile_info = {"compiled": False}
    if args.compile and dec is not None:
        from gfnlm.decoding import compile_seconds

        t0 = now()
        sample(model, [prompt], torch.zeros(B, dtype=torch.long), cons, pad_id=pad,
               generator=torch.Generator().manual_seed(0), compile_decoder=True)
        first_s, comp_s = now() - t0, compile_seconds()
        compile_info = {"compiled": True, "first_sample_s": first_s, "compile_s": comp_s}
        print(f"compiled the decoder's step: first sample {first_s:.1f} s, of which the compiling step {comp_s:.1f} s",
              flush=True)

    # priming step (also the warm-up of the optimised path): makes the LoRA B matrices non-zero
    optimised_step(ctx, args.seed)
    snap = snapshot(all_params)

    opt_t, floor_t, naive_t = {}, {}, {}
    check = {}
    lengths = None
    for rep in range(1 + reps):
        timed = rep > 0
        if timed:  # (the priming step above was the optimised path's warm-up)
            restore(all_params, snap)
            r = optimised_step(ctx, args.seed, opt_t, keep=rep == 1)
            lengths = r["lengths"]
        restore(all_params, snap)
        floor_step(ctx, floor_t if timed else {})
        if timed and rep <= naive_reps:
            restore(all_params, snap)
            nv = naive_step(ctx, args.seed, naive_t)
            if rep == 1:
                s = r["samples"]
                same = nv["tokens"].shape == s.tokens.shape and bool((nv["tokens"] == s.tokens).all()) \
                    and bool((nv["lengths"] == s.lengths).all())
                if not same:  # replay the optimised episodes through the naive loop (untimed)
                    restore(all_params, snap)
                    nv = naive_step(ctx, args.seed, None, forced=(s.tokens, s.lengths))
                    opt.zero_grad(set_to_none=True)
                check = {
                    "same_samples_when_sampled_freely": same,
                    "optimised_loss": r["loss"],
                    "naive_loss": nv["loss"],
                    "abs_diff": abs(r["loss"] - nv["loss"]),
                    "rel_diff": abs(r["loss"] - nv["loss"]) / max(abs(r["loss"]), 1e-30),
                    "max_abs_diff_log_r": float((nv["log_r_raw"] - r["log_r_raw"]).abs().max()),
                    "max_abs_diff_log_r_reference_one_pass": float((nv["log_r_ref"] - r["log_r_raw"]).abs().max()),
                    "max_abs_diff_log_pf": float((nv["log_pf"] - r["log_pf"]).abs().max()),
                    "max_abs_diff_log_pterm_finite": float(
                        (nv["log_pterm"] - r["log_pterm"])[torch.isfinite(r["log_pterm"])].abs().max()),
                }
                check["agree"] = check["rel_diff"] < 1e-4
                print(f"loss check on the same samples: optimised {r['loss']:.6f}  naive {nv['loss']:.6f}  "
                      f"(rel diff {check['rel_diff']:.2e}; max |Δ log R| {check['max_abs_diff_log_r']:.2e}, "
                      f"max |Δ log q| {check['max_abs_diff_log_pf']:.2e})", flush=True)
        tot = lambda d, ps: sum(d[p][-1] for p in ps) if timed and d else 0.0  # noqa: E731
        print(f"rep {rep}{'' if timed else ' (floor warm-up)'}: optimised {tot(opt_t, OPT_PARTS):.2f} s, "
              f"floor {tot(floor_t, list(FLOOR_PARTS.values())):.2f} s"
              + (f", naive {tot(naive_t, OPT_PARTS):.2f} s" if timed and rep <= naive_reps else ""), flush=True)

    profile_text = run_profile(ctx, args.seed, out_dir) if args.profile else None

    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    opt_tot, floor_tot = totals(opt_t, OPT_PARTS), totals(floor_t, list(FLOOR_PARTS.values()))
    naive_tot = totals(naive_t, OPT_PARTS) if naive_t else [float("nan")]
    if not naive_t:
        naive_t = {p: [float("nan")] for p in OPT_PARTS + [REF_REWARD]}
    # the naive step with the reference code's one-pass reward instead of N+1 passes
    ref_parts = [p for p in OPT_PARTS if p != "reward"] + [REF_REWARD]
    naive_ref_tot = totals(naive_t, ref_parts)
    med = statistics.median
    o_med, f_med, n_med = med(opt_tot), med(floor_tot), med(naive_tot)
    ratio_floor, ratio_naive = o_med / f_med, n_med / o_med
    ratio_sampling = med(opt_t["sampling"]) / med(floor_t["generate"])
    nr_med = med(naive_ref_tot)
    shared = {k: med(floor_t[k]) for k in SHARED_PARTS}
    eng_policy = med([a + b for a, b in zip(opt_t["policy forward"], opt_t["backward"])])
    result = {
        "config": {"model": args.model, "batch": B, "new_tokens": N, "min_new_tokens": args.min_new_tokens,
                   "prompt_tokens": len(prompt), "prompt_text": tok.decode(prompt), "lora": "r=16 alpha=32 all-linear dropout=0",
                   "trainable_params": n_lora, "dtype": "float32", "reward": "LMLikelihoodReward (adapters off)",
                   "reward_temperature": args.reward_temperature, "loss": "modified_subtb_loss lamda=1",
                   "log_z": log_z is not None, "optimizer": f"AdamW lr={args.lr}, clip 1.0", "seed": args.seed,
                   "reps": reps, "naive_reps": naive_reps, "sample_lengths": lengths},
        "machine": info,
        "model_load_s": load_s,
        "floor_definition": "floor total = HF generate (B x N new tokens, min_new_tokens = max_new_tokens = N, "
                            "do_sample, LoRA model, prompt repeated in every row) + one no-grad forward over the "
                            "B x (prompt+N) sequences (adapters off) + one forward+backward over the same "
                            "(LoRA model, loss = mean logit); no optimiser step",
        "optimised": {p: stats(opt_t[p]) for p in OPT_PARTS} | {"total": stats(opt_tot)},
        "floor": {p: stats(floor_t[p]) for p in FLOOR_PARTS.values()} | {"total": stats(floor_tot)},
        "naive": {p: stats(naive_t[p]) for p in OPT_PARTS + [REF_REWARD]} | {"total": stats(naive_tot)},
        "naive_with_reference_one_pass_reward": {"total": stats(naive_ref_tot)},
        "shared_prompt_floor": {k: stats(floor_t[k]) for k in SHARED_PARTS},
        "ratios": {"optimised_over_floor": ratio_floor, "naive_over_optimised": ratio_naive,
                   "naive_one_pass_reward_over_optimised": nr_med / o_med},
        "sampling_over_generate": ratio_sampling,
        "targets": {"optimised_le_1.15x_floor": ratio_floor <= 1.15, "naive_ge_3x_optimised": ratio_naive >= 3.0,
                    "sampling_le_0.5x_generate": ratio_sampling <= 0.5, "optimised_le_0.55x_floor": ratio_floor <= 0.55},
        "sampler_through_model_forward": stats(floor_t[MODEL_FORWARD]),
        "decoder": decoder_info,
        "compilation": compile_info | ({"eager_decoder_sampling": stats(floor_t[EAGER_DECODER])}
                                       if EAGER_DECODER in floor_t else {}),
        "loss_check": check,
        "wall_s": now() - t_start,
    }

    if compile_info["compiled"]:
        eager_s = med(floor_t[EAGER_DECODER])
        saved = eager_s - med(opt_t["sampling"])
        compile_text = (f"Its step is compiled (`compile_decoder=True`): the first compiled sample took "
                        f"{compile_info['first_sample_s']:.1f} s (the compiling step {compile_info['compile_s']:.1f} s), "
                        f"not in the timings; the same decoder run eagerly (the default) samples in {eager_s:.3f} s "
                        f"(sampling / generate {eager_s / med(floor_t['generate']):.2f}), so compilation pays for "
                        + (f"itself after {compile_info['first_sample_s'] / saved:.0f} samplings of these shapes."
                           if saved > 0 else "nothing here."))
    else:
        compile_text = "Its step is not compiled (`--no-compile`)."
    result["compilation"]["text"] = compile_text
    rows = []
    for p in OPT_PARTS:
        fp = FLOOR_PARTS.get(p)
        fv = med(floor_t[fp]) if fp else None
        nvv = med(naive_t[p]) if p != "policy forward" else None
        label = p + (f" (floor: {fp})" if fp else "")
        if p == "policy forward":
            label += " (naive: inside sampling)"
        rows.append(f"| {label} | {fmt(med(opt_t[p]))} | {fmt(fv)} | {fmt(nvv)} |")
    rows.append(f"| **total** | **{o_med:.3f}** | **{f_med:.3f}** | **{n_med:.3f}** |")
    md = [
        f"# One GFlowNet training step: {args.model}, B={B}, N={N}, prompt {len(prompt)} tokens",
        "",
        f"{info['date']} · {info['cpu']} · {info['cpu_count']} CPUs · torch {info['torch']} "
        f"({args.threads} threads) · transformers {info['transformers']} · peft {info['peft']} · "
        f"load average {info['loadavg_start'][0]:.2f} → {info['loadavg_end'][0]:.2f}",
        "",
        f"Seconds, median of {reps} repetitions after 1 warm-up (naive: median of {naive_reps}, no separate "
        f"warm-up: it runs the same kernels); "
        f"fp32, LoRA r=16 all-linear, modified SubTB (λ=1), LMLikelihoodReward tempered at "
        f"T={args.reward_temperature}, min_new_tokens={args.min_new_tokens}, sample lengths {sorted(set(lengths))}.",
        "",
        "| part | optimised s | floor s | naive s |",
        "| --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"Means: optimised {statistics.fmean(opt_tot):.3f} s, floor {statistics.fmean(floor_tot):.3f} s, "
        f"naive {statistics.fmean(naive_tot):.3f} s.",
        "",
        f"- optimised / floor = **{ratio_floor:.2f}** (target ≤ 1.15: "
        f"{'met' if ratio_floor <= 1.15 else 'NOT met'})",
        f"- naive / optimised = **{ratio_naive:.2f}** (target ≥ 3: {'met' if ratio_naive >= 3 else 'NOT met'})",
        f"- sampling / HF generate = **{ratio_sampling:.2f}** (target ≤ 0.5: "
        f"{'met' if ratio_sampling <= 0.5 else 'NOT met'}); optimised / floor ≤ 0.55: "
        f"{'met' if ratio_floor <= 0.55 else 'NOT met'}",
        f"- the sampler decodes with {decoder_info['used']}; through the model's own forward (LoRA folded into "
        f"temporary weights, `fast_decode=False`, as for other architectures) it takes "
        f"{med(floor_t[MODEL_FORWARD]):.3f} s. {decoder_info['note']} {compile_text}",
        f"- {result['floor_definition']}.",
        f"- loss on the same samples: optimised {check.get('optimised_loss', float('nan')):.6f}, naive "
        f"{check.get('naive_loss', float('nan')):.6f} (relative difference {check.get('rel_diff', float('nan')):.1e}; "
        f"{'agree' if check.get('agree') else 'DISAGREE'}).",
        "",
        "Context (informational, not part of the targets):",
        "",
        f"- The paper's reference code computes the LM-likelihood reward of every prefix in ONE forward "
        f"(`score_fast`), not N+1: that pass took {med(naive_t[REF_REWARD]):.3f} s here, and the naive step "
        f"with it would take {nr_med:.3f} s, i.e. naive / optimised = **{nr_med / o_med:.2f}**.",
        f"- The floor repeats the {len(prompt)}-token prompt in all {B} rows ({B * (len(prompt) + N)} tokens per "
        f"pass); the engine encodes it once ({len(prompt) + B * N} tokens). The same bare passes on the engine's "
        f"token count (`completion_logits`, no constrained log-softmax, loss = mean logit): forward (no grad) "
        f"{shared['shared-prompt forward (no grad)']:.3f} s vs the engine's reward {med(opt_t['reward']):.3f} s; "
        f"forward+backward {shared['shared-prompt forward+backward']:.3f} s vs the engine's policy forward + "
        f"backward {eng_policy:.3f} s.",
    ]
    text = "\n".join(md) + "\n"
    print()
    print(text)
    (out_dir / "step.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "step.md").write_text(text + ("\n```\n" + profile_text + "\n```\n" if profile_text else ""))
    print(f"wrote {out_dir / 'step.json'} and {out_dir / 'step.md'} ({now() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
