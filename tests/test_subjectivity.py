"""Subjectivity with EM on a tiny model: data split, likelihood model, reward, one EM round, baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.em import LikelihoodModel, phrase_log_probs
from gfnlm.errors import DataError
from gfnlm.rewards import RewardBatch
from gfnlm.tasks import build_config
from gfnlm.tasks.subjectivity import (COT_PHRASE, LABELS, RationaleReward, SubjectivityTask, load_examples, majority,
                                      split_validation)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "subj"
CONTENT = ["the", "film", "man", "walks", "home", "great", "boring", "story", "about", "a", "dull", "fun", "city"]
WORDS = ['"', ",", ".", "Classify", "this", "movie", "review", "as", "objective", "or", "subjective", ":", "This",
         "is", "so", "it", "because"] + CONTENT


def tokenizer():
    from tokenizers import pre_tokenizers

    tok = make_tiny_tokenizer(words=WORDS)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                                   pre_tokenizers.Punctuation()])
    return tok


def tiny_model(seed=0):
    return make_tiny_lm(vocab_size=len(tokenizer()), hidden=32, seed=seed, max_positions=128)


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path):
    pool = []
    for i in range(30):
        words = [CONTENT[(i * 3 + j) % len(CONTENT)] for j in range(4)]
        pool.append({"text": " ".join(words) + f" {CONTENT[i % 5]}", "label": i % 2})
    write_jsonl(tmp_path / "train.jsonl", pool)
    write_jsonl(tmp_path / "train.4.jsonl", pool[:4])
    write_jsonl(tmp_path / "train.6.jsonl", pool[:6])
    return tmp_path


@pytest.fixture
def model_dir(tmp_path):
    """The tiny model and its tokenizer saved as a local folder (what make_trainer loads by path)."""
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def make_task(data_dir, **kw):
    return SubjectivityTask({"data_dir": str(data_dir), "train_size": 4, "val_size": 8, "seed_rationales": 2,
                             "m_samples": 2, "m_steps": 3, "vote_samples": 3, "sft_steps": 3, **kw})


def config(**kw):
    return build_config("subjectivity", {"report_to": [], "max_steps": 2, "max_new_tokens": 4, "disable_tqdm": True,
                                         "samples_per_prompt": 4, "prompts_per_step": 2, **kw})


def test_examples_are_checked(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "a film", "label": 3}])
    with pytest.raises(DataError, match="row 1 needs"):
        load_examples(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "named.jsonl", [{"text": "a film", "label": "Subjective"}])
    assert load_examples(tmp_path / "named.jsonl") == [{"text": "a film", "label": 1}]


def test_validation_excludes_every_training_sentence(data_dir):
    task = make_task(data_dir)
    val, excluded = task.validation()
    train = {r["text"] for f in ("train.4.jsonl", "train.6.jsonl") for r in load_examples(data_dir / f)}
    assert excluded == 6 and len(val) == 8 and not train & {r["text"] for r in val}
    assert val == task.validation()[0]  # fixed split
    assert split_validation(load_examples(data_dir / "train.jsonl"), [], 5, seed=1)[0] != \
        split_validation(load_examples(data_dir / "train.jsonl"), [], 5, seed=2)[0]


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/subj")
def test_shared_validation_split_has_no_training_sentence():
    task = SubjectivityTask({"data_dir": str(SHARED), "val_size": 500})
    val, excluded = task.validation()
    train = {r["text"] for n in (10, 20, 50) for r in task.train_examples(n)}
    assert len(val) == 500 and excluded >= 50 and not train & {r["text"] for r in val}


def test_majority_vote():
    assert majority([1, 0, 1]) == 1 and majority([0, 0, 1]) == 0 and majority([1, 0]) == 0


def test_phrase_log_probs_match_a_forward_pass_per_sequence():
    model = tiny_model()
    prompts, middles, phrases = [[1, 5, 6], [1, 7]], [[8, 9], []], [[10, 11], [12]]
    with torch.no_grad():
        mid, lab = phrase_log_probs(model, prompts, middles, phrases)
    for b in range(2):
        for k in range(2):
            seq = prompts[b] + middles[b] + phrases[k]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([seq])).logits[0, :-1].log_softmax(-1)
            lp = [float(logp[t - 1, seq[t]]) for t in range(len(seq))[1:]]
            n_p, n_m = len(prompts[b]), len(middles[b])
            assert mid[b] == pytest.approx(sum(lp[n_p - 1:n_p - 1 + n_m]), abs=1e-4)
            assert lab[b, k] == pytest.approx(sum(lp[n_p - 1 + n_m:]), abs=1e-4)


def test_likelihood_adapter_sits_beside_the_policy_and_restores_it():
    from peft import get_peft_model

    from gfnlm.trainer import lora_config

    tok = tokenizer()
    policy = get_peft_model(tiny_model(), lora_config(config()))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    lik = LikelihoodModel(policy, tok, [COT_PHRASE.format(label=l) for l in LABELS])
    x = [tok.encode('"the film" This review is')] * 4
    z = [tok.encode("great fun", add_special_tokens=False)] * 2 + [tok.encode("a story", add_special_tokens=False)] * 2
    before = lik.label_log_probs(x, z)
    losses = lik.fit([(x[i], z[i], int(i < 2)) for i in range(4)], steps=30, learning_rate=3e-3)
    after = lik.label_log_probs(x, z)
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(before[0], after[0])  # log p(Z|X) is the base model's
    assert (after[1].argmax(-1) == torch.tensor([1, 1, 0, 0])).all() and lik.predict(x, z).tolist() == [1, 1, 0, 0]
    assert torch.allclose(lik.label_log_probs(x, z, fitted=False)[1], before[1])  # base unchanged
    assert policy.active_adapter == "default"
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable  # only the policy trains


def test_reward_shape_tempering_and_penalty(data_dir):
    tok = tokenizer()
    task = make_task(data_dir, penalty=50.0)
    lik = task.likelihood_model(tiny_model(), tok)
    prompt = tok.encode('Classify this movie review as objective or subjective : " the film " This review is')
    z = torch.tensor([tok.encode("great fun", add_special_tokens=False)] * 2)
    batch = RewardBatch(prompts=["p", "p"], prompt_ids=[prompt], prompt_index=torch.tensor([0, 0]), tokens=z,
                        lengths=torch.tensor([2, 2]), completions=["great fun"] * 2, columns={"label": [0, 1]},
                        tokenizer=tok)
    r = RationaleReward(task, tok, 50.0)(batch)
    log_pz, log_py = lik.label_log_probs([prompt] * 2, [z[0].tolist()] * 2)
    assert r.shape == (2,) and not RationaleReward.prefix
    wrong_first = log_py[0, 1] > log_py[0, 0]
    for b, y in enumerate([0, 1]):
        expect = log_pz[b] + log_py[b, y] - 50.0 * float(log_py[b, 1 - y] > log_py[b, y])
        assert r[b] == pytest.approx(float(expect), abs=1e-4)
    assert abs(float(r[0] - r[1])) > 49 and bool(wrong_first) == bool(r[0] < r[1])  # exactly one label is penalised
    from gfnlm.rewards import compute_log_rewards

    assert torch.allclose(compute_log_rewards([RationaleReward(task, tok, 50.0)], None, batch) / 2.0, r / 2.0)


def _plain_terms(model, x, z, phrases):
    """Brute force, one plain forward pass per (episode, label phrase): log p(Z | X) and log p(Y_k | X Z)."""
    mid, lab = None, []
    for y in phrases:
        seq = list(x) + list(z) + list(y)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([seq])).logits[0, :-1].double().log_softmax(-1)
        lp = [float(logp[t - 1, seq[t]]) for t in range(1, len(seq))]
        mid = sum(lp[len(x) - 1:len(x) - 1 + len(z)])
        lab.append(sum(lp[len(x) - 1 + len(z):]))
    return mid, lab


def test_rationale_reward_equals_brute_force_before_and_after_the_m_step(data_dir):
    """The E-step reward log p_base(Z | X) + log p(Y* | X Z) - penalty 1[wrong label preferred]: before
    the M-step every term from a never-trained copy of the base model, after it the label terms from
    the fitted adapter (and log p(Z | X) still from the base), each from its own forward pass; the
    policy's adapter stays active and untouched."""
    from peft import get_peft_model

    from gfnlm.trainer import lora_config

    tok = tokenizer()
    reference = tiny_model()  # the base weights, never wrapped
    cfg = lora_config(config())
    cfg.init_lora_weights = False  # a policy adapter that really changes the outputs, as after training
    torch.manual_seed(3)
    policy = get_peft_model(tiny_model(), cfg)
    policy.train()
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    task = make_task(data_dir, penalty=7.0)
    lik = task.likelihood_model(policy, tok)
    phrases = [tok.encode(COT_PHRASE.format(label=l), add_special_tokens=False) for l in LABELS]
    prompts = [tok.encode('Classify this movie review as objective or subjective : " the film " This review is'),
               tok.encode('Classify this movie review as objective or subjective : " a dull city " This review is')]
    zs = [tok.encode(t, add_special_tokens=False) for t in ("great fun", "a story about the man", "boring")]
    index, labels = [0, 1, 1], [1, 0, 1]
    tokens = torch.zeros(3, 5, dtype=torch.long)
    for b, z in enumerate(zs):
        tokens[b, :len(z)] = torch.tensor(z)
    batch = RewardBatch(prompts=["p0", "p1", "p1"], prompt_ids=prompts, prompt_index=torch.tensor(index),
                        tokens=tokens, lengths=torch.tensor([len(z) for z in zs]), completions=["", "", ""],
                        columns={"label": labels}, tokenizer=tok)

    def expected(label_model):
        out = []
        for b, z in enumerate(zs):
            mid, _ = _plain_terms(reference, prompts[index[b]], z, phrases)
            _, lab = _plain_terms(label_model, prompts[index[b]], z, phrases)
            y = labels[b]
            out.append(mid + lab[y] - 7.0 * float(lab[1 - y] > lab[y]))
        return torch.tensor(out, dtype=torch.float64)

    def untouched():  # the policy as the trainer left it: its adapter active, train mode, its flags
        assert policy.active_adapter == "default" and policy.training
        assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags

    torch.testing.assert_close(RationaleReward(task, tok, 7.0)(batch).double(), expected(reference), atol=1e-4, rtol=1e-5)
    untouched()
    with torch.no_grad():  # the policy's adapter is not the base model, so the check above can fail
        assert not torch.allclose(policy(input_ids=torch.tensor([prompts[0]])).logits,
                                  reference(input_ids=torch.tensor([prompts[0]])).logits, atol=1e-3)
    x = [prompts[index[b]] for b in range(3)]
    lik.fit([(x[b], zs[b], 1 - labels[b]) for b in range(3)], steps=40, learning_rate=5e-3)
    policy.train()
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}  # the likelihood adapter's too now
    after = RationaleReward(task, tok, 7.0)(batch).double()
    untouched()
    policy.set_adapter("likelihood")
    policy.eval()
    want = expected(policy)
    policy.set_adapter("default")
    torch.testing.assert_close(after, want, atol=1e-4, rtol=1e-5)
    assert float((after - expected(reference)).abs().max()) > 1.0  # the fitted adapter really changed the terms


def test_one_em_round_end_to_end_and_its_checkpoint(data_dir, model_dir, tmp_path):
    from gfnlm.cli import make_trainer
    from gfnlm.trainer import load_trained

    tok = tokenizer()
    cfg = config(model=str(model_dir), output_dir=str(tmp_path / "run"),
                 task_args={"data_dir": str(data_dir), "train_size": 4, "val_size": 6, "seed_rationales": 2,
                            "m_samples": 2, "m_steps": 3, "vote_samples": 3})
    task, trainer = make_trainer(cfg)
    assert len(trainer.buffer) > 0  # seeded with label-conditioned rationales
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    stats = task.train(trainer)
    assert [s["round"] for s in stats] == [1] and stats[0]["m_examples"] == 8 and trainer.step == 2
    assert task.likelihood.fitted and "likelihood" in trainer.model.peft_config
    assert any(not torch.equal(p, policy_before[n]) for n, p in trainer.model.named_parameters() if n in policy_before)
    assert len(trainer.buffer) == 0  # stale rewards dropped after the M-step
    report = task.evaluate(trainer.model, tok, cfg, trainer.constraints)
    assert set(report) >= {"E-step only", "E+M"} and report["examples"] == 6
    # the checkpoint holds the likelihood adapter; the loaded model reproduces the in-memory predictions
    model, tok2, cfg2, cons = load_trained(tmp_path / "run" / "checkpoint-2")
    assert "likelihood" in model.peft_config and model.active_adapter == "default"
    again = SubjectivityTask(cfg2.task_args).evaluate(model, tok2, cfg2, cons)
    assert again["E+M"]["vote_accuracy"] == report["E+M"]["vote_accuracy"]
    assert again["E-step only"]["vote_accuracy"] == report["E-step only"]["vote_accuracy"]


def brute_force_accuracy(model, tok, task, context: str = "") -> float:
    """Accuracy of argmax_Y log p(" Y." | context + prompt(X)) on the validation split, one plain
    forward pass (no cache, no padding) per sentence and label."""
    val, _ = task.validation()
    right = 0
    for r in val:
        x = tok.encode(context + task.prompt(r["text"]))
        scores = []
        for label in LABELS:
            y = tok.encode(f" {label}.", add_special_tokens=False)
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([x + y])).logits[0, :-1].log_softmax(-1)
            scores.append(sum(float(logp[len(x) - 1 + i, t]) for i, t in enumerate(y)))
        right += int(scores.index(max(scores)) == r["label"])
    return right / len(val)


def test_baselines_run_and_sft_fits_the_examples(data_dir, monkeypatch):
    tok = tokenizer()
    task = make_task(data_dir, sft_steps=40, m_learning_rate=3e-3, val_size=12)
    classifiers = {}  # keep each size's fitted SFT classifier to recompute its accuracy
    fit = task.fit_sft_classifier

    def keep(model, tokenizer, examples, **kw):
        classifiers[str(len(examples))] = clf = fit(model, tokenizer, examples, **kw)
        return clf

    monkeypatch.setattr(task, "fit_sft_classifier", keep)
    base = tiny_model()
    res = task.evaluate_baselines(base, tok, [4, 6])
    assert set(res) == {"zero-shot", "few-shot", "SFT classifier"} and set(res["few-shot"]) == {"4", "6"}
    # every accuracy is that of plain forward passes of the model it names
    zero_shot = brute_force_accuracy(tiny_model(), tok, task)
    for size in ("4", "6"):
        assert res["zero-shot"][size] == pytest.approx(zero_shot)
        ctx = task.few_shot_context(task.train_examples(int(size)))
        assert res["few-shot"][size] == pytest.approx(brute_force_accuracy(tiny_model(), tok, task, ctx))
        with classifiers[size].active(True) as m:
            m.eval()
            assert res["SFT classifier"][size] == pytest.approx(brute_force_accuracy(m, tok, task))
    # the SFT classifier fits its own training examples
    ex = task.train_examples(6)
    clf = task.fit_sft_classifier(tiny_model(), tok, ex, name="sft")
    with clf.active(True) as m:
        m.eval()
        scores = task.direct_scores(m, tok, [r["text"] for r in ex])
    assert (scores.argmax(-1) == torch.tensor([r["label"] for r in ex])).all()


def test_few_shot_scores_equal_reading_the_context_each_time(data_dir):
    tok = tokenizer()
    task = make_task(data_dir)
    model = tiny_model()
    ctx = task.few_shot_context(task.train_examples(4))
    texts = ["the film is fun", "a man walks home"]
    got = task.direct_scores(model, tok, texts, context=ctx)
    from gfnlm.em import phrase_log_probs

    phrases = [tok.encode(f" {l}.", add_special_tokens=False) for l in LABELS]
    ref = phrase_log_probs(model, [tok.encode(ctx + task.prompt(t)) for t in texts], [[], []], phrases)[1]
    assert torch.allclose(got, ref, atol=1e-4)


def test_cli_trains_em_and_prints_accuracy_per_method_and_size(data_dir, model_dir, tmp_path, capsys):
    from gfnlm.cli import main

    common = ["--task_args.data_dir", str(data_dir), "--task_args.val_size", "4", "--task_args.m_steps", "2",
              "--task_args.seed_rationales", "1", "--task_args.vote_samples", "3", "--task_args.sft_steps", "2"]
    ckpts = []
    for size in (4, 6):
        out = tmp_path / f"run{size}"
        assert main(["train", "--task", "subjectivity", "--model", str(model_dir), "--max_steps", "2", "--report_to", "[]",
                     "--max_new_tokens", "3", "--samples_per_prompt", "2", "--output_dir", str(out), "--disable_tqdm",
                     "true", "--task_args.train_size", str(size)] + common) == 0
        ckpts += ["--checkpoint", str(out / "checkpoint-2")]
    capsys.readouterr()
    assert main(["eval", "--task", "subjectivity", "--output", str(tmp_path / "s.json"), "--diagnostics", "3",
                 "--diagnostics_prompts", "6"] + ckpts + common) == 0
    out = capsys.readouterr().out
    for row in ("| zero-shot |", "| few-shot |", "| SFT classifier |", "| E-step only |", "| E+M |"):
        assert row in out
    assert "| method | 4 examples | 6 examples |" in out and "4 validation sentences" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert set(saved) == {"EM 4", "EM 6", "baselines"} and saved["EM 6"]["examples"] == 4
    # each checkpoint's sampler diagnostics against its E-step target, on the validation sentences
    assert out.count("sampler diagnostics (4 prompts x 3 samples") == 2
    for key in ("EM 4", "EM 6"):
        d = saved[key]["diagnostics"]
        assert (d["n_prompts"], d["n_samples"]) == (4, 3)
        assert d["elbo"] <= d["iw_bound"] + 1e-6 and 0 < d["ess"] <= 1 and d["log_w_var"] >= 0


def test_rationales_can_be_kept_from_naming_a_label(data_dir):
    from gfnlm.tasks.subjectivity import is_label_word

    tok = tokenizer()
    free = make_task(data_dir).allowed_token_ids(tok)
    strict = make_task(data_dir, forbid_label_words=True).allowed_token_ids(tok)
    labels = set(tok.convert_tokens_to_ids(["objective", "subjective"]))
    assert labels <= set(free) and labels.isdisjoint(strict)
    assert set(free) - set(strict) == labels  # every other word stays
    assert is_label_word(" Subjectivity") and is_label_word("objecti") and not is_label_word(" objects")
    assert not is_label_word(" the") and not is_label_word("obj")


def test_em_resumes_exactly_inside_an_e_step_and_before_an_m_step(data_dir, model_dir, tmp_path, monkeypatch):
    from gfnlm.cli import make_trainer
    from gfnlm.em import LikelihoodModel

    targs = {"data_dir": str(data_dir), "train_size": 4, "val_size": 6, "seed_rationales": 2, "m_samples": 2,
             "m_steps": 3, "vote_samples": 3, "em_rounds": 2}

    def run(out, resume=None):
        cfg = config(model=str(model_dir), output_dir=str(tmp_path / out), max_steps=4, save_steps=1,
                     save_total_limit=None, task_args=targs)
        task, trainer = make_trainer(cfg)
        task.train(trainer, resume)
        return trainer, {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                         if ".default." in n or ".likelihood." in n}

    full, want = run("a")
    assert full.step == 4 and any(".likelihood." in n for n in want)
    # resume inside the second E-step (after round 1's M-step): the likelihood adapter comes back too
    resumed, got = run("b", tmp_path / "a" / "checkpoint-3")
    assert resumed.step == 4 and got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)
    # a run that stops during its first M-step resumes with that M-step
    calls = {"n": 0}
    fit = LikelihoodModel.fit

    def crash_once(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return fit(self, *a, **kw)

    monkeypatch.setattr(LikelihoodModel, "fit", crash_once)
    with pytest.raises(KeyboardInterrupt):
        run("c")
    state = json.loads((tmp_path / "c" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["em"] == {"rounds_done": 0, "e_steps": 2, "fitted": False}
    again, got = run("c", True)
    assert again.step == 4 and all(torch.equal(got[n], want[n]) for n in want)
    # a checkpoint from a plain (non-EM) run cannot resume EM
    plain = json.loads((tmp_path / "a" / "checkpoint-1" / "trainer_state.json").read_text())
    del plain["em"]
    (tmp_path / "a" / "checkpoint-1" / "trainer_state.json").write_text(json.dumps(plain))
    with pytest.raises(DataError, match="not written by an EM run"):
        run("d", tmp_path / "a" / "checkpoint-1")


def test_m_step_rationales_per_example(data_dir):
    task = make_task(data_dir, m_samples=None)
    assert [task.m_samples(n) for n in (10, 20, 50, 3)] == [40, 20, 8, 134]
    assert make_task(data_dir, m_samples=None, m_total=5).m_samples(10) == 1
    assert make_task(data_dir).m_samples(10) == 2  # an explicit count wins


def test_em_resume_names_a_missing_checkpoint(data_dir, model_dir, tmp_path):
    from gfnlm.cli import make_trainer

    cfg = config(model=str(model_dir), output_dir=str(tmp_path / "run"),
                 task_args={"data_dir": str(data_dir), "train_size": 4, "val_size": 6, "seed_rationales": 2})
    task, trainer = make_trainer(cfg)
    with pytest.raises(DataError, match="not a complete gfnlm checkpoint"):
        task.train(trainer, tmp_path / "nowhere")
    with pytest.raises(DataError, match="no complete checkpoint"):
        task.train(trainer, True)


def test_em_refuses_full_fine_tuning(data_dir, model_dir, tmp_path):
    """The likelihood model is a second adapter on the policy's base: full fine-tuning would train
    the model that computes p_LM(Z | X), so it is a one-line error."""
    from gfnlm.cli import make_trainer
    from gfnlm.errors import ConfigError

    cfg = config(model=str(model_dir), output_dir=str(tmp_path / "run"), use_peft=False,
                 task_args={"data_dir": str(data_dir), "train_size": 4, "val_size": 6, "seed_rationales": 0})
    with pytest.raises(ConfigError, match="set use_peft: true"):
        make_trainer(cfg)
