"""A regex as a prefix-aware action mask (gfnlm.patterns.RegexRule) shared by sampling, scoring and
rewards: checked against Python's own regex matcher and against brute-force enumeration."""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch

from conftest import byte_tokenizer, make_tiny_lm
from gfnlm.errors import DataError
from gfnlm.patterns import RegexRule
from gfnlm.rewards import LMLikelihoodReward, RewardBatch
from gfnlm.sampling import Constraints, sample
from gfnlm.scoring import score

TOK = byte_tokenizer()
ALPHABET = "ab1-"
IDS = {ch: TOK.convert_tokens_to_ids(ch) for ch in ALPHABET}
CHAR = {i: ch for ch, i in IDS.items()}
STOP = TOK.eos_token_id
PATTERN = r"a[ab]*(-1)?"


def constraints(max_new_tokens=4, pattern=PATTERN, min_new_tokens=0):
    c = Constraints(stop_token_ids=[STOP], min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
                    allowed_token_ids=sorted(IDS.values()))
    c.prefix_rule = RegexRule(pattern, TOK, c)
    return c


def strings(max_len):
    for n in range(max_len + 1):
        yield from itertools.product(ALPHABET, repeat=n)


def test_the_rule_agrees_with_pythons_matcher_and_with_brute_force_reachability():
    c = constraints(max_new_tokens=5)
    rule = c.prefix_rule
    rng = random.Random(0)
    for _ in range(300):  # whole strings: matches() is re.fullmatch
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 7)))
        assert rule.matches([IDS[ch] for ch in text]) == bool(re.fullmatch(PATTERN, text)), text
    # every prefix: a token is allowed iff some completion within the remaining length matches
    matching = {"".join(s) for s in strings(5) if re.fullmatch(PATTERN, "".join(s))}
    for prefix in map("".join, strings(4)):
        if not any(m.startswith(prefix) for m in matching):
            continue  # unreachable: the mask never lets an episode get here
        state = rule.walk([IDS[ch] for ch in prefix])[-1]
        assert rule.accepting(state) == (prefix in matching)
        mask = rule.allowed(state, 5 - len(prefix), len(TOK) + 1, "cpu")
        for ch in ALPHABET:
            want = any(m.startswith(prefix + ch) for m in matching)
            assert bool(mask[IDS[ch]]) == want, (prefix, ch)


def tiny_model(seed=3):
    return make_tiny_lm(vocab_size=len(TOK) + 1, seed=seed)


def test_masked_sampling_equals_scoring_and_always_satisfies_the_pattern():
    model, c = tiny_model(), constraints()
    prompts = [[1, IDS["a"]], [1]]
    s = sample(model, prompts, [0, 1] * 16, c, temperature=1.4, epsilon=0.1, generator=torch.Generator().manual_seed(0))
    for row in s.completion_ids():
        assert re.fullmatch(PATTERN, "".join(CHAR[i] for i in row)), row
    sc = score(model, prompts, s.prompt_index, s.tokens, s.lengths, c)
    torch.testing.assert_close(s.log_pf, sc.log_pf.detach(), atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(sc.log_pterm)
    assert torch.equal(fin, torch.isfinite(s.log_pterm))
    torch.testing.assert_close(s.log_pterm[fin], sc.log_pterm[fin].detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("min_new_tokens", [0, 2])
def test_the_masked_policy_is_a_distribution_over_the_matching_strings_only(min_new_tokens):
    """Scored exactly, every string the policy can write matches the pattern (and is long enough) and
    their probabilities sum to one (log q renormalised over the allowed actions), and the sampler's
    frequencies follow them. With min_new_tokens = 2, "a" matches but is too short: the mask must not
    offer it as a way in (a state with neither an action nor a stop would give NaN)."""
    model, c = tiny_model(seed=5), constraints(max_new_tokens=3, min_new_tokens=min_new_tokens)
    texts = ["".join(s) for s in strings(3)]
    tokens = torch.zeros((len(texts), 3), dtype=torch.long)
    for i, t in enumerate(texts):
        tokens[i, :len(t)] = torch.tensor([IDS[ch] for ch in t], dtype=torch.long) if t else torch.zeros(0, dtype=torch.long)
    lengths = torch.tensor([len(t) for t in texts])
    with torch.no_grad():
        sc = score(model, [[1]], torch.zeros(len(texts), dtype=torch.long), tokens, lengths, c)
    logq = sc.log_pf.sum(1) + sc.log_pterm.gather(1, lengths[:, None]).squeeze(1)
    q = logq.exp()
    matching = torch.tensor([bool(re.fullmatch(PATTERN, t)) and len(t) >= min_new_tokens for t in texts])
    assert torch.all(q[~matching] == 0) and math.isclose(float(q.sum()), 1.0, rel_tol=1e-5)
    n = 4000
    s = sample(model, [[1]], [0] * n, c, generator=torch.Generator().manual_seed(1))
    index = {t: i for i, t in enumerate(texts)}
    counts = torch.zeros(len(texts))
    for row in s.completion_ids():
        counts[index["".join(CHAR[i] for i in row)]] += 1
    exp = q * n
    keep = exp > 5
    chi2 = float(((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    assert counts[~keep].sum() <= 5 * max(1, int((~keep & matching).sum())) and chi2 < 3 * int(keep.sum()) + 20, chi2


def test_the_lm_reward_scores_only_prefixes_that_satisfy_the_pattern():
    model, c = tiny_model(seed=7), constraints()
    comps = [[IDS["a"], IDS["b"], IDS["-"], IDS["1"]], [IDS["a"]]]
    tokens = torch.zeros((2, 4), dtype=torch.long)
    for i, row in enumerate(comps):
        tokens[i, :len(row)] = torch.tensor(row)
    batch = RewardBatch(prompts=["p"], prompt_ids=[[1]], prompt_index=torch.tensor([0, 0]), tokens=tokens,
                        lengths=torch.tensor([4, 1]), completions=["ab-1", "a"], tokenizer=TOK)
    reward = LMLikelihoodReward(model, stop_token_ids=[STOP], constraints=c, prefixes="stoppable", invalid_log_reward=-99.0)
    got = reward(batch)
    # "", "a", "ab", "ab-", "ab-1": the empty text and "ab-" do not match
    assert got[0].tolist()[0] == -99.0 and got[0].tolist()[3] == -99.0
    assert all(v > -99.0 for i, v in enumerate(got[0].tolist()) if i in (1, 2, 4))


@pytest.mark.parametrize("pattern, why", [("a{9}", "max_new_tokens"), ("zz", "the allowed tokens"),
                                           ("(", "cannot be compiled"), ("[^ab1-]", "the allowed tokens")])
def test_a_pattern_no_completion_can_match_is_a_one_line_error(pattern, why):
    with pytest.raises(DataError, match=why) as e:
        constraints(max_new_tokens=4, pattern=pattern)
    assert len(str(e.value).splitlines()) == 1


# --- the constrained task, Python and CLI paths ----------------------------------------------------------

CONT_PROMPTS = ["the cat sat on a mat ", "a dog ran far away ", "it was a cold day ", "we had no bread ",
                "she made tea for us ", "he read a long book ", "the sun was low ", "rain fell all night "]


@pytest.fixture
def prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(CONT_PROMPTS) + "\n")
    return p


def test_constrained_reward_is_the_lm_likelihood_times_the_constraint_by_brute_force(prompt_file, tmp_path):
    """Python path: the task's reward at every prefix equals log p̃(z_1:t "." | X) from one separate
    forward per prefix (renormalised over the legal tokens and the stop), where the text matches the
    regex, and is refused (not stoppable) elsewhere; with keywords, the floor where a word is missing."""
    from gfnlm.rewards import compute_log_rewards
    from gfnlm.tasks import build_config, make_trainer

    tok = byte_tokenizer()
    model = make_tiny_lm(vocab_size=len(tok), seed=4, max_positions=256)
    for args, text in (({"regex": "[^e]+"}, "at bo"), ({"keywords": "cat,at"}, "a cat")):
        cfg = build_config("constrained", {"task_args": {"data_file": str(prompt_file), "valid_prompts": 3,
                                                         "train_prompts": 5, **args},
                                           "max_new_tokens": 8, "report_to": [], "output_dir": str(tmp_path / "r")})
        task, trainer = make_trainer(cfg, model=model, tokenizer=tok)
        c = trainer.constraints
        tokens, lengths, _ = trainer.encode_completions([text])
        batch = trainer.reward_batch([0], torch.tensor([0]), tokens, lengths)
        got = compute_log_rewards(trainer.rewards, None, batch)[0]
        prompt = trainer.prompt_ids[0]
        stop = c.stop_token_ids[0]
        legal = torch.zeros(len(tok) + 1, dtype=torch.bool)
        legal[torch.tensor(c.allowed_token_ids)] = True
        legal[stop] = True
        for t in range(int(lengths[0]) + 1):
            z = tokens[0, :t].tolist()
            want = 0.0
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + z + [stop]])).logits[0]
            for k, tokid in enumerate(z + [stop]):
                row = logits[len(prompt) - 1 + k].masked_fill(~legal[:logits.shape[-1]], float("-inf"))
                want += float(row.log_softmax(-1)[tokid])
            sat = task.satisfied(tok.decode(z))
            if "regex" in args:
                if sat and t >= c.min_new_tokens:
                    assert math.isclose(float(got[t]), want, abs_tol=1e-4), (t, float(got[t]), want)
                else:
                    assert math.isclose(float(got[t]), task.floor(c, tok), abs_tol=1e-4)
            elif t >= c.min_new_tokens:
                assert math.isclose(float(got[t]), want + (0.0 if sat else task.floor(c, tok)), abs_tol=1e-4)


def test_constrained_commands_end_to_end(prompt_file, tmp_path, capsys):
    """CLI path: train with a regex, evaluate against locally constrained decoding, rejection sampling and SMC,
    sample from the checkpoint (the regex rebuilt from it): every GFlowNet and local sample satisfies it."""
    import json

    from conftest import save_tiny_lm
    from gfnlm.cli import main

    tiny = save_tiny_lm(tmp_path / "tiny", byte_tokenizer(), seed=3, max_positions=256)
    out = tmp_path / "run"
    common = ["--task", "constrained", "--model", str(tiny), "--task_args.data_file", str(prompt_file),
              "--task_args.valid_prompts", "3", "--task_args.eval_samples", "3", "--task_args.regex", "[^e]+",
              "--task_args.rejection_factor", "4", "--max_new_tokens", "5"]
    assert main(["train", *common, "--max_steps", "2", "--samples_per_prompt", "4", "--output_dir", str(out),
                 "--report_to", "[]"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint-2"), "-n", "2", "--output", str(out / "r.json")]) == 0
    capsys.readouterr()
    saved = json.loads((out / "r.json").read_text())
    methods = saved["methods"]
    assert methods["GFlowNet fine-tuning"]["satisfaction"] == 1.0
    assert methods["locally constrained decoding"]["satisfaction"] == 1.0
    assert "diagnostics" in methods["GFlowNet fine-tuning"] and "diagnostics" in methods["locally constrained decoding"]
    smc = methods["SMC, genlm-control (3 particles)"]  # on the reward's own target: the regex holds, log Ẑ < 0
    assert smc["satisfaction"] == 1.0 and smc["samples_per_prompt"] == 3 and -1e3 < smc["smc_log_z"] < 0
    rej = next(v for k, v in methods.items() if k.startswith("rejection"))
    assert 0.0 <= rej["acceptance_rate"] <= 1.0 and (rej["satisfaction"] == 1.0 or rej["prompts_with_samples"] == 0)
    assert main(["sample", "--checkpoint", str(out / "checkpoint-2"), "-n", "4", "--json", "--prompt", "the cat"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("e" not in json.loads(x)[:-1] for x in lines)
    assert main(["train", *common[:-4], "--task_args.regex", "(", "--max_steps", "1", "--output_dir",
                 str(tmp_path / "bad"), "--report_to", "[]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: regex '(' cannot be compiled") and "Traceback" not in "".join(err)


def test_a_rule_that_rejects_the_empty_text_needs_a_learned_log_z_like_min_new_tokens(tmp_path):
    """Modified SubTB is anchored by the empty prefix only where it may stop: a prefix rule that
    rejects the empty text removes that anchor just as ``min_new_tokens > 0`` does, so ``log_z: auto``
    picks a per-prompt log Z and modified DB (adjacent pairs only) is refused."""
    from gfnlm.config import GFNConfig
    from gfnlm.errors import ConfigError
    from gfnlm.rewards import PrefixRuleReward
    from gfnlm.trainer import GFNTrainer

    def trainer(pattern, loss_type, name):
        args = GFNConfig(use_peft=True, lora_r=2, lora_alpha=4, max_new_tokens=4, chat_template="never",
                         report_to=[], disable_tqdm=True, output_dir=str(tmp_path / name), loss_type=loss_type,
                         samples_per_prompt=2)
        return GFNTrainer(tiny_model(), PrefixRuleReward(lambda p, t: 0.0), args=args, train_dataset=["p", "q"],
                          processing_class=TOK, constraints=constraints(pattern=pattern))

    assert trainer(PATTERN, "modified_subtb", "rejects").log_z_kind() == "prompt"  # "" does not match a[ab]*(-1)?
    assert trainer("[ab]*", "modified_subtb", "accepts").log_z_kind() == "none"  # "" matches: the anchor is there
    trainer("[ab]*", "modified_db", "db-ok")
    with pytest.raises(ConfigError, match="modified_db.*prefix_rule") as e:
        trainer(PATTERN, "modified_db", "db")
    assert "\n" not in str(e.value)
