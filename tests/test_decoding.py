"""The lean Llama decoder (gfnlm.decoding) is the model: its logits against the model's own forward
over the whole sequence, one row at a time; the sampler draws the same episodes with it as through the
model's forward; and it steps aside wherever it could not reproduce the model."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_lm
from gfnlm.decoding import _ONEDNN, LlamaDecoder
from gfnlm.policy import base_model
from gfnlm.sampling import Constraints, PrefixCache, encode_prompts, pad_prompts, sample
from gfnlm.scoring import score

V = 24
PROMPTS = [[1, 3], [1, 4, 5, 6], [1]]


def gqa_llama(seed=0, **kw):
    """A tiny Llama with grouped-query attention (4 query heads over 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False), **kw})
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


def decode_and_check(model, rows: torch.Tensor, steps: int, prefix: list[int] | None = None, compiled=False):
    """Step the decoder (``compiled``: its step through torch.compile) through random tokens after
    ``PROMPTS[rows]`` and compare every step's logits with the brute-force forward of that row's whole
    sequence."""
    dec = LlamaDecoder.for_model(model, len(rows), compiled)
    assert dec is not None
    p_ids, p_mask = pad_prompts(PROMPTS, 0)
    with torch.no_grad():
        _, cache, mask = encode_prompts(model, p_ids, p_mask, prefix=PrefixCache(model, prefix) if prefix else None)
    cache.batch_select_indices(rows)
    attn = mask[rows]
    kv = dec.begin(cache, attn, steps)
    tokens = torch.randint(3, V, (len(rows), steps), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in range(steps):
            logits = dec.step(kv, tokens[:, t], attn.sum(-1) + t)
            for b, r in enumerate(rows.tolist()):
                ids = (prefix or []) + PROMPTS[r] + tokens[b, : t + 1].tolist()
                torch.testing.assert_close(logits[b], one_row_logits(model, ids), atol=1e-5, rtol=1e-5)
    return dec


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_decoder_logits_equal_the_models_forward_over_the_whole_sequence(lora):
    model = with_lora(gqa_llama()) if lora else gqa_llama()
    dec = decode_and_check(model, torch.tensor([0, 1, 2, 1]), steps=5)
    # frozen fp32 base weights on a CPU with oneDNN are packed once; trainable ones (this plain model) are not
    assert (dec.pack_rows is not None) == (lora and _ONEDNN)


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
    # another batch size: the pack for 3 rows still gives the same logits; a second call repacks
    packed_for_3 = decode_and_check(merged, torch.tensor([2, 1]), steps=2)
    assert packed_for_3.pack_rows in (None, 3)
    assert decode_and_check(merged, torch.tensor([0, 2]), steps=2).pack_rows in (None, 2)


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


def test_decoder_follows_the_adapters_as_they_train_and_switch():
    model = with_lora(gqa_llama(seed=7))
    rows = torch.tensor([0, 1, 2])
    decode_and_check(model, rows, steps=2)
    with torch.no_grad():  # an optimiser step on the adapters after the decoder was built
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    decode_and_check(model, rows, steps=2)
    from peft import LoraConfig

    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    model.set_adapter("other")  # a second adapter on some layers only: empty blocks in the fused update
    decode_and_check(model, rows, steps=2)


def test_decoder_reproduces_llama_variants():
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    model = gqa_llama(seed=8, head_dim=16, rope_parameters=rope, attn_implementation="eager")
    assert model.model.layers[0].self_attn.head_dim == 16  # not hidden / heads (8)
    decode_and_check(with_lora(model, use_rslora=True, rank_pattern={"q_proj": 2}), torch.tensor([1, 2]), steps=3)


def test_sampling_inside_merged_adapters_after_a_sample_sees_the_folded_weights():
    from gfnlm.policy import merged_adapters

    model = with_lora(gqa_llama(seed=9))
    c = Constraints(stop_token_ids=[2], max_new_tokens=5)
    idx = torch.tensor([0, 1, 2, 0])
    ref = sample(model, PROMPTS, idx, c, generator=torch.Generator().manual_seed(3))
    with merged_adapters(model) as m:  # base weights swapped for W + scale B A, adapters off
        got = sample(m, PROMPTS, idx, c, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ref.tokens, got.tokens)
    torch.testing.assert_close(ref.log_pf, got.log_pf, atol=1e-5, rtol=1e-5)


def test_two_batches_decode_at_once_on_one_model():
    model = with_lora(gqa_llama(seed=10))
    dec = LlamaDecoder.for_model(model, 2)
    p_ids, p_mask = pad_prompts(PROMPTS, 0)
    with torch.no_grad():
        _, c1, m1 = encode_prompts(model, p_ids, p_mask)
        _, c2, m2 = encode_prompts(model, p_ids, p_mask)
    r1, r2 = torch.tensor([0, 1]), torch.tensor([2, 1])
    c1.batch_select_indices(r1)
    c2.batch_select_indices(r2)
    kv1, kv2 = dec.begin(c1, m1[r1], 2), dec.begin(c2, m2[r2], 2)
    with torch.no_grad():
        for t, tok in enumerate([5, 6]):
            ids = torch.tensor([tok, tok])
            for kv, rows, m in ((kv1, r1, m1), (kv2, r2, m2)):  # interleaved: each keeps its own cache
                logits = dec.step(kv, ids, m[rows].sum(-1) + t)
                for b, r in enumerate(rows.tolist()):
                    ref = one_row_logits(model, PROMPTS[r] + [5, 6][: t + 1])
                    torch.testing.assert_close(logits[b], ref, atol=1e-5, rtol=1e-5)


def test_merged_or_hooked_models_keep_their_own_forward():
    model = with_lora(gqa_llama(seed=11))
    model.merge_adapter()
    assert LlamaDecoder.for_model(model, 2) is None
    with model.disable_adapter():  # merged and switched off: still the model's forward
        assert LlamaDecoder.for_model(model, 2) is None
    plain = gqa_llama(seed=12)
    handle = plain.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: out * 2)
    assert LlamaDecoder.for_model(plain, 2) is None
    handle.remove()
    assert LlamaDecoder.for_model(plain, 2) is not None


# ------------------------------------------------------------------ compiled step (compile_decoder)


def test_compiled_decoder_logits_equal_the_models_forward_for_any_prompt_length():
    """The compiled step is the model: logits against the brute-force forward at every step, for
    LoRA and plain weights and two cache lengths (the cache length is dynamic: no recompilation)."""
    from gfnlm.decoding import _compilations

    model = with_lora(gqa_llama(seed=8))
    dec = decode_and_check(model, torch.tensor([0, 1, 2, 1]), steps=5, compiled=True)
    assert dec.compiled
    graphs = _compilations()
    decode_and_check(model, torch.tensor([0, 1, 2, 1]), steps=3, compiled=True, prefix=[1, 7, 8])  # longer cache
    with base_model(model):  # adapters off: the same compiled body without the LoRA products
        decode_and_check(model, torch.tensor([2, 0, 1, 1]), steps=2, compiled=True)
    assert _compilations() - graphs <= 1  # at most the adapter-free variant compiled again


def test_compiled_decoder_without_packed_weights_is_the_model(monkeypatch):
    """The compiled body over weights read as they are (no oneDNN packing: the path a GPU, or a CPU
    without oneDNN, takes), with LoRA products on the frozen base: logits against brute force."""
    import gfnlm.decoding as decoding

    monkeypatch.setattr(decoding, "_ONEDNN", False)
    model = with_lora(gqa_llama(seed=11))
    dec = decode_and_check(model, torch.tensor([1, 0, 2]), steps=4, compiled=True)
    assert dec.compiled and dec.pack_rows is None


def test_sampler_draws_the_same_episodes_with_the_compiled_decoder():
    model = with_lora(gqa_llama(seed=9))
    c = Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=7)
    idx = torch.tensor([0, 1, 2] * 4)
    runs = [sample(model, PROMPTS, idx, c, temperature=1.3, epsilon=0.1, generator=torch.Generator().manual_seed(5),
                   compile_decoder=compiled) for compiled in (True, False)]
    fast, eager = runs
    assert fast.lengths.min() < c.max_new_tokens
    assert torch.equal(fast.tokens, eager.tokens) and torch.equal(fast.lengths, eager.lengths)
    torch.testing.assert_close(fast.log_pf, eager.log_pf, atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(eager.log_pterm)
    assert torch.equal(fin, torch.isfinite(fast.log_pterm))
    torch.testing.assert_close(fast.log_pterm[fin], eager.log_pterm[fin], atol=1e-5, rtol=1e-5)


def test_a_failed_compilation_is_a_one_line_config_error(monkeypatch):
    """Where torch.compile cannot build the step (e.g. no C++ compiler), the user gets one line naming
    the switch to turn off, not a compiler traceback."""
    import gfnlm.decoding as decoding
    from gfnlm.errors import ConfigError

    def no_compiler(*args):
        cause = RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, cause, None)

    monkeypatch.setattr(decoding, "_COMPILED_BODY", no_compiler)
    model = with_lora(gqa_llama(seed=10))
    c = Constraints(stop_token_ids=[2], max_new_tokens=3)
    with pytest.raises(ConfigError) as e:
        sample(model, PROMPTS, [0, 1], c, compile_decoder=True)
    msg = str(e.value)
    assert "\n" not in msg and "compile_decoder" in msg and "C++ compiler" in msg
