"""RL baseline (GRPO through TRL) on the arithmetic task with a tiny random model: the rollouts are
gfnlm's episodes (same action space, calculator tokens masked out), training moves the adapters
only when rewards differ within a group, and the checkpoint loads like a GFlowNet one."""

from __future__ import annotations

import dataclasses

import json

import pytest
import torch

pytest.importorskip("trl")

from conftest import make_tiny_lm
from gfnlm.data import render_prompt
from gfnlm.rl import STATE_FIELD, GFNRollout, answer_reward, grpo_train, make_grpo_trainer
from gfnlm.sampling import sample
from gfnlm.tasks import build_config
from gfnlm.tasks.arithmetic import ArithmeticTask, answer_of, generate_questions
from gfnlm.tools import Calculator
from gfnlm.trainer import load_trained

from test_arithmetic import tokenizer  # noqa: E402  (the tiny arithmetic tokenizer)

Q1, Q2 = "Question: 6 - 0 - 4 = ? Answer:", "Question: 5 + 3 = ? Answer:"


@pytest.fixture
def setup(tmp_path):
    """(task, tokenizer, config) for the arithmetic task on a saved tiny model (so load_trained can load it)."""
    sup = [{"str_query": Q1, "num_sol": 2, "str_rationale": "6 - 0 =, 6 - 4 =", "str_sol": ". The answer is 2."},
           {"str_query": Q2, "num_sol": 8, "str_rationale": "5 + 3 =", "str_sol": ". The answer is 8."}]
    (tmp_path / "sup.json").write_text(json.dumps(sup))
    (tmp_path / "pool.json").write_text(json.dumps(generate_questions(4, 3, seed=1)))
    tok = tokenizer()
    make_tiny_lm(vocab_size=len(tok), seed=1, max_positions=256).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    cfg = build_config("arithmetic", {
        "model": str(tmp_path / "tiny"), "max_new_tokens": 8, "min_new_tokens": 0, "max_tool_tokens": 6, "stop_tokens": ["eos", "."],
        "warmup_steps": 0, "learning_rate": 1e-2, "lora_r": 4, "lora_alpha": 8, "disable_tqdm": True,
        "task_args": {"data_dir": str(tmp_path), "supervised_file": "sup.json", "pool_file": "pool.json",
                      "test_files": "3:pool.json"}})
    return ArithmeticTask(cfg.task_args), tok, cfg


def tiny_model(tok):
    return make_tiny_lm(vocab_size=len(tok), seed=1, max_positions=256)


def first_is_digit(prompts, completions, **kw):
    """1 for some episodes, 0 for others (varies within each group of the tiny random policy)."""
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def test_rollout_is_gfnlm_sampling_with_calculator_tokens_masked(setup):
    task, tok, cfg = setup
    model = tiny_model(tok)
    cons = task.constraints(cfg, tok)
    rollout = GFNRollout(tok, cons, chat_template=cfg.chat_template, tool=task.tool(), max_tool_tokens=cfg.max_tool_tokens)
    G = 32
    prompts = [Q1] * G + [Q2] * G  # as TRL passes them: each prompt repeated num_generations times
    out = rollout.rollout(model, prompts, torch.Generator().manual_seed(0))
    ids = [render_prompt(tok, q, cfg.chat_template) for q in (Q1, Q2)]
    s = sample(model, ids, [0] * G + [1] * G, cons, generator=torch.Generator().manual_seed(0), tool=task.tool(),
               tokenizer=tok, max_tool_tokens=cfg.max_tool_tokens)
    assert all(len(out[k]) == 2 * G for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask", STATE_FIELD))
    calc, fired = Calculator(max_operands=task.args.max_operands), 0
    for b in range(2 * G):
        n = int(s.lengths[b])
        comp, mask, lp = out["completion_ids"][b], out["env_mask"][b], out["logprobs"][b]
        assert out["prompt_ids"][b] == ids[b // G]
        assert len(comp) == len(mask) == len(lp) == n + 1
        assert comp[:-1] == s.tokens[b, :n].tolist() and comp[-1] == tok.eos_token_id
        # env_mask is gfnlm's action mask, then the stop (masked out only when stopping was forced)
        assert mask[:-1] == s.action_mask[b, :n].int().tolist()
        assert mask[-1] == (0 if sum(mask[:-1]) == cons.max_new_tokens else 1)
        assert lp[:-1] == pytest.approx(s.log_pf[b, :n].tolist(), abs=1e-6)
        assert sum(lp) == pytest.approx(float(s.log_prob[b]), abs=1e-4)
        state = tok.decode(comp[:-1])
        assert out[STATE_FIELD][b] == state
        # the zeros of env_mask are exactly what the calculator wrote after the preceding action
        t, used = 0, 0
        while t < n:
            assert mask[t] == 1  # tool output only ever follows an action
            written = calc(tok.decode(comp[: t + 1]))
            k = t + 1
            while k < n and mask[k] == 0:
                k += 1
            if k > t + 1:
                assert written is not None and tok.decode(comp[t + 1:k]) == written.strip()
                if k == n:  # the state ends with the calculator's answer, which is the answer read from it
                    assert answer_of(state) == int(written)
                fired += 1
                used += k - t - 1
            else:  # silent calculator, or an answer that does not fit in the tool budget
                assert written is None or used + len(tok.encode(written, add_special_tokens=False)) > cfg.max_tool_tokens
            t = k
    assert fired > 0, "the test should exercise the calculator"


def test_trl_log_probs_are_the_constrained_policy(setup, tmp_path):
    """What TRL differentiates equals gfnlm's log q on every action (min_new_tokens = 0 here)."""
    task, tok, cfg = setup
    trainer, rollout, cons, _ = make_grpo_trainer(task, tiny_model(tok), tok, cfg, output_dir=tmp_path / "rl",
                                                  max_steps=1, num_generations=4, prompts_per_step=2)
    out = trainer.rollout_func([Q1] * 4 + [Q2] * 4, trainer)
    P = max(len(p) for p in out["prompt_ids"])
    C = max(len(c) for c in out["completion_ids"])
    ids = torch.zeros(8, P + C, dtype=torch.long)
    att = torch.zeros(8, P + C, dtype=torch.long)
    for b, (p, c) in enumerate(zip(out["prompt_ids"], out["completion_ids"])):
        ids[b, P - len(p):P], att[b, P - len(p):P] = torch.tensor(p), 1
        ids[b, P:P + len(c)], att[b, P:P + len(c)] = torch.tensor(c), 1
    with torch.no_grad():
        logps, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, C, compute_entropy=True)
    checked, stops = 0, 0
    for b in range(8):
        for t, (m, lp) in enumerate(zip(out["env_mask"][b], out["logprobs"][b])):
            if m:  # actions, and the stop action (EOS standing for both stop ids: their summed probability)
                assert float(logps[b, t]) == pytest.approx(lp, abs=1e-4)
                checked += 1
                stops += t == len(out["env_mask"][b]) - 1
    assert checked > 8 and stops > 0 and len(cons.stop_token_ids) == 2
    # the entropy is over the allowed tokens and the stop ids, not the whole vocabulary
    tok_mask, stop_mask = cons.token_mask(len(tok), "cpu")
    k = int((tok_mask | stop_mask).sum())
    assert k < len(tok) and float(ent.max()) <= torch.log(torch.tensor(float(k))) + 1e-4


def test_grpo_trains_adapters_and_writes_a_loadable_checkpoint(setup, tmp_path):
    task, tok, cfg = setup
    out = tmp_path / "rl"
    model = grpo_train(task, tiny_model(tok), tok, cfg, output_dir=out, max_steps=2, num_generations=4,
                       prompts_per_step=2, reward_funcs=first_is_digit)
    log = [h for h in json.loads((out / "log_history.json").read_text()) if "grad_norm" in h]
    assert len(log) == 2 and all(h["grad_norm"] > 0 and h["reward_std"] > 0 for h in log)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().sum() > 0 for p in trained.values())  # LoRA B starts at zero
    loaded, ltok, lcfg, lcons = load_trained(out / "checkpoint-2")
    # the RL policy was trained without the task's stop-after-result rule (see gfnlm.rl), and is loaded so
    assert task.constraints(cfg, tok).stop_after_tool and not lcons.stop_after_tool
    assert lcons == dataclasses.replace(task.constraints(cfg, tok), stop_after_tool=False) and lcfg.max_steps == 2 and lcfg.task == "arithmetic"
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["method"] == "grpo" and state["step"] == 2
    for n, p in loaded.named_parameters():
        if "lora_B" in n:
            assert torch.equal(p, trained[n])
    x = torch.tensor([render_prompt(ltok, Q1, lcfg.chat_template)])
    with torch.no_grad():
        tuned = loaded(input_ids=x).logits
        with loaded.disable_adapter():
            base = loaded(input_ids=x).logits
    assert not torch.allclose(tuned, base, atol=1e-4)
    # the returned policy and the loaded checkpoint sample the same episodes
    r = GFNRollout(ltok, lcons, chat_template=lcfg.chat_template, tool=task.tool(), max_tool_tokens=lcfg.max_tool_tokens)
    a = r.rollout(model, [Q1] * 8, torch.Generator().manual_seed(3))
    b = r.rollout(loaded, [Q1] * 8, torch.Generator().manual_seed(3))
    assert a["completion_ids"] == b["completion_ids"] and all(x == pytest.approx(y, abs=1e-5) for x, y in zip(a["logprobs"], b["logprobs"]))


def test_no_update_without_reward_differences(setup, tmp_path):
    """Group-relative advantages: equal rewards within every group give zero gradient, no change."""
    task, tok, cfg = setup
    model = grpo_train(task, tiny_model(tok), tok, cfg, output_dir=tmp_path / "flat", max_steps=1, num_generations=4,
                       prompts_per_step=2, reward_funcs=lambda prompts, completions, **kw: [1.0] * len(completions))
    (h,) = [h for h in json.loads((tmp_path / "flat" / "log_history.json").read_text()) if "grad_norm" in h]
    assert h["grad_norm"] == 0.0 and h["frac_reward_zero_std"] == 1.0
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_answer_reward_scores_the_calculator_state(setup):
    task, _, _ = setup
    reward = answer_reward(task)
    assert reward(prompts=[Q1, Q1, Q2], completions=["6-0=6,6-4=2", "6-0=6,6-4=3", "5+3=8"],
                  num_sol=[2, 2, 8]) == [1.0, 0.0, 1.0]


def test_cli_rl_then_table_4_has_the_rl_row(setup, tmp_path, capsys):
    from gfnlm.cli import main

    task, tok, cfg = setup
    d = cfg.task_args["data_dir"]
    flags = ["--task_args.data_dir", d, "--task_args.supervised_file", "sup.json", "--task_args.pool_file", "pool.json",
             "--task_args.test_files", "3:pool.json", "--task_args.vote_samples", "2"]
    out = tmp_path / "rl"
    assert main(["rl", "--task", "arithmetic", "--model", cfg.model, "--max_steps", "2", "--samples_per_prompt", "2",
                 "--max_new_tokens", "6", "--report_to", "[]", "--disable_tqdm", "true", "--output_dir", str(out)]
                + flags) == 0
    assert (out / "checkpoint-2" / "adapter").is_dir()
    capsys.readouterr()
    assert main(["eval", "--task", "arithmetic", "--model", cfg.model, "-n", "2", "--shots", "0",
                 "--rl_checkpoint", str(out / "checkpoint-2")] + flags) == 0
    table = capsys.readouterr().out
    assert "| RL (TRL GRPO) |" in table and "| k-shot CoT, k = 0 |" in table
