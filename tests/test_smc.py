"""SMC through genlm-control (gfnlm.smc), on tiny models: its particles are properly weighted for the
same target as the GFlowNet reward (the LM renormalised over the legal tokens, the length limits and
the regex rule as hard factors, a terminal predicate, contrastive exponents), checked against brute
force over every string."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import byte_tokenizer, make_tiny_lm
from gfnlm.errors import ConfigError
from gfnlm.evaluation import sequence_log_probs
from gfnlm.patterns import RegexRule
from gfnlm.rewards import LMLikelihoodReward, RewardBatch
from gfnlm.sampling import Constraints, pad_right
from gfnlm.smc import LMTerm, run_smc

TOK = byte_tokenizer()
A, B, STOP = (TOK.convert_tokens_to_ids(c) for c in "ab.")
PROMPT = TOK.encode("xy", add_special_tokens=False)


def constraints(pattern: str | None = None, min_new_tokens=1, max_new_tokens=3) -> Constraints:
    c = Constraints(stop_token_ids=[STOP], min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
                    allowed_token_ids=[A, B])
    if pattern is not None:
        c.prefix_rule = RegexRule(pattern, TOK, c)
    return c


def model(seed=0):
    m = make_tiny_lm(vocab_size=len(TOK), seed=seed, max_positions=64)
    with torch.no_grad():
        m.lm_head.weight.mul_(8)  # a peaked LM, so that local decoding is far from the target
    return m


def brute_force(lm, cons, context=PROMPT, weight=1.0):
    """Every string the constraints allow: {tokens: (log R, log q_local)}, log R = weight · log p̃(Z ⊤ | context)
    from the one LM reward (terminal), q_local the base LM decoded under the same constraints."""
    zs = [list(z) for n in range(cons.min_new_tokens, cons.max_new_tokens + 1)
          for z in itertools.product([A, B], repeat=n)]
    if cons.prefix_rule is not None:
        zs = [z for z in zs if cons.prefix_rule.matches(z)]
    tokens, lengths = pad_right(zs, 0)
    batch = RewardBatch(prompts=["p"], prompt_ids=[list(context)], prompt_index=torch.zeros(len(zs), dtype=torch.long),
                        tokens=tokens, lengths=lengths, completions=[TOK.decode(z) for z in zs], tokenizer=TOK)
    reward = LMLikelihoodReward(lm, TOK, prefixes="terminal", constraints=cons, renormalise=True, weight=weight)
    log_r = reward(batch)
    log_q = sequence_log_probs(lm, context, cons, zs)
    return {tuple(z): (float(r), float(q)) for z, r, q in zip(zs, log_r, log_q)}


def test_each_particle_is_weighted_by_the_rewards_target_over_its_proposal():
    lm, cons = model(), constraints("(a|b)*b")
    exact = brute_force(lm, cons)
    (res,) = run_smc(lm, TOK, cons, [[LMTerm(PROMPT)]], n_particles=40, ess_threshold=0.0, seed=1)
    assert len(res.completions) == 40
    for z, w in zip(res.completions, res.log_weights):
        assert tuple(z) in exact, z  # every particle obeys the rule and the length limits
        log_r, log_q = exact[tuple(z)]
        assert w == pytest.approx(log_r - log_q, abs=1e-5)  # importance weight R / q, no resampling
    w = torch.tensor(res.log_weights, dtype=torch.float64)
    assert res.log_ml == pytest.approx(float(torch.logsumexp(w, 0) - math.log(40)), abs=1e-9)
    # cost: one forward row per distinct context computed: at least the distinct prefixes whose next-token
    # distribution the particles needed (stop decision included), at most one per particle and step
    distinct = {tuple(z[:t]) for z in res.completions for t in range(len(z) + 1)}
    assert len(distinct) <= res.lm_calls <= sum(len(z) + 1 for z in res.completions)


def test_with_resampling_the_particles_approach_the_target_where_local_decoding_does_not():
    lm, cons = model(seed=2), constraints("(a|b)*b")
    exact = brute_force(lm, cons)
    keys = list(exact)
    log_r = torch.tensor([exact[k][0] for k in keys], dtype=torch.float64)
    log_z = float(torch.logsumexp(log_r, 0))
    pi = (log_r - log_z).exp()
    local = torch.tensor([exact[k][1] for k in keys], dtype=torch.float64).exp()
    (res,) = run_smc(lm, TOK, cons, [[LMTerm(PROMPT)]], n_particles=600, ess_threshold=0.5, seed=0)
    q = torch.zeros(len(keys), dtype=torch.float64)
    for z, p in res.weighted():
        q[keys.index(tuple(z))] += p
    tv_local, tv_smc = 0.5 * float((pi - local).abs().sum()), 0.5 * float((pi - q).abs().sum())
    assert tv_local > 0.15, tv_local  # the setting discriminates
    assert tv_smc < 0.06 and tv_smc < tv_local / 3, (tv_smc, tv_local)
    assert res.log_ml == pytest.approx(log_z, abs=0.1)


def test_contrastive_terms_are_weighted_against_brute_force():
    lm, cons = model(seed=3), constraints(min_new_tokens=2, max_new_tokens=3)
    u = [TOK.bos_token_id]
    cond, unc = brute_force(lm, cons, PROMPT, 1.5), brute_force(lm, cons, u, -0.5)
    (res,) = run_smc(lm, TOK, cons, [[LMTerm(PROMPT, 1.5), LMTerm(u, -0.5)]], n_particles=24, ess_threshold=0.0, seed=0)
    legal = torch.tensor([A, B])
    for z, w in zip(res.completions, res.log_weights):
        log_q = 0.0  # the proposal: each step 1.5 log p̃(.|X z<t) - 0.5 log p̃(.|U z<t), limits applied, renormalised
        for t in range(len(z) + 1):
            with torch.no_grad():
                x = lm(input_ids=torch.tensor([PROMPT + z[:t]])).logits[0, -1]
                y = lm(input_ids=torch.tensor([u + z[:t]])).logits[0, -1]
            keep = torch.cat([legal, torch.tensor([STOP])])
            s = 1.5 * x[keep].log_softmax(-1) - 0.5 * y[keep].log_softmax(-1)
            s[:2] = s[:2] if t < 3 else -math.inf
            s[2] = s[2] if t >= 2 else -math.inf
            s = s.log_softmax(-1)
            log_q += float(s[[A, B].index(z[t])] if t < len(z) else s[2])
        want = cond[tuple(z)][0] + unc[tuple(z)][0] - log_q
        assert w == pytest.approx(want, abs=1e-4)


def test_a_terminal_predicate_and_bad_input():
    lm, cons = model(seed=4), constraints(max_new_tokens=4)
    has_two_a = lambda z: z.count(A) >= 2  # noqa: E731
    (res,) = run_smc(lm, TOK, cons, [[LMTerm(PROMPT)]], n_particles=32, ess_threshold=0.5, predicate=has_two_a, seed=0)
    kept = [z for z, w in zip(res.completions, res.log_weights) if w > -math.inf]
    assert kept and all(has_two_a(z) for z in kept)
    drawn = res.resample(50, torch.Generator().manual_seed(0))
    assert len(drawn) == 50 and all(has_two_a(z) for z in drawn)
    # the target includes the predicate: exact log Z over the strings that satisfy it
    exact = {z: v for z, v in brute_force(lm, cons).items() if has_two_a(list(z))}
    log_z = float(torch.logsumexp(torch.tensor([v[0] for v in exact.values()]), 0))
    (big,) = run_smc(lm, TOK, cons, [[LMTerm(PROMPT)]], n_particles=400, ess_threshold=0.5, predicate=has_two_a, seed=1)
    assert big.log_ml == pytest.approx(log_z, abs=0.15)
    with pytest.raises(ConfigError, match="at least one particle"):
        run_smc(lm, TOK, cons, [[LMTerm(PROMPT)]], n_particles=0)


# --- the tasks' own targets -------------------------------------------------------------------------
CONT_PROMPTS = ["the cat sat on a mat ", "a dog ran far away ", "it was a cold day ", "we had no bread ",
                "she made tea for us ", "he read a long book "]


def task_config(task, tmp_path, **task_args):
    from gfnlm.tasks import build_config

    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(CONT_PROMPTS) + "\n")
    return build_config(task, {"task_args": {"data_file": str(p), "valid_prompts": 2, "train_prompts": 4, **task_args},
                               "max_new_tokens": 4, "report_to": [], "output_dir": str(tmp_path / "r")})


def test_the_constrained_tasks_smc_target_is_its_reward(tmp_path):
    """Through the task's own reward objects (lm_terms), with ESS 0: each particle's weight is the
    task's log R (its evaluation path) minus locally constrained decoding's log q."""
    from gfnlm.data import render_prompt
    from gfnlm.evaluation import completion_log_rewards
    from gfnlm.smc import lm_terms
    from gfnlm.tasks.constrained import ConstrainedTask

    cfg = task_config("constrained", tmp_path, regex="[^e]+")
    task, lm = ConstrainedTask(cfg.task_args), model(seed=5)
    cons = task.constraints(cfg, TOK)
    rows = task.eval_rows()[:2]
    prompts = [render_prompt(TOK, r["prompt"], cfg.chat_template) for r in rows]
    rewards = task.reward_funcs(lm, TOK, cons, cfg)
    runs = run_smc(lm, TOK, cons, [lm_terms(rewards, r, p, TOK, cons) for r, p in zip(rows, prompts)], n_particles=6,
                   ess_threshold=0.0, seed=0)
    log_r = completion_log_rewards(cfg, TOK, rows, rewards, cons, [r.completions for r in runs])
    for run, p, lr in zip(runs, prompts, log_r):
        log_q = sequence_log_probs(lm, p, cons, run.completions)
        assert all("e" not in TOK.decode(z) for z in run.completions)
        for w, r, q in zip(run.log_weights, lr, log_q.tolist()):
            assert w == pytest.approx(r - q, abs=1e-4)


def test_the_contrastive_tasks_terms_and_bad_input(tmp_path):
    from gfnlm.data import render_prompt
    from gfnlm.rewards import PrefixRuleReward
    from gfnlm.smc import lm_terms
    from gfnlm.tasks.contrastive import ContrastiveTask

    cfg = task_config("contrastive", tmp_path)
    task, lm = ContrastiveTask(cfg.task_args), model()
    cons = task.constraints(cfg, TOK)
    row = task.eval_rows()[0]
    prompt = render_prompt(TOK, row["prompt"], cfg.chat_template)
    cond, unc = lm_terms(task.reward_funcs(lm, TOK, cons, cfg), row, prompt, TOK, cons, weights=[2.0, 1.0])
    assert (cond.context_ids, cond.weight) == (prompt, 3.0)  # a = 1.5 times the configured weight 2
    u = TOK("The following is an excerpt from a web page.")["input_ids"]
    assert (unc.context_ids, unc.weight) == (u, -0.5)  # U: the default text, encoded as any text context
    other = Constraints(stop_token_ids=cons.stop_token_ids, max_new_tokens=4, allowed_token_ids=[A, B])
    with pytest.raises(ConfigError, match="another action space"):
        lm_terms(task.reward_funcs(lm, TOK, cons, cfg), row, prompt, TOK, other)
    with pytest.raises(ConfigError, match="predicate"):
        lm_terms([PrefixRuleReward(lambda p, t: 0.0)], row, prompt, TOK, cons)


def test_global_random_state_is_left_as_it_was():
    import numpy as np

    lm, cons = model(), constraints("(a|b)*b")
    torch.manual_seed(7)
    np.random.seed(7)
    want = torch.rand(3), np.random.rand(3)
    torch.manual_seed(7)
    np.random.seed(7)
    run_smc(lm, TOK, cons, [[LMTerm(PROMPT)]], n_particles=8, ess_threshold=0.5, seed=3)
    assert torch.equal(torch.rand(3), want[0]) and (np.random.rand(3) == want[1]).all()
