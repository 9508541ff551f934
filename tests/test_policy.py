"""The policy is wrapped once and LM rewards read the base model only: the reward of a fixed batch
does not move while the adapters (or, with a frozen copy, all weights) are trained."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.config import GFNConfig
from gfnlm.errors import ConfigError
from gfnlm.policy import BaseLM, base_model
from gfnlm.rewards import LMLikelihoodReward, RewardBatch
from gfnlm.trainer import GFNTrainer


def fixed_batch(tok, prompt_ids=((1, 3), (1, 4, 5))) -> RewardBatch:
    comps = [[3, 4], [5], [4, 4, 3]]
    index = [0, 1, 1]
    tokens = torch.zeros(len(comps), 3, dtype=torch.long)
    for i, c in enumerate(comps):
        tokens[i, :len(c)] = torch.tensor(c)
    return RewardBatch(prompts=["p0", "p1", "p1"], prompt_ids=[list(p) for p in prompt_ids],
                       prompt_index=torch.tensor(index), tokens=tokens, lengths=torch.tensor([len(c) for c in comps]),
                       completions=[tok.decode(c) for c in comps], tokenizer=tok)


def lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, **kw)


def test_base_model_of_the_plain_handle_switches_off_injected_adapters():
    """The measured leak: PEFT injects LoRA into the plain model in place; the plain handle must
    still give the base model's logits."""
    from peft import get_peft_model

    raw, reference = make_tiny_lm(seed=3), make_tiny_lm(seed=3)
    torch.manual_seed(0)
    peft_model = get_peft_model(raw, lora_config(init_lora_weights=False))
    x = torch.tensor([[1, 3, 4, 5]])
    with torch.no_grad():
        want = reference(input_ids=x).logits
        adapted = peft_model(input_ids=x).logits
        assert not torch.allclose(adapted, want, atol=1e-3)  # the adapters do change the outputs
        for handle in (raw, peft_model):
            with base_model(handle) as m:
                torch.testing.assert_close(m(input_ids=x).logits, want)
        torch.testing.assert_close(peft_model(input_ids=x).logits, adapted)  # switched back on afterwards


def trained_reward_check(trainer: GFNTrainer, reward, batch, reference_reward) -> None:
    before = reward(batch)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters() if n in weights)
    # every step's figures are in the run's history file: log R per kind of episode, length, forced stops
    import json
    from pathlib import Path

    hist = json.loads((Path(trainer.args.output_dir) / "history.json").read_text())
    assert hist == json.loads(json.dumps(trainer.history)) and len(hist) == trainer.args.max_steps
    for key in ("loss", "reward/log_r_on_policy", "episodes/length_mean", "episodes/forced_stop_fraction"):
        assert all(key in h for h in hist), key
    after = reward(batch)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(after, reference_reward(batch), rtol=0, atol=1e-6)  # a never-trained copy


def python_config(tmp_path, **kw) -> GFNConfig:
    base = dict(max_new_tokens=3, allowed_tokens=["a", "b", "c"], chat_template="never", report_to=[],
                disable_tqdm=True, learning_rate=5e-2, warmup_steps=0, samples_per_prompt=4, max_steps=3,
                output_dir=str(tmp_path))
    return GFNConfig(**{**base, **kw})


def test_python_path_with_a_plain_model_keeps_the_base_reward(tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_lm(seed=7, vocab_size=6)
    reward = LMLikelihoodReward(model, stop_token_ids=[2])  # built on the plain model, before wrapping
    trainer = GFNTrainer(model, reward, python_config(tmp_path, lora_r=4, lora_alpha=32),
                         train_dataset=["<s>", "<s> a"], processing_class=tok)
    assert trainer.model is not model and getattr(trainer.model, "peft_config", None)
    reference = LMLikelihoodReward(make_tiny_lm(seed=7, vocab_size=6), stop_token_ids=[2])
    trained_reward_check(trainer, reward, fixed_batch(tok), reference)


def test_full_fine_tuning_needs_a_frozen_copy(tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_lm(seed=8, vocab_size=6)
    reward = LMLikelihoodReward(model, stop_token_ids=[2])
    with pytest.raises(ConfigError, match="base_model_copy: true"):
        GFNTrainer(model, reward, python_config(tmp_path, use_peft=False), train_dataset=["<s>"], processing_class=tok)
    trainer = GFNTrainer(model, reward, python_config(tmp_path, use_peft=False, base_model_copy=True, learning_rate=1e-2),
                         train_dataset=["<s>", "<s> a"], processing_class=tok)
    assert reward.base_lm.frozen_copy and not reward.base_lm.shares_weights_with(trainer.model)
    reference = LMLikelihoodReward(make_tiny_lm(seed=8, vocab_size=6), stop_token_ids=[2])
    trained_reward_check(trainer, reward, fixed_batch(tok), reference)


def test_base_lm_handle_is_no_grad_eval_and_restores_the_mode():
    model = make_tiny_lm(seed=9)
    model.train()
    handle = BaseLM(BaseLM(model))  # a handle of a handle reads the same model
    with handle() as m:
        assert m is model and not m.training and not torch.is_grad_enabled()
    assert model.training


def test_cli_path_reward_is_the_base_model_before_and_after_training(tmp_path):
    """make_trainer for a task with an LM reward (arithmetic): the reward's model is the wrapped
    policy, read with adapters off, and equals the reward built on a freshly loaded base model."""
    from test_arithmetic import generate_questions, tokenizer, write

    from gfnlm.cli import make_trainer
    from gfnlm.models import load_model
    from gfnlm.tasks import build_config

    sup = [{"str_query": "Question: 5 + 3 = ? Answer:", "num_sol": 8, "str_rationale": "5 + 3 =",
            "str_sol": ". The answer is 8."}]
    write(tmp_path / "sup.json", sup)
    write(tmp_path / "pool.json", generate_questions(4, 3, seed=1))
    write(tmp_path / "t3.json", generate_questions(2, 3, seed=2))
    tok = tokenizer()
    model_dir = tmp_path / "tiny"
    make_tiny_lm(vocab_size=len(tok), seed=4, max_positions=256).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    args = {"data_dir": str(tmp_path), "supervised_file": "sup.json", "pool_file": "pool.json",
            "test_files": "3:t3.json", "reward_shots": 1}
    cfg = build_config("arithmetic", {"model": str(model_dir), "task_args": args, "max_steps": 3, "report_to": [],
                                      "disable_tqdm": True, "output_dir": str(tmp_path / "run"), "max_new_tokens": 12,
                                      "min_new_tokens": 1, "samples_per_prompt": 4, "learning_rate": 5e-2,
                                      "warmup_steps": 0})
    task, trainer = make_trainer(cfg)
    (reward,) = trainer.rewards
    assert reward.base_lm.module is trainer.model  # built on the wrapped policy, not on a model wrapped later
    batch = RewardBatch(prompts=["q"], prompt_ids=[tok.encode("Question: 5 + 3 = ? Answer:")],
                        prompt_index=torch.tensor([0]), tokens=torch.tensor([tok.encode("5+3=8")]),
                        lengths=torch.tensor([5]), completions=["5+3=8"], columns={"num_sol": [8]}, tokenizer=tok,
                        action_mask=torch.tensor([[True, True, True, True, False]]))
    fresh, _ = load_model(str(model_dir))
    (reference,) = task.reward_funcs(fresh, tok, trainer.constraints, cfg)
    trained_reward_check(trainer, reward, batch, reference)


def test_base_model_restores_requires_grad_flags():
    """PEFT's adapter switch sets requires_grad; a frozen (evaluation) PeftModel stays frozen."""
    from peft import get_peft_model

    peft_model = get_peft_model(make_tiny_lm(seed=4), lora_config())
    for p in peft_model.parameters():
        p.requires_grad_(False)
    with base_model(peft_model):
        pass
    assert not any(p.requires_grad for p in peft_model.parameters())


def test_resuming_with_another_dataset_is_an_error(tmp_path):
    from gfnlm.errors import DataError

    tok = make_tiny_tokenizer()
    kw = dict(train_dataset=["<s>", "<s> a"], processing_class=tok)
    reward = LMLikelihoodReward(make_tiny_lm(seed=7, vocab_size=6), stop_token_ids=[2])
    tr = GFNTrainer(make_tiny_lm(seed=7, vocab_size=6), reward, python_config(tmp_path, max_steps=1), **kw)
    tr.train()
    other = GFNTrainer(make_tiny_lm(seed=7, vocab_size=6), reward, python_config(tmp_path, max_steps=2),
                       train_dataset=["<s> a", "<s>"], processing_class=tok)
    with pytest.raises(DataError, match="written for another dataset"):
        other.train(resume_from_checkpoint=True)
    same = GFNTrainer(make_tiny_lm(seed=7, vocab_size=6), reward, python_config(tmp_path, max_steps=2), **kw)
    same.train(resume_from_checkpoint=True)
    assert same.step == 2
