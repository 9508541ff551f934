"""Rewards: TRL-style callables, the LM-likelihood prefix reward, weighting and checks."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.errors import RewardError
from gfnlm.rewards import (
    CallableReward,
    LMLikelihoodReward,
    PrefixRuleReward,
    Reward,
    RewardBatch,
    as_reward,
    compute_log_rewards,
)
from gfnlm.sampling import Constraints

PROMPT_IDS = [[1], [1, 3, 5]]
COMPS = [[3, 4], [], [5, 5, 3], [4], [3, 3, 3, 4]]
INDEX = [0, 1, 1, 0, 1]


def make_batch(comps=COMPS, index=INDEX, columns=None, tok=None, action_mask=None) -> RewardBatch:
    tok = tok or make_tiny_tokenizer()
    n = max(len(c) for c in comps)
    tokens = torch.zeros(len(comps), n, dtype=torch.long)
    for i, c in enumerate(comps):
        tokens[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    mask = None
    if action_mask is not None:  # one list of bools per row (False: a tool wrote the token), padded with False
        mask = torch.zeros(len(comps), n, dtype=torch.bool)
        for i, m in enumerate(action_mask):
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    texts = ["<s>", "<s> a c"]
    return RewardBatch(
        prompts=[texts[i] for i in index],
        prompt_ids=PROMPT_IDS,
        prompt_index=torch.tensor(index),
        tokens=tokens,
        lengths=torch.tensor([len(c) for c in comps]),
        completions=[tok.decode(c) for c in comps],
        columns=columns or {},
        tokenizer=tok,
        action_mask=mask,
    )


# ----------------------------------------------------------------------------------------------
# TRL-style callables
# ----------------------------------------------------------------------------------------------


def test_trl_callable_gets_columns_as_kwargs():
    seen = {}

    def count_target(prompts, completions, target, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, target=target, ids=completion_ids, kw=kwargs)
        return [float(c.split().count(t)) - 0.5 * len(p) for p, c, t in zip(prompts, completions, target)]

    targets = ["a", "b", "c", "b", "a"]
    batch = make_batch(columns={"target": targets, "weight": [1, 2, 3, 4, 5]})
    r = as_reward(count_target)
    assert isinstance(r, CallableReward) and r.prefix is False and r.name == "count_target"
    out = r(batch)
    assert out.shape == (5,) and out.dtype == torch.float32
    expected = [float(c.split().count(t)) - 0.5 * len(p) for p, c, t in zip(batch.prompts, batch.completions, targets)]
    torch.testing.assert_close(out, torch.tensor(expected))
    assert seen["target"] == targets
    assert seen["kw"] == {"weight": [1, 2, 3, 4, 5]}  # other columns arrive through **kwargs
    assert seen["ids"] == COMPS
    assert seen["completions"] == ["a b", "", "c c a", "b", "a a a b"]


def test_trl_callable_without_kwargs_gets_only_what_it_accepts():
    def by_length(completions):  # accepts neither prompts' columns nor **kwargs
        return [-float(len(c)) for c in completions]

    def with_prompts(prompts, completions, weight):
        return [float(w) for w in weight]

    batch = make_batch(columns={"target": list("abcba"), "weight": [1, 2, 3, 4, 5]})
    torch.testing.assert_close(compute_log_rewards([as_reward(by_length)], None, batch),
                               torch.tensor([-3.0, 0.0, -5.0, -1.0, -7.0]))
    torch.testing.assert_close(as_reward(with_prompts)(batch), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))


def test_trl_callable_wrong_count_or_none():
    batch = make_batch()
    with pytest.raises(RewardError, match=r"reward 'short'.*returned 2 values for 5"):
        CallableReward(lambda prompts, completions: [0.0, 1.0], name="short")(batch)
    with pytest.raises(RewardError, match="returned None"):
        CallableReward(lambda prompts, completions: [0.0, None, 1.0, 2.0, 3.0], name="nones")(batch)
    with pytest.raises(RewardError, match="not callable"):
        CallableReward(3.0)


def test_trl_callable_through_trainer_reward_batch(tmp_path):
    """Extra dataset columns reach the callable when the trainer builds the batch."""
    from gfnlm.config import GFNConfig
    from gfnlm.trainer import GFNTrainer

    def match(prompts, completions, answer):
        return [0.0 if c == a else -3.0 for c, a in zip(completions, answer)]

    rows = [{"prompt": "<s>", "answer": "a b"}, {"prompt": "<s> c", "answer": "c"}]
    args = GFNConfig(use_peft=False, max_new_tokens=3, loss_type="tb", chat_template="never", report_to=[],
                     disable_tqdm=True, output_dir=str(tmp_path), allowed_tokens=["a", "b", "c"])
    tr = GFNTrainer(make_tiny_lm(), match, args=args, train_dataset=rows, processing_class=make_tiny_tokenizer())
    tokens = torch.tensor([[3, 4], [5, 0], [3, 4]])
    lengths = torch.tensor([2, 1, 2])
    batch = tr.reward_batch([0, 1], torch.tensor([0, 1, 1]), tokens, lengths)
    assert batch.columns == {"answer": ["a b", "c", "c"]}
    torch.testing.assert_close(tr.log_rewards(batch), torch.tensor([0.0, 0.0, -3.0]))


# ----------------------------------------------------------------------------------------------
# LMLikelihoodReward == brute force, one forward pass per prefix
# ----------------------------------------------------------------------------------------------


def _plain_logits(model, ids, cache=None):
    """[L, V] float64 logits of one plain forward pass over the whole sequence (no KV cache)."""
    key = tuple(ids)
    if cache is None or key not in cache:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(ids)])).logits[0].double()
        if cache is None:
            return logits
        cache[key] = logits
    return cache[key]


def brute_force_lm_reward(model, prompt, comp, stop_ids, legal=None, suffix=None, cache=None, actions=None,
                          score="state+end"):
    """For t = 0..n, each from its own plain forward pass over ``prompt + comp[:t] (+ suffix)``:
    log p(z_1:t, stop | X), or log p(z_1:t, Y | X) with ``suffix`` Y (token ids). With ``legal``, the
    state's action tokens (``actions[k]`` True; default all) and the stop are renormalised over legal +
    stop ids, a tool's tokens and the suffix's never. ``cache`` (a dict) memoises the logits of
    identical sequences (same model only). ``score`` "state" keeps only the terms of z_1:t, "end" only
    those of the stop or Y."""
    tail = list(suffix) if suffix is not None else []
    out = []
    for t in range(len(comp) + 1):
        ids = list(prompt) + list(comp[:t]) + tail
        logits = _plain_logits(model, ids, cache)
        total = 0.0
        for k in range(t + (len(tail) if suffix is not None else 1)):
            row = logits[len(prompt) - 1 + k]
            is_stop = suffix is None and k == t
            if legal is not None and ((k < t and (actions is None or actions[k])) or is_stop):
                mask = torch.zeros_like(row, dtype=torch.bool)
                mask[list(legal) + list(stop_ids)] = True
                row = row.masked_fill(~mask, -math.inf)
            lp = row.log_softmax(-1)
            if (k < t and score == "end") or (k >= t and score == "state"):
                continue
            total += float(torch.logsumexp(lp[stop_ids], -1)) if is_stop else float(lp[ids[len(prompt) + k]])
        out.append(total)
    return out


@pytest.mark.parametrize("restricted", [False, True])
def test_lm_likelihood_every_prefix_equals_brute_force(restricted):
    model = make_tiny_lm(seed=11)
    stop_ids = [2, 6]
    if restricted:
        c = Constraints(stop_token_ids=stop_ids, min_new_tokens=2, max_new_tokens=2, allowed_token_ids=[3, 4, 5, 7])
        r = LMLikelihoodReward(model, constraints=c)  # length limits are ignored by the reward
    else:
        r = LMLikelihoodReward(model, stop_token_ids=stop_ids)
    batch = make_batch()
    out = r(batch)
    assert out.shape == (len(COMPS), max(map(len, COMPS)) + 1)
    for b, comp in enumerate(COMPS):
        expected = brute_force_lm_reward(model, PROMPT_IDS[INDEX[b]], comp, stop_ids,
                                         legal=[3, 4, 5, 7] if restricted else None)
        torch.testing.assert_close(out[b, : len(comp) + 1].double(), torch.tensor(expected, dtype=torch.float64),
                                   atol=3e-5, rtol=1e-5)


def _lora(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout,
                                            init_lora_weights=False))


def test_lm_likelihood_with_lora_uses_the_base_model():
    stop_ids = [2]
    reference = make_tiny_lm(seed=12)  # an identical copy of the base weights
    peft_model = _lora(make_tiny_lm(seed=12))
    r = LMLikelihoodReward(peft_model, stop_token_ids=stop_ids)
    batch = make_batch()
    out = r(batch)
    max_diff = 0.0
    for b, comp in enumerate(COMPS):
        n = len(comp)
        base_val = brute_force_lm_reward(reference, PROMPT_IDS[INDEX[b]], comp, stop_ids)
        torch.testing.assert_close(out[b, : n + 1].double(), torch.tensor(base_val, dtype=torch.float64),
                                   atol=3e-5, rtol=1e-5)
        # the adapted model (adapters back on after the reward ran) gives other values
        adapted_val = torch.tensor(brute_force_lm_reward(peft_model, PROMPT_IDS[INDEX[b]], comp, stop_ids))
        max_diff = max(max_diff, float((adapted_val - out[b, : n + 1].double()).abs().max()))
    assert max_diff > 1e-2
    # a model factory (callable returning the model) works too
    torch.testing.assert_close(LMLikelihoodReward(lambda: peft_model, stop_token_ids=stop_ids)(batch), out)


def test_lm_likelihood_runs_in_eval_mode_and_restores_mode():
    model = make_tiny_lm(seed=13)
    for m in model.modules():  # strong attention dropout, active in train mode
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    peft_model = _lora(model, dropout=0.3)
    batch = make_batch()
    r = LMLikelihoodReward(peft_model, stop_token_ids=[2])
    peft_model.eval()
    ref = r(batch)
    peft_model.train()
    # dropout really is active in train mode (so the test below can fail)
    with torch.no_grad():
        x = torch.tensor([[1, 3, 4, 5]])
        assert not torch.equal(peft_model(input_ids=x).logits, peft_model(input_ids=x).logits)
    a, b = r(batch), r(batch)
    assert peft_model.training and model.training  # mode restored
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref)


# ----------------------------------------------------------------------------------------------
# LMLikelihoodReward options == brute force: every context, suffix, prefixes mode, shared prefix,
# renormalisation, weight and chunking, each (row, prefix) from its own plain forward pass
# ----------------------------------------------------------------------------------------------

LM_WORDS = ("a", "b", "c", "Q:", "ending", "x")  # a=3 b=4 c=5 Q:=6 ending=7 x=8
LM_STOP = [2, 8]  # </s> and "x": one stop action, two ids
LM_LEGAL = [3, 4, 5]  # restricted vocabulary: "Q:" and "ending" are not allowed in a state
TOPICS = ["a", "b", "a", "a", "c"]  # rows 0 and 3 share prompt and topic: one context for both
# tool case: False marks a token a tool wrote after the policy's action
TOOL_MASK = [[True, False], [], [True, False, True], [True], [True, False, False, True]]
SHARED = "b c a"
WEIGHT, INVALID = 0.7, -7.5


def bos_tokenizer():
    """The tiny word-level tokenizer, adding <s> like a real LM's tokenizer does (not with
    add_special_tokens=False)."""
    from tokenizers.processors import TemplateProcessing

    tok = make_tiny_tokenizer(words=LM_WORDS)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


CONTEXTS = {
    "policy_prompt": None,
    "template": "{prompt} Q: {topic}",
    "callable": lambda row: "Q: " + row["topic"],
    "empty": "",
}
SUFFIXES = {"stop": None, "text": "ending {topic}"}


def lm_constraints(prefixes: str, restricted: bool) -> Constraints | None:
    legal = LM_LEGAL if restricted else None
    if prefixes == "stoppable_min":
        return Constraints(stop_token_ids=LM_STOP, min_new_tokens=2, max_new_tokens=4, allowed_token_ids=legal)
    if prefixes == "stoppable_tool":  # rows 2 and 4 end at the length limit without tool output: a forced
        # stop, not one the policy may choose, so not scored
        return Constraints(stop_token_ids=LM_STOP, min_new_tokens=1, max_new_tokens=2, allowed_token_ids=legal,
                           stop_after_tool=True)
    if restricted:  # the length limits do not matter to prefixes="all"/"terminal" nor to the renormalisation
        return Constraints(stop_token_ids=LM_STOP, min_new_tokens=3, max_new_tokens=3, allowed_token_ids=legal)
    return None


def may_stop(comp, mask, c: Constraints | None, mode: str) -> list[bool]:
    """Where the reward scores state t = 0..n, from the policy's rules written out by hand."""
    n = len(comp)
    if mode == "all":
        return [True] * (n + 1)
    if mode == "terminal":
        return [t == n for t in range(n + 1)]
    mask = mask if mask is not None else [True] * n
    out = []
    for t in range(n + 1):
        actions = sum(mask[:t])
        policy_acts = t == n or mask[t]  # not inside a tool's output
        after_tool = t > 0 and not mask[t - 1]
        ok = policy_acts and c.min_new_tokens <= actions <= c.max_new_tokens
        out.append(ok and (after_tool or not c.stop_after_tool))
    return out


@pytest.fixture(scope="module")
def lm_setup():
    return make_tiny_lm(seed=21), bos_tokenizer(), {}  # model, tokenizer, logits memo of the brute force


@pytest.mark.parametrize("shared,restricted", [(False, False), (True, False), (False, True)],
                         ids=["plain", "shared_prefix", "renormalised"])
@pytest.mark.parametrize("prefixes", ["all", "stoppable_min", "stoppable_tool", "terminal"])
@pytest.mark.parametrize("suffix", list(SUFFIXES))
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_lm_likelihood_options_equal_brute_force(lm_setup, context, suffix, prefixes, shared, restricted):
    model, tok, memo = lm_setup
    c = lm_constraints(prefixes, restricted)
    mode = prefixes.split("_")[0]
    mask = TOOL_MASK if prefixes == "stoppable_tool" else None
    batch = make_batch(columns={"topic": TOPICS}, tok=tok, action_mask=mask)
    kw = dict(context=CONTEXTS[context], suffix=SUFFIXES[suffix], prefixes=mode, constraints=c,
              stop_token_ids=None if c is not None else LM_STOP, shared_prefix=SHARED if shared else None,
              weight=WEIGHT, invalid_log_reward=INVALID)
    out = LMLikelihoodReward(model, **kw)(batch)
    if context in ("policy_prompt", "template"):  # rows share contexts: each chunk must pick its own
        # a tiny max_batch_tokens splits the rows into several passes: same values
        passes = []
        hook = model.register_forward_hook(lambda *a: passes.append(1))
        try:
            torch.testing.assert_close(LMLikelihoodReward(model, **kw)(batch), out)
            one = len(passes)
            chunked = LMLikelihoodReward(model, **kw, max_batch_tokens=12)(batch)
        finally:
            hook.remove()
        assert len(passes) - one > one  # really more passes
        torch.testing.assert_close(chunked, out, atol=1e-5, rtol=1e-5)

    # the expected token ids, written out from the documented meaning of each option
    shared_ids = tok(SHARED)["input_ids"] if shared else []  # the shared text starts the sequence (with <s>)
    B, N = len(COMPS), max(map(len, COMPS))
    expected = torch.full((B, N + 1), INVALID, dtype=torch.float64)
    for b, comp in enumerate(COMPS):
        row = {"prompt": batch.prompts[b], "topic": TOPICS[b]}
        spec = CONTEXTS[context]
        if spec is None:  # the policy's prompt; after a shared prefix without its leading <s> (unless that is all)
            ctx = PROMPT_IDS[INDEX[b]]
            ctx = ctx[1:] if shared and len(ctx) > 1 and ctx[0] == tok.bos_token_id else ctx
        else:
            text = spec(row) if callable(spec) else spec.format(**row)
            ctx = tok(text, add_special_tokens=not shared)["input_ids"] if text else []  # <s> once, at the start
            ctx = ctx or [tok.bos_token_id]
        y = tok.encode(SUFFIXES[suffix].format(**row), add_special_tokens=False) if SUFFIXES[suffix] else None
        values = brute_force_lm_reward(model, shared_ids + ctx, comp, LM_STOP, legal=LM_LEGAL if restricted else None,
                                       suffix=y, cache=memo, actions=mask[b] if mask else None)
        for t, ok in enumerate(may_stop(comp, mask[b] if mask else None, c, mode)):
            if ok:
                expected[b, t] = WEIGHT * values[t]
    if mode == "terminal":
        assert out.shape == (B,)
        expected = expected.gather(1, torch.tensor([len(x) for x in COMPS])[:, None]).squeeze(1)
    else:
        assert out.shape == (B, N + 1)
        for b, comp in enumerate(COMPS):  # beyond an episode's length the values are not read
            expected[b, len(comp) + 1:] = out[b, len(comp) + 1:].double()
    torch.testing.assert_close(out.double(), expected, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("restricted", [False, True], ids=["plain", "renormalised"])
@pytest.mark.parametrize("prefixes", ["all", "terminal"])
@pytest.mark.parametrize("score,suffix", [("state", "stop"), ("end", "stop"), ("end", "text")])
def test_lm_likelihood_score_state_or_end_equals_brute_force(lm_setup, score, suffix, prefixes, restricted):
    """score='state': log p(z_1:t | C) alone; score='end': log p(stop | C z_1:t) or log p(Y | C z_1:t)
    alone; and the two add up to the default's log p(z_1:t stop | C)."""
    model, tok, memo = lm_setup
    c = lm_constraints(prefixes, restricted)
    batch = make_batch(columns={"topic": TOPICS}, tok=tok)
    kw = dict(context="Q: {topic}", suffix=SUFFIXES[suffix], prefixes=prefixes, constraints=c,
              stop_token_ids=None if c is not None else LM_STOP, weight=WEIGHT)
    out = LMLikelihoodReward(model, score=score, **kw)(batch)
    for b, comp in enumerate(COMPS):
        row = {"prompt": batch.prompts[b], "topic": TOPICS[b]}
        ctx = tok("Q: " + row["topic"])["input_ids"]
        y = tok.encode(SUFFIXES[suffix].format(**row), add_special_tokens=False) if SUFFIXES[suffix] else None
        values = brute_force_lm_reward(model, ctx, comp, LM_STOP, legal=LM_LEGAL if restricted else None,
                                       suffix=y, cache=memo, score=score)
        expected = torch.tensor(values, dtype=torch.float64) * WEIGHT
        got = out[b].double() if prefixes == "terminal" else out[b, :len(comp) + 1].double()
        torch.testing.assert_close(got, expected[-1] if prefixes == "terminal" else expected, atol=3e-5, rtol=1e-5)
    if suffix == "stop":  # the two parts add up to the whole
        other = LMLikelihoodReward(model, score="end" if score == "state" else "state", **kw)(batch)
        torch.testing.assert_close(out + other, LMLikelihoodReward(model, **kw)(batch), atol=1e-5, rtol=1e-5)


def test_lm_likelihood_lm_handle_reads_the_module_as_it_is():
    """``lm=`` scores with the module it yields, adapters on (a fitted likelihood model is not the base
    LM), in eval mode, restoring its training flag; ``model=`` with the same PEFT model reads the base."""
    import contextlib

    peft_model = _lora(make_tiny_lm(seed=24), dropout=0.3)
    reference = make_tiny_lm(seed=24)
    batch = make_batch()
    peft_model.train()
    adapted = LMLikelihoodReward(lm=lambda: contextlib.nullcontext(peft_model), stop_token_ids=[2])(batch)
    base = LMLikelihoodReward(peft_model, stop_token_ids=[2])(batch)
    assert peft_model.training
    for b, comp in enumerate(COMPS):
        peft_model.eval()
        want = brute_force_lm_reward(peft_model, PROMPT_IDS[INDEX[b]], comp, [2])
        peft_model.train()
        torch.testing.assert_close(adapted[b, :len(comp) + 1].double(), torch.tensor(want, dtype=torch.float64),
                                   atol=3e-5, rtol=1e-5)
        torch.testing.assert_close(base[b, :len(comp) + 1].double(),
                                   torch.tensor(brute_force_lm_reward(reference, PROMPT_IDS[INDEX[b]], comp, [2]),
                                                dtype=torch.float64), atol=3e-5, rtol=1e-5)
    assert float((adapted - base).abs().max()) > 1e-2
    # not a base-LM handle: the full-fine-tuning guard and SMC leave it alone / refuse it
    assert LMLikelihoodReward(lm=lambda: contextlib.nullcontext(peft_model), stop_token_ids=[2]).base_lm is None


def test_reward_batch_of_token_ids_equals_the_trainers_batch():
    """``RewardBatch.of`` (evaluation, EM) gives a reward the same values as the batch a trainer builds,
    stores each distinct prompt once, and handles empty states, an empty batch and bad input."""
    model, tok = make_tiny_lm(seed=25), bos_tokenizer()
    prompts = [PROMPT_IDS[i] for i in INDEX]
    batch = RewardBatch.of(prompts, COMPS, tok, columns={"topic": TOPICS})
    assert batch.prompt_ids == PROMPT_IDS and batch.prompt_index.tolist() == INDEX
    assert batch.lengths.tolist() == [len(c) for c in COMPS] and batch.prompt_index.dtype == torch.long
    for kw in (dict(stop_token_ids=LM_STOP), dict(context="Q: {topic}", suffix="ending {topic}", prefixes="terminal")):
        r = LMLikelihoodReward(model, **kw)
        torch.testing.assert_close(r(batch), r(make_batch(columns={"topic": TOPICS}, tok=tok)))
    empty = RewardBatch.of([], [], tok)
    assert empty.tokens.shape == (0, 0) and empty.lengths.dtype == torch.long
    assert LMLikelihoodReward(model, prefixes="terminal", stop_token_ids=LM_STOP)(empty).shape == (0,)
    with pytest.raises(RewardError, match=r"2 prompts for 1 states"):
        RewardBatch.of([[1], [1]], [[3]], tok)
    with pytest.raises(RewardError, match=r"an empty prompt"):
        RewardBatch.of([[]], [[3]], tok)


def test_lm_likelihood_callables_equal_templates_and_renormalise_is_optional():
    model, tok = make_tiny_lm(seed=22), bos_tokenizer()
    batch = make_batch(columns={"topic": TOPICS}, tok=tok)
    a = LMLikelihoodReward(model, context="Q: {topic}", suffix="ending {topic}")(batch)
    b = LMLikelihoodReward(model, context=lambda r: f"Q: {r['topic']}", suffix=lambda r: f"ending {r['topic']}")(batch)
    torch.testing.assert_close(a, b)
    # a tokenizer given to the reward is used instead of the batch's
    plain = make_batch(columns={"topic": TOPICS}, tok=make_tiny_tokenizer(words=LM_WORDS))
    c = LMLikelihoodReward(model, tok, context="Q: {topic}", suffix="ending {topic}")(plain)
    torch.testing.assert_close(c, a)
    # renormalise=False: restricted constraints only give the stop ids, the full vocabulary is used
    restricted = Constraints(stop_token_ids=LM_STOP, allowed_token_ids=LM_LEGAL)
    torch.testing.assert_close(LMLikelihoodReward(model, constraints=restricted, renormalise=False)(batch),
                               LMLikelihoodReward(model, stop_token_ids=LM_STOP)(batch))


def test_lm_likelihood_errors():
    model = make_tiny_lm(seed=23)
    tok = make_tiny_tokenizer(words=LM_WORDS)
    batch = make_batch(columns={"topic": TOPICS}, tok=tok)
    with pytest.raises(RewardError, match=r"context template names 'missing', which is not a dataset column "
                                          r"\(columns: \['prompt', 'topic'\]\)"):
        LMLikelihoodReward(model, context="Q: {missing}", stop_token_ids=[2])(batch)
    with pytest.raises(RewardError, match=r"suffix template names 'answer', which is not a dataset column"):
        LMLikelihoodReward(model, suffix="ending {answer}")(batch)
    with pytest.raises(RewardError, match=r"prefixes='stoppable' needs the policy's constraints"):
        LMLikelihoodReward(model, suffix="ending", prefixes="stoppable")
    with pytest.raises(RewardError, match=r"without a suffix scores the stop action: pass stop_token_ids or constraints"):
        LMLikelihoodReward(model)
    with pytest.raises(RewardError, match=r"prefixes='every': choose 'all', 'stoppable' or 'terminal'"):
        LMLikelihoodReward(model, stop_token_ids=[2], prefixes="every")
    with pytest.raises(RewardError, match=r"score='state' scores neither the stop action nor a suffix"):
        LMLikelihoodReward(model, suffix="ending", score="state")
    with pytest.raises(RewardError, match=r"score='both': choose 'state\+end', 'state' or 'end'"):
        LMLikelihoodReward(model, stop_token_ids=[2], score="both")
    with pytest.raises(RewardError, match=r"give model .* or lm .*, not both or neither"):
        LMLikelihoodReward(stop_token_ids=[2])
    with pytest.raises(RewardError, match=r"not both or neither"):
        LMLikelihoodReward(model, lm=lambda: None, stop_token_ids=[2])
    LMLikelihoodReward(model, score="state")  # no stop action scored: no stop ids needed
    with pytest.raises(RewardError, match=r"lm=LlamaForCausalLM: give a zero-argument callable .* "
                                          r"lm=lambda: contextlib.nullcontext\(model\)"):
        LMLikelihoodReward(lm=model, stop_token_ids=[2])
    with pytest.raises(RewardError, match=r"lm\(\) returned LlamaForCausalLM, not a context manager"):
        LMLikelihoodReward(lm=lambda: model, stop_token_ids=[2])(batch)
    with pytest.raises(RewardError, match=r"a suffix is empty"):
        LMLikelihoodReward(model, suffix=lambda row: "")(batch)
    no_tok = make_batch()
    no_tok.tokenizer = None
    with pytest.raises(RewardError, match=r"need a tokenizer"):
        LMLikelihoodReward(model, suffix="ending")(no_tok)

# ----------------------------------------------------------------------------------------------
# combination and checks
# ----------------------------------------------------------------------------------------------


class _Fixed(Reward):
    def __init__(self, values, prefix=True, name="fixed"):
        self.values, self.prefix, self.name = values, prefix, name

    def __call__(self, batch):
        return self.values


def test_weighted_sum_in_log_space():
    batch = make_batch()
    B, N1 = len(COMPS), max(map(len, COMPS)) + 1
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(B, N1, generator=g), torch.randn(B, N1, generator=g)
    term = torch.randn(B, generator=g)
    out = compute_log_rewards([_Fixed(v1), _Fixed(v2)], [0.5, 2.0], batch)
    torch.testing.assert_close(out, 0.5 * v1 + 2.0 * v2)
    torch.testing.assert_close(compute_log_rewards([_Fixed(v1), _Fixed(v2)], None, batch), v1 + v2)
    # a terminal reward in the mix: prefix rewards are read at the episode's end, result is [B]
    mixed = compute_log_rewards([_Fixed(v1), _Fixed(term, prefix=False)], [3.0, -1.0], batch)
    lengths = batch.lengths
    torch.testing.assert_close(mixed, 3.0 * v1.gather(1, lengths[:, None]).squeeze(1) - term)
    with pytest.raises(RewardError, match="2 reward_weights for 1 reward"):
        compute_log_rewards([_Fixed(v1)], [1.0, 2.0], batch)


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_non_finite_reward_is_an_error_naming_the_reward(bad, word):
    batch = make_batch()
    B, N1 = len(COMPS), max(map(len, COMPS)) + 1
    v = torch.zeros(B, N1)
    v[2, 1] = bad  # within row 2's length (3)
    with pytest.raises(RewardError) as e:
        compute_log_rewards([_Fixed(torch.zeros(B, N1)), _Fixed(v, name="my_prefix_reward")], None, batch)
    msg = str(e.value)
    assert "my_prefix_reward" in msg and f"returned {word} " in msg and "\n" not in msg
    assert repr(batch.completions[2]) in msg
    # terminal (TRL-style) rewards too
    vals = [0.0, 1.0, bad, 2.0, 3.0]

    def trl_reward(prompts, completions, **kw):
        return vals

    with pytest.raises(RewardError, match=rf"reward 'trl_reward' returned {word} "):
        compute_log_rewards([as_reward(trl_reward)], None, batch)


def test_non_finite_values_beyond_the_episode_are_ignored():
    batch = make_batch()
    B, N1 = len(COMPS), max(map(len, COMPS)) + 1
    v = torch.zeros(B, N1)
    v[1, 1:] = float("nan")  # row 1 is empty: only column 0 matters
    v[3, 2:] = float("-inf")  # row 3 has length 1
    out = compute_log_rewards([_Fixed(v)], [2.0], batch)
    assert torch.isfinite(out[0]).all() and out[1, 0] == 0 and out[3, :2].eq(0).all()


def test_wrong_shape_is_an_error():
    batch = make_batch()
    B, N1 = len(COMPS), max(map(len, COMPS)) + 1
    with pytest.raises(RewardError, match=r"reward 'short' returned shape \(5, 2\), expected \(5, %d\)" % N1):
        compute_log_rewards([_Fixed(torch.zeros(B, 2), name="short")], None, batch)
    with pytest.raises(RewardError, match=r"returned shape \(5, %d\), expected \(5,\)" % N1):
        compute_log_rewards([_Fixed(torch.zeros(B, N1), prefix=False, name="term")], None, batch)


def test_prefix_rule_reward_sees_every_prefix_text():
    calls = []

    def rule(prompt, text):
        calls.append((prompt, text))
        return -float(len(text.split())) + (1.5 if text.endswith("a") else 0.0)

    batch = make_batch()
    out = PrefixRuleReward(rule)(batch)
    n_calls = len(calls)
    assert out.shape == (len(COMPS), max(map(len, COMPS)) + 1)
    tok = batch.tokenizer
    for b, comp in enumerate(COMPS):
        for t in range(len(comp) + 1):
            text = tok.decode(comp[:t]) if t else ""
            assert (batch.prompts[b], text) in calls
            assert out[b, t] == rule(batch.prompts[b], text)
    assert n_calls == sum(len(c) + 1 for c in COMPS)


def test_renormalised_reward_scores_tool_output_under_the_full_vocabulary():
    """A token a tool wrote is not a policy action: with a restricted vocabulary it is scored under
    the full softmax (a brute-force pass), not renormalised (where it would be -inf)."""
    model = make_tiny_lm(seed=31)
    c = Constraints(stop_token_ids=[2], min_new_tokens=0, max_new_tokens=4, allowed_token_ids=[3, 4, 5])
    r = LMLikelihoodReward(model, constraints=c)
    batch = make_batch(comps=[[3, 7, 4]], index=[0])
    batch.action_mask = torch.tensor([[True, False, True]])
    out = r(batch)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT_IDS[0] + [3, 7, 4]])).logits[0].double()
    legal = torch.full_like(logits[0], -math.inf)
    legal[[3, 4, 5, 2]] = 0.0
    renorm = (logits + legal).log_softmax(-1)
    full = logits.log_softmax(-1)
    p0 = len(PROMPT_IDS[0]) - 1
    toks = [float(renorm[p0, 3]), float(full[p0 + 1, 7]), float(renorm[p0 + 2, 4])]
    stops = [float(renorm[p0 + t, 2]) for t in range(4)]
    want = [sum(toks[:t]) + stops[t] for t in range(4)]
    torch.testing.assert_close(out[0].double(), torch.tensor(want, dtype=torch.float64), atol=3e-5, rtol=1e-5)
    with pytest.raises(RewardError, match=r"stop_token_ids \[6\] differ from the constraints' \[2\]"):
        LMLikelihoodReward(model, constraints=c, stop_token_ids=[6])


@pytest.mark.parametrize("budget", [None, 12])
def test_prefix_suffix_pass_equals_one_sequence_per_prefix(budget):
    """Y read after z_1:t through the state's KV cache = the sequence z_1:t Y scored on its own:
    contexts of different lengths, an empty state, t = 0 and t = n, one-token and longer suffixes."""
    from gfnlm.scoring import continuation_log_probs, prefix_suffix_log_probs

    model = make_tiny_lm(vocab_size=16, seed=11)
    model.lm_head.weight.data.mul_(20)
    contexts = [[1, 5, 6], [1, 7]]
    ctx_index = [0, 1, 0]
    states = [[3, 4, 9], [], [8, 8, 3, 12]]
    suffixes = [[10, 11], [13], [6, 14, 15]]
    jobs = [(0, 0), (0, 2), (0, 3), (1, 0), (2, 1), (2, 4)]
    state_lp, suffix_lp = prefix_suffix_log_probs(model, contexts, ctx_index, states, suffixes, jobs, max_batch_tokens=budget)
    whole, _ = continuation_log_probs(model, contexts, ctx_index, states)
    torch.testing.assert_close(state_lp, whole, rtol=0, atol=1e-5)
    rows = [states[b][:t] + suffixes[b] for b, t in jobs]
    per_row, _ = continuation_log_probs(model, contexts, [ctx_index[b] for b, _ in jobs], rows)
    want = torch.stack([per_row[j, t:t + len(suffixes[b])].sum() for j, (b, t) in enumerate(jobs)])
    torch.testing.assert_close(suffix_lp, want, rtol=0, atol=1e-4)
