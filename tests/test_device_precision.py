"""Where tensors live and in which precision: the merged-adapter sampler is the policy, sampling draws
one uniform per row and step from a generator on any device, and under mixed precision the rewards
and the loss's log q still come from fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.config import GFNConfig
from gfnlm.errors import ConfigError
from gfnlm.policy import _lora_merge_plan, fp32_logits, merged_adapters
from gfnlm.rewards import LMLikelihoodReward, RewardBatch
from gfnlm.sampling import Constraints, draw, episode_uniforms, sample
from gfnlm.scoring import score
from gfnlm.trainer import GFNTrainer

PROMPTS = [[1, 3], [1, 4, 5], [1]]


def lora_model(seed=3, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(make_tiny_lm(seed=seed), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                               init_lora_weights=False, **kw))
    return model.eval()


def test_merged_adapter_sampling_is_the_policy_and_leaves_every_weight_as_it_was():
    model = lora_model()
    assert _lora_merge_plan(model)  # every LoRA layer can be folded
    params = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    c = Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=6)
    idx = torch.tensor([0, 1, 2] * 8)
    merged = sample(model, PROMPTS, idx, c, temperature=1.2, generator=torch.Generator().manual_seed(5),
                    fast_decode=False)  # the model's own forward, with the adapters folded in
    plain = sample(model, PROMPTS, idx, c, temperature=1.2, generator=torch.Generator().manual_seed(5),
                   merge_adapters=False, fast_decode=False)
    # the same uniforms through the same distribution (up to float rounding): the same episodes
    assert torch.equal(merged.tokens, plain.tokens) and torch.equal(merged.lengths, plain.lengths)
    torch.testing.assert_close(merged.log_pf, plain.log_pf, atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(plain.log_pterm)
    assert torch.equal(fin, torch.isfinite(merged.log_pterm))
    torch.testing.assert_close(merged.log_pterm[fin], plain.log_pterm[fin], atol=1e-5, rtol=1e-5)
    # and what was sampled is what the teacher-forced pass of the adapted model scores
    sc = score(model, PROMPTS, merged.prompt_index, merged.tokens, merged.lengths, c)
    torch.testing.assert_close(merged.log_pf, sc.log_pf.detach(), atol=1e-5, rtol=1e-5)
    # every parameter is the same tensor with the same bits and the same requires_grad flag
    for n, p in model.named_parameters():
        obj, before, flag = params[n]
        assert p is obj and torch.equal(p.detach(), before) and p.requires_grad == flag, n
    assert all(not m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))


def test_adapters_that_cannot_be_folded_run_as_they_are():
    model = lora_model(use_dora=True)
    assert _lora_merge_plan(model) is None
    c = Constraints(stop_token_ids=[2], max_new_tokens=4)
    s = sample(model, PROMPTS, [0, 1, 2, 0], c, generator=torch.Generator().manual_seed(0))
    sc = score(model, PROMPTS, s.prompt_index, s.tokens, s.lengths, c)
    torch.testing.assert_close(s.log_pf, sc.log_pf.detach(), atol=1e-5, rtol=1e-5)
    with merged_adapters(model) as m:  # the context hands back the model untouched
        assert m is model and not any(x.disable_adapters for x in model.modules() if hasattr(x, "lora_A"))


def test_a_seed_gives_the_same_episodes_and_a_draw_never_takes_a_zero_mass_action():
    model = make_tiny_lm(seed=4)
    c = Constraints(stop_token_ids=[2], max_new_tokens=5, allowed_token_ids=[3, 5, 7])
    a = sample(model, PROMPTS, [0, 1, 2] * 3, c, generator=torch.Generator().manual_seed(9))
    b = sample(model, PROMPTS, [0, 1, 2] * 3, c, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    u = episode_uniforms(torch.Generator().manual_seed(9), 5, 9, "cpu")
    assert u.shape == (5, 9) and torch.equal(u, torch.rand((5, 9), generator=torch.Generator().manual_seed(9)))
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    # u = 0 and u just below 1 (whose product with the total may round up to it) land on mass
    got = draw(probs, torch.tensor([0.0, 0.25, 0.75, 1.0 - 2 ** -24]))
    assert got.tolist() == [1, 1, 3, 3]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one mixed-precision setting per process: tests that change it start and end
    with a fresh state, as a new process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def python_config(tmp_path, **kw) -> GFNConfig:
    base = dict(max_new_tokens=3, allowed_tokens=["a", "b", "c"], chat_template="never", report_to=[],
                disable_tqdm=True, learning_rate=5e-2, warmup_steps=0, samples_per_prompt=4, max_steps=2,
                output_dir=str(tmp_path))
    return GFNConfig(**{**base, **kw})


def fixed_batch(tok) -> RewardBatch:
    comps = [[3, 4], [5], [4, 4, 3]]
    tokens = torch.zeros(3, 3, dtype=torch.long)
    for i, comp in enumerate(comps):
        tokens[i, :len(comp)] = torch.tensor(comp)
    return RewardBatch(prompts=["p0", "p1", "p1"], prompt_ids=[[1, 3], [1, 4, 5]], prompt_index=torch.tensor([0, 1, 1]),
                       tokens=tokens, lengths=torch.tensor([2, 1, 3]), completions=[tok.decode(x) for x in comps],
                       tokenizer=tok)


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 autocast needs CUDA (tested below: a one-line error without it)"))])
def test_mixed_precision_policy_trains_while_the_reward_and_the_loss_log_q_stay_fp32(tmp_path, fresh_accelerate_state,
                                                                                    precision):
    tok = make_tiny_tokenizer()
    batch = fixed_batch(tok)
    reference = LMLikelihoodReward(make_tiny_lm(seed=8, vocab_size=6), stop_token_ids=[2])(batch)
    model = make_tiny_lm(seed=8, vocab_size=6)
    reward = LMLikelihoodReward(model, stop_token_ids=[2])
    trainer = GFNTrainer(model, reward, python_config(tmp_path, mixed_precision=precision), train_dataset=["<s>", "<s> a"],
                         processing_class=tok)
    seen, body = [], []
    head = trainer.model.get_output_embeddings()
    proj = next(m for n, m in trainer.model.named_modules() if n.endswith("layers.0.mlp.down_proj"))
    hooks = [head.register_forward_hook(lambda m, i, o: seen.append(o.dtype)),
             proj.register_forward_hook(lambda m, i, o: body.append(o.dtype))]
    history = trainer.train()
    for h in hooks:
        h.remove()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert seen and set(seen) == {torch.float32}  # every logit, sampled or scored, is fp32
    assert {"bf16": torch.bfloat16, "fp16": torch.float16}[precision] in body  # while the body ran in low precision
    # the reward after bf16 training equals a never-trained fp32 copy's, to fp32 rounding
    torch.testing.assert_close(reward(batch), reference, atol=1e-6, rtol=1e-6)
    ep = trainer._collect()
    with trainer.accelerator.autocast():
        log_pf, log_pterm, _ = trainer.policy(ep.prompts, ep.prompt_index, ep.tokens, ep.lengths, trainer.constraints,
                                              trainer.pad_id, ep.action_mask)
    assert log_pf.dtype == torch.float32 and log_pterm.dtype == torch.float32


def test_an_unknown_precision_and_fp16_without_a_gpu_are_one_line_errors(tmp_path, fresh_accelerate_state):
    with pytest.raises(ConfigError, match="mixed_precision 'fp8'.*choose no, bf16 or fp16"):
        GFNConfig(mixed_precision="fp8")
    if torch.cuda.is_available():
        return
    model = make_tiny_lm(vocab_size=6)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        GFNTrainer(model, LMLikelihoodReward(model, stop_token_ids=[2]), python_config(tmp_path, mixed_precision="fp16"),
                   train_dataset=["<s>"], processing_class=make_tiny_tokenizer())


def test_fp32_logits_survives_a_deep_copy():
    model = fp32_logits(make_tiny_lm(seed=2))
    dup = copy.deepcopy(model)
    with torch.no_grad():
        dup.get_output_embeddings().weight.add_(1.0)
        ids = torch.tensor([[1, 3, 4]])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = model(input_ids=ids).logits, dup(input_ids=ids).logits
    assert a.dtype == torch.float32 and not torch.allclose(a, b)  # each copy reads its own head


def test_a_launcher_precision_the_config_does_not_share_is_a_one_line_error(tmp_path, monkeypatch, fresh_accelerate_state):
    """`accelerate launch --mixed_precision bf16` with a config left at `no`: gfnlm's field would silently
    win (an explicit Accelerator argument overrides the launcher), so the run stops and says how to choose."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    model = make_tiny_lm(vocab_size=6)
    with pytest.raises(ConfigError, match="accelerate launch asks for mixed precision bf16.*mixed_precision: bf16"):
        GFNTrainer(model, LMLikelihoodReward(model, stop_token_ids=[2]), python_config(tmp_path),
                   train_dataset=["<s>"], processing_class=make_tiny_tokenizer())


def test_an_fsdp_launch_accelerate_turns_into_something_else_is_a_one_line_error(tmp_path, monkeypatch,
                                                                                fresh_accelerate_state):
    """`accelerate launch` with an FSDP config on a machine where Accelerate does not run FSDP (on CPU it
    falls back to DDP without a word): the run stops instead of training under another strategy."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = make_tiny_lm(vocab_size=6)
    with pytest.raises(ConfigError, match="asked for FSDP but Accelerate runs"):
        GFNTrainer(model, LMLikelihoodReward(model, stop_token_ids=[2]), python_config(tmp_path),
                   train_dataset=["<s>"], processing_class=make_tiny_tokenizer())
