"""Text posteriors (continuation, contrastive): the prompt split and bad input, the one sentence
constraint in the policy, the reward and every generate baseline, the rewards and the baselines' log q
against brute force, the diversity metric on known inputs, and the commands end to end on a tiny model."""

import contextlib
import itertools
import json
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, make_tiny_lm, save_tiny_lm
from gfnlm.baselines import decode
from gfnlm.cli import main
from gfnlm.errors import ConfigError, DataError
from gfnlm.evaluation import completion_log_rewards, diversity, sequence_log_probs
from gfnlm.rewards import compute_log_rewards
from gfnlm.sampling import sample
from gfnlm.tasks import build_config, make_trainer
from gfnlm.tasks.continuation import ContinuationTask, legal_in_sentence, load_prompts, split_prompts
from gfnlm.tasks.contrastive import ContrastiveTask

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "openwebtext" / "prompts.txt"
PROMPTS = ["the cat sat on a mat ", "a dog ran far away ", "it was a cold day ", "we had no bread ",
           "she made tea for us ", "he read a long book ", "the sun was low ", "rain fell all night "]


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS + PROMPTS[:2]) + "\n\n")  # duplicates and a blank line are dropped
    return p


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny_lm(tmp_path / "tiny", byte_tokenizer(), seed=3, max_positions=256)


def config(task, prompts, tmp_path, **over):
    data = {"task_args": {"data_file": str(prompts), "valid_prompts": 3, "train_prompts": 5, "eval_samples": 3,
                          "compute_factor": 2, **over.pop("task_args", {})},
            "max_steps": 2, "report_to": [], "disable_tqdm": True, "output_dir": str(tmp_path / "run"),
            "max_new_tokens": 6, "min_new_tokens": 2, "samples_per_prompt": 4}
    return build_config(task, {**data, **over})


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def sharp_model(tok, seed=5):
    """A tiny LM whose full stop is likely, so episodes stop of their own accord and are forced too."""
    model = make_tiny_lm(vocab_size=len(tok), seed=seed, max_positions=256)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        model.lm_head.weight[ids(tok, ".")[0]] = model.model.norm.weight.sign() * 1.5
    return model


# --- data -----------------------------------------------------------------------------------------
def test_prompts_split_and_bad_input(prompts, tmp_path):
    got = load_prompts(prompts)
    assert got == [p.strip() for p in PROMPTS]  # trailing space, duplicates and blank lines gone
    parts = split_prompts(got, 0, 3, 5)
    assert len(parts["valid"]) == 3 and len(parts["train"]) == 5
    assert not {r["prompt"] for r in parts["valid"]} & {r["prompt"] for r in parts["train"]}
    assert split_prompts(got, 0, 3, 5) == parts and split_prompts(got, 1, 3, 5) != parts
    if SHARED.is_file():  # the shared data: 50 validation prompts never trained on
        task = ContinuationTask({"data_file": str(SHARED)})
        valid, train = {r["prompt"] for r in task.eval_rows()}, {r["prompt"] for r in task.dataset()}
        assert len(valid) == 50 and len(train) == 950 and not valid & train
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(empty)
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "missing.txt")
    assert main(["train", "--task", "continuation", "--task_args.data_file", str(empty)]) == 2


def test_a_prompt_longer_than_the_context_is_a_one_line_error(tmp_path, tiny_dir, capsys):
    long = tmp_path / "long.txt"
    long.write_text("word " * 300 + "\n" + "a short one\n")
    rc = main(["train", "--task", "continuation", "--model", str(tiny_dir), "--task_args.data_file", str(long),
               "--task_args.valid_prompts", "0", "--max_steps", "1", "--output_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "context" in err[-1] and len(err[-1]) < 300


def test_the_legal_token_rule():
    for t in [" the", "'s", "’t", " A", " I", ",", " 1990", " well-known"]:
        assert legal_in_sentence(t), t
    for t in [".", " Mr", "\n", " \"", "!", "?", "...", "),", " http", "/", " B", "“", " Dr", " 'the"]:
        assert not legal_in_sentence(t), t


# --- one constraint everywhere ----------------------------------------------------------------------
def legal_ids(task, cfg, tok):
    cons = task.constraints(cfg, tok)
    legal = set(cons.allowed_token_ids)
    assert legal == {i for i in range(len(tok)) if legal_in_sentence(tok.decode([i])) and i not in tok.all_special_ids}
    assert cons.stop_token_ids == ids(tok, ".")
    return cons, legal


def test_one_constraint_in_policy_reward_and_baselines(prompts, tmp_path):
    tok = byte_tokenizer()
    cfg = config("continuation", prompts, tmp_path)
    task = ContinuationTask(cfg.task_args)
    cons, legal = legal_ids(task, cfg, tok)
    model = sharp_model(tok)
    prompt = ids(tok, task.dataset()[0]["prompt"])

    def obeys(comps):
        assert comps and all(2 <= len(c) <= 6 and set(c) <= legal for c in comps)

    s = sample(model, [prompt], torch.zeros(64, dtype=torch.long), cons, pad_id=0,
               generator=torch.Generator().manual_seed(0))
    obeys(s.completion_ids())
    scored = sequence_log_probs(model, prompt, cons, s.completion_ids(), pad_id=0)  # sampled = scored log q
    assert torch.allclose(s.log_prob.cpu(), scored, atol=1e-4)
    lengths = [len(c) for c in s.completion_ids()]
    assert min(lengths) < 6 and max(lengths) == 6  # some stopped of their own accord, some were forced
    other = ids(tok, task.dataset()[1]["prompt"])
    for method in ["greedy", "beam", "diverse_beam", "nucleus", "sampling", "tempered"]:
        d, d2 = decode(model, tok, [prompt, other], cons, method, 8, temperature=0.8, seed=1)  # left-padded together
        obeys(d.completions)
        obeys(d2.completions)
        assert len(d.completions) == len(d2.completions) == (1 if method == "greedy" else 8)
        if method in ("sampling", "tempered", "nucleus"):
            assert len(d.log_q) == 8
    # generate's plain sampler has exactly the policy's distribution: its log q is the policy scorer's,
    # also for the shorter prompt, left-padded beside the longer one
    for d, p in zip(decode(model, tok, [prompt, other], cons, "sampling", 32, seed=2), [prompt, other]):
        assert {len(c) for c in d.completions} >= {6}
        ours = sequence_log_probs(model, p, cons, d.completions, pad_id=0)
        assert torch.allclose(torch.tensor(d.log_q), ours, atol=2e-4)
    # the reward renormalises p_LM over the same legal tokens and the stop
    (reward,) = task.reward_funcs(model, tok, cons, cfg)
    got = completion_log_rewards(cfg, tok, task.dataset()[:1], [reward], cons, [d.completions[:6]])[0]
    keep = torch.tensor(sorted(legal | set(cons.stop_token_ids)))
    for z, value in zip(d.completions[:6], got):
        assert value == pytest.approx(brute_log_p(model, prompt, z, keep, cons.stop_token_ids[0]), abs=1e-4)


def brute_log_p(model, context, z, keep, stop):
    """log p̃(z "." | context), p̃ the LM renormalised over ``keep``: one plain forward pass."""
    seq = list(context) + list(z) + [stop]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0]
    total = 0.0
    for i in range(len(context), len(seq)):
        lp = logits[i - 1, keep].log_softmax(-1)
        total += lp[(keep == seq[i]).nonzero().item()].item()
    return total


def test_diverse_beam_search_against_brute_force(prompts, tmp_path):
    """Groups of one beam: each group decodes greedily, each token's log-probability lowered by the
    penalty times the number of earlier groups that chose it at that step (the stop, ending a group's
    search, not counted); with no penalty every group is the plain beam search of its size."""
    tok = byte_tokenizer()
    cfg = config("continuation", prompts, tmp_path)
    task = ContinuationTask(cfg.task_args)
    cons, legal = legal_ids(task, cfg, tok)
    model = sharp_model(tok, seed=11)
    prompt, stop = ids(tok, task.dataset()[2]["prompt"]), cons.stop_token_ids[0]
    allowed = torch.tensor(sorted(legal))
    (d,) = decode(model, tok, [prompt], cons, "diverse_beam", 3, diversity_penalty=2.0)
    want, earlier = [], torch.zeros(8, model.config.vocab_size)
    for _ in range(3):
        z = []
        while True:
            with torch.no_grad():
                s = model(input_ids=torch.tensor([prompt + z])).logits[0, -1].log_softmax(-1)
            t = len(z)
            ok = torch.zeros_like(s, dtype=torch.bool)
            ok[allowed] = t < 6
            ok[stop] = t >= 2
            nxt = int((s - 2.0 * earlier[t]).masked_fill(~ok, float("-inf")).argmax())
            if nxt == stop:
                break
            z.append(nxt)
        for t, v in enumerate(z):
            earlier[t, v] += 1
        want.append(z)
    assert d.completions == want and len({tuple(z) for z in want}) > 1  # the penalty made the groups differ
    assert d.calls == sum(len(z) + 1 for z in want)
    (same,) = decode(model, tok, [prompt], cons, "diverse_beam", 3, diversity_penalty=0.0)
    assert same.completions == [want[0]] * 3  # no penalty: greedy three times
    (beam,) = decode(model, tok, [prompt], cons, "beam", 2)
    (grouped,) = decode(model, tok, [prompt], cons, "diverse_beam", 4, groups=2, diversity_penalty=0.0)
    assert grouped.completions == [beam.completions[0]] * 2  # each group of two beams: beam search's best
    (apart,) = decode(model, tok, [prompt], cons, "diverse_beam", 4, groups=2, diversity_penalty=50.0)
    assert apart.completions[0] == beam.completions[0]
    with torch.no_grad():  # step 0: the first group's two beams take the two best first tokens, the second the next two
        first = model(input_ids=torch.tensor([prompt])).logits[0, -1][allowed].argsort(descending=True)
    ranked = allowed[first].tolist()
    assert apart.completions[0][0] in ranked[:2] and apart.completions[1][0] in ranked[2:4]
    # the processor records the running beams' choices: two a step, for every step but the last
    from transformers import LogitsProcessorList

    from gfnlm.baselines import HammingDiversity, generate_kwargs

    proc = HammingDiversity(torch.zeros(8, model.config.vocab_size), 1.0, len(prompt))
    res = model.generate(torch.tensor([prompt]), num_beams=2, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([proc]), output_scores=True, return_dict_in_generate=True,
                         **generate_kwargs(cons, model.config.vocab_size))
    steps = len(res.scores)
    assert proc.chosen[: steps - 1].sum(1).tolist() == [2.0] * (steps - 1) and proc.chosen[steps - 1:].sum() == 0
    assert set(proc.chosen[0].nonzero().squeeze(1).tolist()) == set(ranked[:2])
    with pytest.raises(ConfigError, match="multiple of the groups"):
        decode(model, tok, [prompt], cons, "diverse_beam", 5, groups=2)


# --- the contrastive reward and its token-level sampler ---------------------------------------------
def test_contrastive_reward_against_brute_force_python_and_cli_paths(prompts, tmp_path, tiny_dir):
    tok = byte_tokenizer()
    cfg = config("contrastive", prompts, tmp_path, model=str(tiny_dir))
    task = ContrastiveTask(cfg.task_args)
    model = make_tiny_lm(vocab_size=len(tok), seed=3, max_positions=256)
    rows = task.dataset()[:2]
    u_text = "The following is an excerpt from a web page."
    assert task.unconditional(tok) == u_text  # the default U: a neutral text, encoded as any text context
    assert cfg.no_repeat_ngram_size == 3  # the task's default rule

    def check(rewards, tok, cons):
        from gfnlm.rewards import RewardBatch

        _, legal = legal_ids(task, cfg, tok)
        keep = torch.tensor(sorted(legal | set(cons.stop_token_ids)))
        u = tok(u_text)["input_ids"]

        z = [ids(tok, " it was"), ids(tok, " no")]
        n = max(map(len, z))
        p = [ids(tok, r["prompt"]) for r in rows]
        batch = RewardBatch(prompts=[r["prompt"] for r in rows], prompt_ids=p, prompt_index=torch.arange(2),
                            tokens=torch.tensor([x + [0] * (n - len(x)) for x in z]), lengths=torch.tensor([len(x) for x in z]),
                            completions=[tok.decode(x) for x in z], columns={}, tokenizer=tok)
        got = compute_log_rewards(rewards, None, batch)
        for b in range(2):
            for t in range(len(z[b]) + 1):
                if t < cons.min_new_tokens:
                    assert got[b, t].item() == 0.0
                    continue
                want = (1.5 * brute_log_p(model, p[b], z[b][:t], keep, cons.stop_token_ids[0])
                        - 0.5 * brute_log_p(model, u, z[b][:t], keep, cons.stop_token_ids[0]))
                assert got[b, t].item() == pytest.approx(want, abs=1e-4), (b, t)

    cons = task.constraints(cfg, tok)
    check(task.reward_funcs(model, tok, cons, cfg), tok, cons)  # Python path, a plain model
    _, trainer = make_trainer(cfg)  # CLI path: LoRA-wrapped policy, the reward reads the base
    check(trainer.rewards, trainer.tokenizer, trainer.constraints)  # the tokenizer saved with tiny_dir
    with pytest.raises(ConfigError, match="b < 0 < a"):
        ContrastiveTask({"a": 1.0, "b": 0.5})
    with pytest.raises(ConfigError, match="a \\+ b"):
        ContrastiveTask({"a": 0.5, "b": -1.0})


def test_token_level_contrastive_sampler_log_q_against_brute_force(prompts, tmp_path):
    tok = byte_tokenizer()
    cfg = config("contrastive", prompts, tmp_path)
    task = ContrastiveTask(cfg.task_args)
    cons, legal = legal_ids(task, cfg, tok)
    model = sharp_model(tok, seed=7)
    prompt, u = ids(tok, task.dataset()[0]["prompt"]), [tok.bos_token_id]
    (d,) = decode(model, tok, [prompt], cons, "token_level", 16, weights=(1.5, -0.5), negative_prompt=u, seed=3)
    stop = cons.stop_token_ids[0]
    allowed = torch.tensor(sorted(legal))
    for z, lq in zip(d.completions, d.log_q):
        assert 2 <= len(z) <= 6 and set(z) <= legal
        want = 0.0
        for t in range(len(z) + 1):  # each step: 1.5 log p(.|X z<t) - 0.5 log p(.|U z<t), renormalised, limits applied
            with torch.no_grad():
                c = model(input_ids=torch.tensor([prompt + z[:t]])).logits[0, -1].log_softmax(-1)
                un = model(input_ids=torch.tensor([u + z[:t]])).logits[0, -1].log_softmax(-1)
            s = 1.5 * c - 0.5 * un
            ok = torch.zeros_like(s, dtype=torch.bool)
            ok[allowed] = t < 6
            ok[stop] = t >= 2
            s = s.masked_fill(~ok, float("-inf")).log_softmax(-1)
            want += s[z[t] if t < len(z) else stop].item()
        assert lq == pytest.approx(want, abs=2e-4)


def test_contrastive_proposal_is_the_token_level_sampler_on_the_base_model(prompts, tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    from gfnlm.rollout import PROPOSED

    cfg = config("contrastive", prompts, tmp_path, model=str(tiny_dir), proposal_fraction=0.5, tempered_fraction=0.25)
    task, trainer = make_trainer(cfg)  # the CLI path
    with torch.no_grad():  # adapters that change the policy: a proposal read through them would differ
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    calls = []
    inner = trainer.collector.proposal
    trainer.collector.proposal = lambda p, k, seed: calls.append((p, k, seed)) or inner(p, k, seed)
    ep = trainer._collect()
    (prompt_ids, counts, seed), = calls
    assert counts == [2, 2]  # 4 episodes a prompt: 1 on-policy, 1 tempered, 2 proposed
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)  # never wrapped, never trained
    tok = trainer.tokenizer

    def token_level(model):  # both prompts need 2 episodes: one decode, seeded seed + 2
        return [z for d in decode(model, tok, prompt_ids, trainer.constraints, "token_level", 2, weights=(1.5, -0.5),
                                  negative_prompt=task.unconditional_ids(tok), seed=seed + 2) for z in d.completions]

    got = [ep.tokens[b, : int(ep.lengths[b])].tolist() for b in (ep.kind == PROPOSED).nonzero().squeeze(1).tolist()]
    assert got == token_level(base) and all(2 <= len(z) <= 6 for z in got)
    with torch.no_grad():  # the adapted policy's token-level sampler draws other sentences from the same seed
        assert token_level(trainer.model) != got
    with pytest.raises(ConfigError, match="no proposal sampler"):
        make_trainer(config("continuation", prompts, tmp_path, model=str(tiny_dir), proposal_fraction=0.25))


def test_token_level_proposal_step_distributions_are_its_sampler_and_the_policy_actions_its_scores(
        prompts, tmp_path, tiny_dir):
    """``TokenLevelProposal.step_logits`` through :func:`action_log_probs` is the distribution the
    token-level sampler draws from: along its own samples it sums to their log q. The policy's whole
    action distribution (``actions=True``) gathered along an episode is its score."""
    from transformers import AutoModelForCausalLM

    from gfnlm.rollout import cat_padded
    from gfnlm.scoring import action_log_probs
    from gfnlm.tasks.contrastive import TokenLevelProposal

    cfg = config("contrastive", prompts, tmp_path, model=str(tiny_dir))
    task, trainer = make_trainer(cfg)  # the CLI path
    with torch.no_grad():  # adapters that change the policy: the teacher must not read through them
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    tok, cons = trainer.tokenizer, trainer.constraints
    proposal = task.proposal(trainer.model, tok, cons, cfg)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)  # never wrapped
    prompt_ids = trainer.prompt_ids[:2]
    decoded = decode(base, tok, prompt_ids, cons, "token_level", 3, weights=(1.5, -0.5),
                     negative_prompt=task.unconditional_ids(tok), seed=5)
    z = [c for d in decoded for c in d.completions]
    log_q = torch.tensor([x for d in decoded for x in d.log_q])
    index = torch.tensor([0, 0, 0, 1, 1, 1])
    lengths = torch.tensor([len(c) for c in z])
    tokens = cat_padded([torch.tensor([c]) for c in z], trainer.pad_id)
    steps = torch.cat([tokens, tokens.new_full((6, 1), 0)], 1)
    V = trainer.model.get_output_embeddings().weight.shape[0]

    def along(dist):  # [B, N+1, V+1] -> sum over each episode's actions, stop included
        col = torch.where(torch.arange(steps.shape[1])[None] < lengths[:, None], steps, torch.full_like(steps, V))
        picked = dist.gather(2, col[..., None]).squeeze(2)
        return torch.where(torch.arange(steps.shape[1])[None] <= lengths[:, None], picked, 0.0).sum(1)

    teacher = action_log_probs(proposal.step_logits(prompt_ids, index, tokens, lengths, trainer.pad_id), cons,
                               tokens, lengths)
    assert teacher.shape == (6, tokens.shape[1] + 1, V + 1)
    assert torch.allclose(along(teacher), log_q, atol=2e-4)
    visited = torch.arange(steps.shape[1])[None] <= lengths[:, None]
    assert torch.allclose(teacher.logsumexp(-1)[visited], torch.zeros(int(visited.sum())), atol=1e-5)
    adapted = TokenLevelProposal(trainer.model, tok, cons, proposal.u_ids, (1.5, -0.5))
    adapted.lm = lambda: contextlib.nullcontext(trainer.model)  # read through the adapters: another distribution
    wrong = action_log_probs(adapted.step_logits(prompt_ids, index, tokens, lengths, trainer.pad_id), cons, tokens,
                             lengths)
    assert not torch.allclose(along(wrong), log_q, atol=1e-2)

    with torch.no_grad():
        actions = trainer.policy(prompt_ids, index, tokens, lengths, cons, trainer.pad_id, actions=True)
        log_pf, log_pterm, _ = trainer.policy(prompt_ids, index, tokens, lengths, cons, trainer.pad_id)
    want = log_pf.sum(1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)
    assert torch.allclose(along(actions), want, atol=1e-5)
    legal = torch.zeros(V + 1, dtype=torch.bool)
    legal[cons.token_ids(V, "cpu")] = True
    assert torch.isinf(actions[:, :, :V][:, :, ~legal[:V]]).all()  # forbidden tokens and the stop id itself
    assert torch.isinf(actions[:, 0, V]).all() and torch.isinf(actions[:, 1, V]).all()  # min_new_tokens 2


def test_soft_label_distillation_python_and_cli_paths(prompts, tmp_path, tiny_dir, capsys):
    """``gfnlm sft --from_proposal K --soft``: the loss is the KL from the token-level sampler's
    next-action distribution at every state of its samples. A teacher equal to the untrained policy
    (weights (1, 0): the base model itself) gives 0; training on the real teacher lowers it."""
    from gfnlm.sft import episode_kl, proposal_episodes, sft_train
    from gfnlm.tasks.contrastive import TokenLevelProposal

    cfg = config("contrastive", prompts, tmp_path, model=str(tiny_dir), max_steps=16, learning_rate=2e-3,
                 warmup_steps=0)
    task, trainer = make_trainer(cfg, with_rewards=False)
    tok, cons = trainer.tokenizer, trainer.constraints
    proposal = task.proposal(trainer.model, tok, cons, cfg)
    episodes = proposal_episodes(trainer, proposal, 2, 3, seed=7, chunk=2)
    everything = torch.arange(len(episodes[1]))
    itself = TokenLevelProposal(trainer.model, tok, cons, proposal.u_ids, (1.0, 0.0))  # LoRA starts at the base model
    with torch.no_grad():
        assert episode_kl(trainer, itself, *episodes, everything).abs().max() < 1e-4
        before = episode_kl(trainer, proposal, *episodes, everything)
    assert (before > 1e-3).all()  # a tiny random LM: near-uniform distributions, small but real KLs
    losses = sft_train(trainer, episodes, batch_size=4, teacher=proposal)
    with torch.no_grad():
        after = episode_kl(trainer, proposal, *episodes, everything)
    assert len(losses) == 16 and after.mean() < 0.8 * before.mean()  # measured: about 0.6

    common = ["--task", "contrastive", "--model", str(tiny_dir), "--task_args.data_file", str(prompts),
              "--task_args.valid_prompts", "3", "--max_new_tokens", "5", "--report_to", "[]"]
    capsys.readouterr()
    assert main(["sft", *common, "--from_proposal", "2", "--proposal_prompts", "3", "--max_steps", "2", "--soft",
                 "--output_dir", str(tmp_path / "soft")]) == 0
    out = capsys.readouterr().out
    assert "2 steps on 6 proposal samples (soft labels" in out and " kl " in out
    assert (tmp_path / "soft" / "checkpoint-2").is_dir()
    assert main(["sft", *common, "--soft", "--output_dir", str(tmp_path / "bad")]) == 2
    assert "give --from_proposal K too" in capsys.readouterr().err.strip().splitlines()[-1]


# --- metrics --------------------------------------------------------------------------------------
def test_diversity_on_known_inputs():
    from sentence_transformers import SentenceTransformer

    from gfnlm.models import embedding_model_path

    same, one, texts = ["A cat sat."] * 3, ["Only one."], ["A cat sat.", "Stocks fell today.", "The cat sat down."]
    got = diversity([same, one, texts])
    assert got[0] == pytest.approx(0.0, abs=1e-5) and got[1] == 0.0
    e = SentenceTransformer(str(embedding_model_path("all-MiniLM-L6-v2")), device="cpu").encode(texts)
    e = torch.tensor(e) / torch.tensor(e).norm(dim=1, keepdim=True)
    cos = [float(e[i] @ e[j]) for i, j in itertools.combinations(range(3), 2)]
    assert got[2] == pytest.approx(1 - sum(cos) / 3, abs=1e-5)
    assert got[2] > 0.2  # unrelated sentences are diverse


# --- commands -------------------------------------------------------------------------------------
def test_commands_end_to_end(prompts, tmp_path, tiny_dir, capsys):
    for task in ("continuation", "contrastive"):
        common = ["--task", task, "--model", str(tiny_dir), "--task_args.data_file", str(prompts),
                  "--task_args.valid_prompts", "3", "--task_args.eval_samples", "2", "--max_new_tokens", "5"]
        out = tmp_path / task
        extra = ["--proposal_fraction", "0.25"] if task == "contrastive" else []  # evaluation reads this config too
        assert main(["train", *common, "--max_steps", "2", "--samples_per_prompt", "4", "--output_dir", str(out),
                     "--report_to", "[]", *extra]) == 0
        capsys.readouterr()
        if task == "contrastive":  # the task's no-repeat rule is saved with the checkpoint and rebuilt
            from gfnlm.patterns import NoRepeatRule
            from gfnlm.trainer import load_trained

            rule = load_trained(out / "checkpoint-2")[3].prefix_rule
            assert isinstance(rule, NoRepeatRule) and rule.n == 3
        assert main(["eval", "--checkpoint", str(out / "checkpoint-2"), "-n", "2", "--plot", str(out / "fig.png"),
                     "--output", str(out / "r.json")]) == 0
        printed = capsys.readouterr().out
        assert "GFlowNet fine-tuning" in printed and "ELBO" in printed
        saved = json.loads((out / "r.json").read_text())
        assert saved["prompts"] == 2 and "GFlowNet fine-tuning" in saved["methods"]
        names = set(saved["methods"])
        if task == "continuation":
            assert {"greedy", "beam (2 beams)", "beam (10 beams)", "sampling (2)", "sampling (10)"} <= names
            assert saved["methods"]["beam (10 beams)"]["samples_per_prompt"] == 2  # 5x compute, n kept
            assert saved["methods"]["diverse beam (10 beams, 2 groups)"]["samples_per_prompt"] == 2  # best of each
        else:
            assert {"token-level contrastive (2)", "best-of-4 by R (2)", "best-of-10 by R (2)"} <= names
            assert "diagnostics" in saved["methods"]["token-level contrastive (2)"]
            assert "diagnostics" not in saved["methods"]["best-of-4 by R (2)"]  # reranking has no tractable q
            smc = saved["methods"]["SMC, genlm-control (2 particles)"]  # the reward's two terms; no tractable q
            assert smc["samples_per_prompt"] == 2 and "diagnostics" not in smc and abs(smc["smc_log_z"]) < 1e3
        assert (out / "fig.png").stat().st_size > 1000
        assert main(["sample", "--checkpoint", str(out / "checkpoint-2"), "-n", "2", "--json", "--prompt",
                     "the cat sat"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 2 and all(json.loads(x).endswith(".") for x in lines)


def test_distilling_the_token_level_proposal_python_and_cli_paths(prompts, tmp_path, tiny_dir, capsys):
    """``gfnlm sft --from_proposal K``: K samples of the task's proposal (the token-level sampler on
    the base model) per training prompt, kept as token ids, trained on by maximum likelihood; the
    checkpoint starts a GFlowNet run (``init_from``). Tasks without labels or a proposal: one-line errors."""
    from transformers import AutoModelForCausalLM

    from gfnlm.sft import heldout_nll, proposal_episodes, sft_train

    cfg = config("contrastive", prompts, tmp_path, model=str(tiny_dir), max_steps=8, learning_rate=2e-2,
                 warmup_steps=0)
    task, trainer = make_trainer(cfg, with_rewards=False)
    tok = trainer.tokenizer
    state = torch.get_rng_state()
    prompt_ids, rows, tokens, lengths, mask = proposal_episodes(
        trainer, task.proposal(trainer.model, tok, trainer.constraints, cfg), 2, 3, seed=7, chunk=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert prompt_ids == trainer.prompt_ids[:3] and rows.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="no proposal sampler.*drop --from_proposal"):  # proposal() gave None
        proposal_episodes(trainer, None, 2)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)  # never wrapped: the token-level sampler's own draws
    want = []
    for c, chunk in enumerate([prompt_ids[:2], prompt_ids[2:]]):  # chunk c seeded 7 + c; 2 episodes: + 2
        want += [z for d in decode(base, tok, chunk, trainer.constraints, "token_level", 2, weights=(1.5, -0.5),
                                   negative_prompt=task.unconditional_ids(tok), seed=7 + c + 2) for z in d.completions]
    got = [tokens[b, : int(lengths[b])].tolist() for b in range(len(rows))]
    assert got == want and torch.equal(mask, torch.arange(mask.shape[1])[None] < lengths[:, None])  # no tool: all actions
    episodes = (prompt_ids, rows, tokens, lengths, mask)
    before = heldout_nll(trainer, episodes, 4)
    losses = sft_train(trainer, episodes, batch_size=4)
    assert len(losses) == 8 and heldout_nll(trainer, episodes, 4) < before - 0.5  # the policy moved towards them

    common = ["--task", "contrastive", "--model", str(tiny_dir), "--task_args.data_file", str(prompts),
              "--task_args.valid_prompts", "3", "--max_new_tokens", "5", "--report_to", "[]"]
    out = tmp_path / "distil"
    capsys.readouterr()
    assert main(["sft", *common, "--from_proposal", "2", "--proposal_prompts", "3", "--max_steps", "2",
                 "--output_dir", str(out)]) == 0
    assert "2 steps on 6 proposal samples" in capsys.readouterr().out
    assert main(["train", *common, "--max_steps", "1", "--samples_per_prompt", "4", "--output_dir",
                 str(tmp_path / "gfn"), "--init_from", str(out / "checkpoint-2")]) == 0

    cont = [a if a != "contrastive" else "continuation" for a in common]
    for args, msg in [(common, "has no labelled completions: distil its proposal sampler with --from_proposal K"),
                      ([*common, "--from_proposal", "0"], "draw at least 1 proposal sample"),
                      ([*common, "--proposal_prompts", "3"], "with --from_proposal K"),
                      ([*common, "--from_proposal", "1", "--proposal_prompts", "0"], "give a positive number"),
                      ([*common, "--from_proposal", "1", "--eval_steps", "2"], "drop --eval_steps"),
                      ([*common, "--from_proposal", "1", "--target", "reward"], "fine-tunes --target policy"),
                      ([*common, "--from_proposal", "1", "--use_peft", "false"], "no --from_proposal"),
                      (cont, "has no labelled completions: train it with `gfnlm train` instead"),
                      ([*cont, "--from_proposal", "1"], "has no proposal sampler to distil")]:
        assert main(["sft", *args, "--output_dir", str(tmp_path / "bad")]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars of loading the model
        assert last.startswith("error: ") and msg in last
