"""The lean Llama decoder (gfnlm.decoding) is the model: its logits against the model's own forward
over the whole sequence, one row at a time; the sampler draws the same episodes with it as through the
model's forward; and it steps aside wherever it could not reproduce the model."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_lm
from gfnlm.decoding import _MKL, LlamaDecoder
from gfnlm.policy import base_model
from gfnlm.sampling import Constraints, PrefixCache, encode_prompts, pad_prompts, sample
from gfnlm.scoring import score

V = 24
PROMPTS = [[1, 3], [1, 4, 5, 6], [1]]


def gqa_llama(seed=0):
    """A tiny Llama with grouped-query attention (4 query heads over 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def with_lora(model, seed=1, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kw.setdefault("target_modules", "all-linear")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, **kw)).eval()


def one_row_logits(model, ids: list[int]) -> torch.Tensor:
    """Brute force: the model's forward over one unpadded sequence; last position's logits [V]."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def decode_and_check(model, rows: torch.Tensor, steps: int, prefix: list[int] | None = None):
    """Step the decoder through random tokens after ``PROMPTS[rows]`` and compare every step's logits
    with the brute-force forward of that row's whole sequence."""
    dec = LlamaDecoder.for_model(model, len(rows))
    assert dec is not None
    p_ids, p_mask = pad_prompts(PROMPTS, 0)
    with torch.no_grad():
        _, cache, mask = encode_prompts(model, p_ids, p_mask, prefix=PrefixCache(model, prefix) if prefix else None)
    cache.batch_select_indices(rows)
    attn = mask[rows]
    dec.begin(cache, attn, steps)
    tokens = torch.randint(3, V, (len(rows), steps), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in range(steps):
            logits = dec.step(tokens[:, t], attn.sum(-1) + t)
            for b, r in enumerate(rows.tolist()):
                ids = (prefix or []) + PROMPTS[r] + tokens[b, : t + 1].tolist()
                torch.testing.assert_close(logits[b], one_row_logits(model, ids), atol=1e-5, rtol=1e-5)
    return dec


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_decoder_logits_equal_the_models_forward_over_the_whole_sequence(lora):
    model = with_lora(gqa_llama()) if lora else gqa_llama()
    dec = decode_and_check(model, torch.tensor([0, 1, 2, 1]), steps=5)
    # frozen fp32 base weights on a CPU with MKL are packed once; trainable ones (this plain model) are not
    assert (dec.pack_rows is not None) == (lora and _MKL)


def test_decoder_reads_a_prefix_cache_and_a_model_with_tied_embeddings():
    model = with_lora(make_tiny_lm(vocab_size=V, seed=2))
    decode_and_check(model, torch.tensor([2, 0, 1]), steps=4, prefix=[1, 7, 8])


def test_sampler_draws_the_same_episodes_with_the_decoder_as_through_the_models_forward():
    model = with_lora(gqa_llama(seed=3))
    c = Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=7)
    idx = torch.tensor([0, 1, 2] * 6)
    temps = torch.linspace(0.7, 1.5, len(idx))
    runs = [sample(model, PROMPTS, idx, c, temperature=temps, epsilon=0.1, generator=torch.Generator().manual_seed(11),
                   prefix=PrefixCache(model, [1, 9]), **kw)
            for kw in ({}, {"fast_decode": False}, {"fast_decode": False, "merge_adapters": False})]
    fast = runs[0]
    assert fast.lengths.min() < c.max_new_tokens  # some episodes stopped early: stopping was exercised
    for other in runs[1:]:
        assert torch.equal(fast.tokens, other.tokens) and torch.equal(fast.lengths, other.lengths)
        torch.testing.assert_close(fast.log_pf, other.log_pf, atol=1e-5, rtol=1e-5)
        fin = torch.isfinite(other.log_pterm)
        assert torch.equal(fin, torch.isfinite(fast.log_pterm))
        torch.testing.assert_close(fast.log_pterm[fin], other.log_pterm[fin], atol=1e-5, rtol=1e-5)


def test_decoder_with_adapters_switched_off_is_the_base_model():
    model = with_lora(gqa_llama(seed=4))
    with base_model(model):
        decode_and_check(model, torch.tensor([1, 0]), steps=3)


def test_packed_weights_follow_the_weights_they_were_packed_from():
    model = with_lora(gqa_llama(seed=5))
    rows = torch.tensor([0, 1, 2])
    first = decode_and_check(model, rows, steps=2)
    w = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
    with torch.no_grad():
        w.mul_(1.5)  # an in-place write to a frozen base weight
    assert decode_and_check(model, rows, steps=2) is not first
    merged = model.merge_and_unload()  # LoRA folded in and its layers replaced by the base modules
    decode_and_check(merged, rows, steps=2)


def test_decoder_steps_aside_where_it_cannot_reproduce_the_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert LlamaDecoder.for_model(GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                                                                  eos_token_id=2)), 2) is None
    assert LlamaDecoder.for_model(with_lora(gqa_llama(), use_dora=True), 2) is None
    assert LlamaDecoder.for_model(with_lora(gqa_llama(), target_modules=["q_proj", "embed_tokens"]), 2) is None
    dropout = with_lora(gqa_llama(), lora_dropout=0.2)
    assert LlamaDecoder.for_model(dropout, 2) is not None  # eval mode: dropout is off
    dropout.train()
    assert LlamaDecoder.for_model(dropout, 2) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LlamaDecoder.for_model(gqa_llama(), 2) is None
    # where it steps aside the sampler still samples the policy (the model's own forward)
    model = with_lora(gqa_llama(seed=6), use_dora=True)
    c = Constraints(stop_token_ids=[2], max_new_tokens=4)
    s = sample(model, PROMPTS, [0, 1, 2, 0], c, generator=torch.Generator().manual_seed(0))
    sc = score(model, PROMPTS, s.prompt_index, s.tokens, s.lengths, c)
    torch.testing.assert_close(s.log_pf, sc.log_pf.detach(), atol=1e-5, rtol=1e-5)
