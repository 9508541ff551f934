"""Arithmetic task: data checks, test/train deduplication, the vote, the reward, and training with
the calculator on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer, save_tiny_lm
from gfnlm.errors import ConfigError, DataError
from gfnlm.tasks import build_config
from gfnlm.tasks.arithmetic import (ArithmeticTask, answer_of, deduplicate,
                                    generate_questions, load_questions, majority_vote, question_expression,
                                    with_tool_outputs)
from gfnlm.rewards import RewardBatch
from gfnlm.tools import Calculator

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "arithmetic"
WORDS = [str(d) for d in range(10)] + ["+", "-", "=", ",", ".", "?", ":", "Question", "Answer", "The", "answer", "is"]


def tokenizer():
    from tokenizers import decoders, pre_tokenizers

    tok = make_tiny_tokenizer(words=WORDS)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    tok.backend_tokenizer.decoder = decoders.Fuse()
    return tok


def write(path: Path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture
def data_dir(tmp_path):
    sup = [{"str_query": "Question: 6 - 0 - 4 = ? Answer:", "num_sol": 2, "str_rationale": "6 - 0 =, 6 - 4 =",
            "str_sol": ". The answer is 2."},
           {"str_query": "Question: 5 + 3 = ? Answer:", "num_sol": 8, "str_rationale": "5 + 3 =",
            "str_sol": ". The answer is 8."}]
    pool = generate_questions(6, 3, seed=1)
    test3 = generate_questions(4, 3, seed=2) + [pool[0], sup[0]]  # two leak from training
    write(tmp_path / "sup.json", sup)
    write(tmp_path / "pool.json", pool)
    write(tmp_path / "t3.json", test3)
    return tmp_path


def test_generated_answers_are_exact():
    for q in generate_questions(200, 5, seed=3):
        nums = [int(x) for x in question_expression(q["str_query"]).replace("+", " + ").split() if x.isdigit()]
        ops = [x for x in question_expression(q["str_query"]).split() if x in "+-"]
        value = nums[0]
        for op, v in zip(ops, nums[1:]):
            value = value + v if op == "+" else value - v
        assert q["num_sol"] == value


def test_deduplication_reports_removed():
    a = generate_questions(5, 3, seed=0)
    test = a[:2] + generate_questions(3, 4, seed=9) + [dict(a[0])]
    kept, removed = deduplicate(test, a[1:])
    assert removed == 2  # a[1] is in training, the second a[0] repeats the first
    assert [q["str_query"] for q in kept] == [a[0]["str_query"]] + [q["str_query"] for q in test[2:5]]


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared arithmetic data not present")
def test_shared_test_sets_are_deduplicated_against_training():
    task = ArithmeticTask({"data_dir": str(SHARED)})
    train = {" ".join(r["str_query"].split()) for r in task.supervised() + task.pool()}
    for label, (qs, removed) in task.test_sets().items():
        assert not any(" ".join(q["str_query"].split()) in train for q in qs)
        assert len(qs) + removed == 500
    assert task.test_sets()["5"][1] == 0 and task.test_sets()["3"][1] > 0


def test_bad_data_files(tmp_path):
    with pytest.raises(DataError, match="num_sol 3 does not match"):
        load_questions(write(tmp_path / "a.json", [{"str_query": "Question: 1 + 1 = ? Answer:", "num_sol": 3}]))
    with pytest.raises(DataError, match="row 1 has no 'str_query' field"):
        load_questions(write(tmp_path / "b.json", [{"query": "x"}]))
    (tmp_path / "c.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON at line 1"):
        load_questions(tmp_path / "c.json")


def test_rationale_helpers_and_vote():
    calc = Calculator()
    assert with_tool_outputs("6 - 0 =, 6 - 4 =, 2 - 8 =", calc) == "6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"
    assert answer_of(" 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6") == -6
    assert answer_of("7 - 5 =") is None and answer_of("") is None
    assert majority_vote([3, None, 4, 4, 3, 4]) == 4
    assert majority_vote([3, 4]) == 3  # tie: first seen
    assert majority_vote([None, None]) is None


def arithmetic_config(data_dir, tmp_path, **over):
    args = {"data_dir": str(data_dir), "supervised_file": "sup.json", "pool_file": "pool.json",
            "test_files": "3:t3.json", "reward_shots": 1, "vote_samples": 3, "max_operands": 2}
    data = {"task_args": args, "max_steps": 2, "report_to": [], "disable_tqdm": True,
            "output_dir": str(tmp_path / "run"), "max_new_tokens": 12, "min_new_tokens": 1, "samples_per_prompt": 4}
    return build_config("arithmetic", {**data, **over})


def test_reward_is_likelihood_of_each_result_prefix_and_answer(data_dir, tmp_path):
    tok = tokenizer()
    model = make_tiny_lm(vocab_size=len(tok), seed=2, max_positions=128)
    cfg = arithmetic_config(data_dir, tmp_path, task_args={"data_dir": str(data_dir), "supervised_file": "sup.json",
                                                           "pool_file": "pool.json", "test_files": "3:t3.json",
                                                           "reward_shots": 1, "invalid_log_reward": -77.0})
    task = ArithmeticTask(cfg.task_args)
    ctx = task.few_shot_context(1)
    (reward,) = task.reward_funcs(model, tok, task.constraints(cfg, tok), cfg)  # the task's own reward
    assert reward.prefix
    x = tok.encode("Question: 6 - 0 - 4 = ? Answer:", add_special_tokens=False)
    z = tok.encode("6-0=6,6-4=2", add_special_tokens=False)
    mask = [True] * len(z)
    mask[4] = mask[10] = False  # the calculator wrote the "6" after "6-0=" and the final "2"
    suffix = tok.encode(". The answer is 2.", add_special_tokens=False)
    batch = RewardBatch(prompts=["q"], prompt_ids=[x], prompt_index=torch.tensor([0]), tokens=torch.tensor([z]),
                        lengths=torch.tensor([len(z)]), completions=["6-0=6,6-4=2"], columns={"num_sol": [2]},
                        tokenizer=tok, action_mask=torch.tensor([mask]))

    def brute(t):  # log p(z_1:t, Y* | C, X), one forward pass over the whole text
        full = tok.encode(ctx, add_special_tokens=False) + x + z[:t] + suffix
        start = len(full) - t - len(suffix)
        with torch.no_grad():
            lp = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
        return sum(lp[i - 1, full[i]].item() for i in range(start, len(full)))

    got = reward(batch)
    assert got.shape == (1, len(z) + 1)
    for t in range(len(z) + 1):  # the prefixes that end with a computed result: after "6-0=6" and at the end
        want = brute(t) if t in (5, 11) else -77.0
        assert got[0, t].item() == pytest.approx(want, abs=1e-4), t
    # the reward depends on the answer column
    batch.columns = {"num_sol": [9]}
    assert reward(batch)[0, 11].item() != pytest.approx(brute(11), abs=1e-4)
    # without the tool's mask no state ends with a computed result: nothing may stop, all at the floor
    batch.columns, batch.action_mask = {"num_sol": [2]}, None
    assert (reward(batch) == -77.0).all()


def test_invalid_floor_stays_below_every_valid_chain_at_every_temperature(data_dir, tmp_path):
    """The floor is tempered with everything else: floor / T + L log K must stay far below 0 for
    every T of the schedule (at T = 1.1 a floor of -200 left more mass on junk than on all chains)."""
    tok = tokenizer()
    cfg = arithmetic_config(data_dir, tmp_path, max_new_tokens=40, reward_temperature=1.3, reward_temperature_end=0.5)
    task = ArithmeticTask(cfg.task_args)
    cons = task.constraints(cfg, tok)
    floor = task.invalid_floor(cfg, cons, tok)
    log_junk = cons.max_new_tokens * math.log(len(cons.allowed_token_ids) + 1)  # log of the number of overruns
    for step in range(0, cfg.reward_temperature_horizon + 1, 10):
        assert floor / cfg.reward_temperature_at(step) + log_junk <= -50 + 1e-9
    assert floor / 1.3 + log_junk == pytest.approx(-50)  # no lower than needed at the hottest T
    (reward,) = task.reward_funcs(make_tiny_lm(vocab_size=len(tok)), tok, cons, cfg)
    assert reward.invalid_log_reward == floor


def test_training_with_the_calculator_end_to_end(data_dir, tmp_path):
    from gfnlm.trainer import GFNTrainer

    tok = tokenizer()
    model = make_tiny_lm(vocab_size=len(tok), seed=4, max_positions=256)
    cfg = arithmetic_config(data_dir, tmp_path, learning_rate=1e-2)
    task = ArithmeticTask(cfg.task_args)
    cons = task.constraints(cfg, tok)
    assert set(tok.convert_tokens_to_ids(["?", ":", "Question"])).isdisjoint(cons.allowed_token_ids)
    rewards = task.reward_funcs(model, tok, cons, cfg)  # built on the plain model, before the trainer wraps it
    batch = RewardBatch(prompts=["q"], prompt_ids=[tok.encode("Question: 5 + 3 = ? Answer:")],
                        prompt_index=torch.tensor([0]), tokens=torch.tensor([tok.encode("5+3=8")]),
                        lengths=torch.tensor([5]), completions=["5+3=8"], columns={"num_sol": [8]}, tokenizer=tok,
                        action_mask=torch.tensor([[True, True, True, True, False]]))
    before = rewards[0](batch)
    with pytest.raises(ConfigError, match="base_model_copy: true"):  # full fine-tuning would train the reward's model
        GFNTrainer(model, rewards, build_config("arithmetic", {**cfg.to_dict(), "use_peft": False}), task.dataset(), tok,
                   constraints=cons, tool=task.tool())
    trainer = GFNTrainer(model, rewards, cfg, task.dataset(), tok, constraints=cons,
                         sample_metrics=task.sample_metrics(), tool=task.tool())
    assert trainer.log_z_kind() == "none"  # the task's measured default: modified SubTB without a learned log Z
    task.prepare_trainer(trainer)
    row = [r["prompt"] for r in trainer.rows].index("Question: 6 - 0 - 4 = ? Answer:")
    seeded = trainer.buffer.entries(row)
    assert len(seeded) == 1 and tok.decode(list(seeded[0].tokens)) == "6-0=6,6-4=2"
    assert seeded[0].action_mask.count(False) == 2  # the two calculator answers are not actions
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    hist = trainer.train()
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert any(not torch.equal(p, lora[n]) for n, p in trainer.model.named_parameters() if n in lora)
    torch.testing.assert_close(rewards[0](batch), before, rtol=0, atol=0)  # the base model did not move
    report = task.evaluate(trainer.model, tok, cfg, cons, n=3)
    assert report["3"]["removed_as_in_training"] == 2 and report["3"]["questions"] == 3
    preds = task.predict(trainer.model, tok, cfg, cons, [q["str_query"] for q in task.test_sets()["3"][0][:3]],
                         k=cfg.task_args["vote_samples"], temperature=task.args.vote_temperature)
    answers = [q["num_sol"] for q in task.test_sets()["3"][0][:3]]
    assert report["3"]["vote_accuracy"] == sum(p["vote"] == a for p, a in zip(preds, answers)) / 3
    assert report["3"]["greedy_accuracy"] == sum(p["greedy"] == a for p, a in zip(preds, answers)) / 3


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random model and the arithmetic tokenizer saved as a local HF folder."""
    return save_tiny_lm(tmp_path / "tiny", tokenizer(), seed=4)


def task_arg_flags(data_dir) -> list[str]:
    return [f"--task_args.data_dir={data_dir}", "--task_args.supervised_file", "sup.json",
            "--task_args.pool_file", "pool.json", "--task_args.test_files", "3:t3.json",
            "--task_args.vote_samples", "2", "--task_args.reward_shots", "1"]


def test_eval_prints_table_4(data_dir, tiny_model_dir, tmp_path, capsys):
    from gfnlm.cli import main

    code = main(["eval", "--task", "arithmetic", "--model", str(tiny_model_dir), "-n", "2", "--shots", "0,1",
                 "--output", str(tmp_path / "t4.json")] + task_arg_flags(data_dir))
    out = capsys.readouterr().out
    assert code == 0
    assert "| k-shot CoT, k = 0 |" in out and "| k-shot CoT, k = 1 |" in out and "3 operands" in out
    assert "2 test questions removed" in out
    saved = json.loads((tmp_path / "t4.json").read_text())
    assert saved["k-shot CoT, k = 1"]["3"]["questions"] == 2


def test_sft_baseline_fits_the_labelled_rationales(data_dir, tiny_model_dir, tmp_path, capsys):
    from gfnlm.cli import main

    task_args = task_arg_flags(data_dir)
    out = tmp_path / "sft"
    assert main(["sft", "--task", "arithmetic", "--model", str(tiny_model_dir), "--max_steps", "40", "--learning_rate", "1e-2",
                 "--warmup_steps", "0", "--report_to", "[]", "--use_peft", "false", "--output_dir", str(out),
                 "--max_new_tokens", "12", "--min_new_tokens", "1", "--task_args.seed_buffer", "false"] + task_args) == 0
    printed = capsys.readouterr().out
    first, last = [float(x) for x in printed.split("nll ")[1].split(" nats")[0].split(" -> ")]
    assert last < 0.5 * first  # the labelled rationales became much more likely
    assert main(["eval", "--task", "arithmetic", "--model", str(tiny_model_dir), "-n", "2", "--shots", "0",
                 "--sft_checkpoint", str(out / "checkpoint-40")] + task_args) == 0
    table = capsys.readouterr().out
    assert "| Supervised fine-tuning |" in table and "| k-shot CoT, k = 0 |" in table


def test_fewer_labelled_rationales_change_only_what_uses_labels(data_dir, tiny_model_dir, tmp_path, capsys):
    """``task_args.labelled n`` (the paper's 10-label table): the first n labelled questions seed the
    buffer, are the SFT data and the up-weighted rows, on the CLI path; the test questions stay the same."""
    from gfnlm.cli import main, make_trainer

    write(data_dir / "t3b.json", generate_questions(3, 3, seed=5) + [json.loads((data_dir / "sup.json").read_text())[1]])
    args = {"data_dir": str(data_dir), "supervised_file": "sup.json", "pool_file": "pool.json",
            "test_files": "3:t3.json,b:t3b.json", "reward_shots": 1}
    cfg = build_config("arithmetic", {"model": str(tiny_model_dir), "report_to": [], "output_dir": str(tmp_path / "r"),
                                      "task_args": {**args, "labelled": 1}})
    task, trainer = make_trainer(cfg)
    weighted = [r["prompt"] for r in trainer.rows if r["weight"] == task.args.supervised_weight]
    assert weighted == ["Question: 6 - 0 - 4 = ? Answer:"] and len(trainer.rows) == 1 + 6
    seeded = {trainer.rows[i]["prompt"] for i in range(len(trainer.rows)) if trainer.buffer.entries(i)}
    assert seeded == {"Question: 6 - 0 - 4 = ? Answer:"}
    every = ArithmeticTask(args).test_sets()
    assert task.test_sets() == every and every["b"][1] == 1  # the unused labelled question still leaves the test set
    with pytest.raises(ConfigError, match="only 1 labelled questions are in use"):
        task.few_shot_context(2)
    with pytest.raises(ConfigError, match=r"task_args.labelled=3: sup.json has 2 labelled questions; give 1 to 2"):
        ArithmeticTask({**args, "labelled": 3}).supervised()
    assert main(["sft", "--task", "arithmetic", "--model", str(tiny_model_dir), "--max_steps", "1", "--report_to", "[]",
                 "--output_dir", str(tmp_path / "sft"), "--max_new_tokens", "12", "--min_new_tokens", "1",
                 "--task_args.labelled", "1"] + task_arg_flags(data_dir)) == 0
    assert "on 1 labelled completions" in capsys.readouterr().out


def test_question_generator_command_writes_a_loadable_file(tmp_path):
    from gfnlm.tasks.arithmetic import main

    out = tmp_path / "q5.json"
    assert main(["--n", "20", "--operands", "5", "--seed", "4", "--out", str(out)]) == 0
    rows = load_questions(out)  # checks every answer against the expression
    assert len(rows) == 20 and all(question_expression(r["str_query"]).count(" ") == 8 for r in rows)
    assert main(["--operands", "1"]) == 2


def test_gfn_training_can_start_from_an_sft_checkpoint(data_dir, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from gfnlm.cli import main, make_trainer
    from gfnlm.errors import GFNLMError

    flags = task_arg_flags(data_dir)
    sft = tmp_path / "sft"
    assert main(["sft", "--task", "arithmetic", "--model", str(tiny_model_dir), "--max_steps", "3", "--report_to", "[]",
                 "--learning_rate", "1e-2", "--output_dir", str(sft), "--max_new_tokens", "12", "--min_new_tokens", "1",
                 "--task_args.seed_buffer", "false"] + flags) == 0
    saved = load_file(sft / "checkpoint-3" / "adapter" / "adapter_model.safetensors")
    args = {"data_dir": str(data_dir), "supervised_file": "sup.json", "pool_file": "pool.json", "test_files": "3:t3.json",
            "reward_shots": 1}
    cfg = build_config("arithmetic", {"model": str(tiny_model_dir), "init_from": str(sft / "checkpoint-3"),
                                      "max_steps": 2, "report_to": [], "disable_tqdm": True, "max_new_tokens": 12,
                                      "min_new_tokens": 1, "output_dir": str(tmp_path / "gfn"), "learning_rate": 1e-2,
                                      "task_args": args})
    _, trainer = make_trainer(cfg)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert start and all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)
    for name, value in saved.items():  # the SFT adapter is where GFlowNet training starts
        match = [n for n in start if n.replace(".default", "") == name]
        assert match and torch.equal(start[match[0]], value)
    trainer.train()
    assert any(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters() if n in start)
    with pytest.raises(GFNLMError, match="set --model"):
        make_trainer(build_config("arithmetic", {"model": "smollm2-135m", "init_from": str(sft / "checkpoint-3"),
                                                 "task_args": args}))
