"""Story infilling: data and split, the reward against brute force (Python and CLI paths), the stop
rule, the metrics on known pairs, bad input, and the commands end to end on a tiny model."""

import json
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, make_tiny_lm, save_tiny_lm
from gfnlm.errors import DataError
from gfnlm.rewards import RewardBatch
from gfnlm.tasks import build_config, make_trainer
from gfnlm.tasks.infilling import InfillingTask, load_stories, split_stories, story_row

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "stories" / "stories.jsonl"

NAMES = ["Al", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Mo", "Ned"]


def write_stories(path: Path, n: int = 14) -> Path:
    lines = []
    for i in range(n):
        a = NAMES[i % len(NAMES)]
        s = [f"{a} was sad.", f"{a} had no hat.", "It was cold.", f"{a} got a hat.", f"{a} is glad."]
        lines.append(json.dumps({"id": f"s{i}", "sentences": s}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def stories(tmp_path):
    return write_stories(tmp_path / "stories.jsonl")


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny_lm(tmp_path / "tiny", byte_tokenizer(), seed=3)


def task_args(stories, **over):
    return {"data_file": str(stories), "test_stories": 3, "valid_stories": 2, "train_stories": 9,
            "eval_samples": 2, **over}


def config(stories, tmp_path, **over):
    data = {"task_args": task_args(stories), "max_steps": 2, "report_to": [], "disable_tqdm": True,
            "output_dir": str(tmp_path / "run"), "max_new_tokens": 20, "samples_per_prompt": 4}
    return build_config("infilling", {**data, **over})


def test_rows_and_split():
    rows = [story_row(f"b{i}. x.", f"e{i}.", f"m{i}.") for i in range(30)] + [story_row("b0. x.", "other.", "m.")]
    parts = split_stories(rows, seed=1, n_test=5, n_valid=4, n_train=100)
    assert [len(parts[k]) for k in ("test", "valid", "train")] == [5, 4, 21]  # the repeated beginning is dropped
    seen = [r["beginning"] for k in ("test", "valid", "train") for r in parts[k]]
    assert len(seen) == len(set(seen))
    assert split_stories(rows, 1, 5, 4, 100) == parts and split_stories(rows, 2, 5, 4, 100)["test"] != parts["test"]
    r = rows[0]
    assert r["prompt"] == "Beginning: b0. x.\nEnding: e0.\nMiddle:" and r["middle"] == "m0."


@pytest.mark.skipif(not SHARED.is_file(), reason="needs ../shared/data/stories")
def test_shared_split_never_trains_on_a_test_story():
    task = InfillingTask({"data_file": str(SHARED)})
    parts = task.split()
    assert len(parts["test"]) == 100 and len(parts["train"]) == 900
    test = {r["beginning"] for r in parts["test"]} | {r["id"] for r in parts["test"]}
    assert not any(r["beginning"] in test or r["id"] in test for r in parts["train"] + parts["valid"])
    assert InfillingTask({"data_file": str(SHARED)}).split() == parts  # fixed by the seed


def test_bad_input_is_one_line_error(tmp_path):
    from gfnlm.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentences": ["a.", "b.", "c.", "d."]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'sentences' must be 5 non-empty sentences \(got 4\)"):
        load_stories(bad)
    bad.write_text(json.dumps({"beginning": "It was cold.", "ending": "  "}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: the ending is empty"):
        load_stories(bad)
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not JSON"):
        load_stories(bad)
    with pytest.raises(DataError, match="not found"):
        load_stories(tmp_path / "missing.jsonl")
    assert main(["train", "--task", "infilling", "--task_args.data_file", str(bad)]) == 2


def test_train_stops_on_a_beginning_longer_than_the_context(tmp_path, tiny_dir, capsys):
    """``gfnlm train --task infilling`` on stories whose beginning leaves no room for a middle in the
    model's context: exit code 2 and one line naming the story's prompt, before any training."""
    from gfnlm.cli import main

    path = tmp_path / "long.jsonl"
    lines = []
    for i in range(14):
        a = NAMES[i]
        s = [" ".join([f"{a} was sad."] * 20), " ".join([f"{a} had no hat."] * 20), "It was cold.", f"{a} got a hat.",
             f"{a} is glad."]  # a beginning of about 530 bytes: past the tiny model's 512 positions
        lines.append(json.dumps({"id": f"s{i}", "sentences": s}))
    path.write_text("\n".join(lines) + "\n")
    code = main(["train", "--task", "infilling", "--model", str(tiny_dir), "--max_steps", "1", "--report_to", "[]",
                 "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true"]
                + [f"--task_args.{k}={v}" for k, v in task_args(path).items()])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
    assert code == 2 and err.startswith("error: prompt 'Beginning:") and "exceeds the model's context" in err
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def byte_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def brute(model, tok, beginning, z, ending, t):
    """log p(z_1:t "." | X) + log p(" " Y | X z_1:t "."), X the beginning alone, one plain forward pass."""
    ctx, y = byte_ids(tok, beginning), byte_ids(tok, ". " + ending)
    ids = ctx + z[:t] + y
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(lp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))


def reward_batch(tok, rows, completions):
    z = [byte_ids(tok, c) for c in completions]
    n = max(len(x) for x in z)
    return RewardBatch(prompts=[r["prompt"] for r in rows], prompt_ids=[byte_ids(tok, r["prompt"]) for r in rows],
                       prompt_index=torch.arange(len(rows)), tokens=torch.tensor([x + [0] * (n - len(x)) for x in z]),
                       lengths=torch.tensor([len(x) for x in z]), completions=list(completions),
                       columns={k: [r[k] for r in rows] for k in ("beginning", "ending", "middle")}, tokenizer=tok), z


def check_reward(reward, model, tok, rows, min_new):
    batch, z = reward_batch(tok, rows, [" Al got a hat", " It fell"])
    got = reward(batch)
    assert got.shape == (2, batch.tokens.shape[1] + 1)
    for b, r in enumerate(rows):
        for t in range(len(z[b]) + 1):
            if t < min_new:  # the policy cannot stop there: no LM score
                assert got[b, t].item() == 0.0
            else:
                want = brute(model, tok, r["beginning"], z[b], r["ending"], t)
                assert got[b, t].item() == pytest.approx(want, abs=1e-4), (b, t)


def test_reward_against_brute_force_python_and_cli_paths(stories, tmp_path, tiny_dir):
    tok = byte_tokenizer()
    cfg = config(stories, tmp_path, model=str(tiny_dir))
    task = InfillingTask(cfg.task_args)
    rows = task.dataset()[:2]
    # Python path: the task's reward on a plain model
    model = make_tiny_lm(vocab_size=len(tok), seed=3, max_positions=512)
    cons = task.constraints(cfg, tok)
    (reward,) = task.reward_funcs(model, tok, cons, cfg)
    check_reward(reward, model, tok, rows, cons.min_new_tokens)
    # the context is the beginning only: scoring under the policy's prompt gives another value (a peaked
    # LM, so that the context matters: the random one is nearly uniform)
    sharp = make_tiny_lm(vocab_size=len(tok), seed=3, max_positions=512)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(20)
    (sharp_reward,) = task.reward_funcs(sharp, tok, cons, cfg)
    batch, z = reward_batch(tok, rows, [" Al got a hat", " It fell"])
    got = sharp_reward(batch)[0, len(z[0])].item()
    assert got == pytest.approx(brute(sharp, tok, rows[0]["beginning"], z[0], rows[0]["ending"], len(z[0])), abs=1e-3)
    assert abs(got - brute(sharp, tok, rows[0]["prompt"], z[0], rows[0]["ending"], len(z[0]))) > 0.05  # 50x the tolerance
    # CLI path: make_trainer wraps the policy with LoRA first; the reward reads the base model
    _, trainer = make_trainer(cfg)
    assert [r["prompt"] for r in trainer.rows] == [r["prompt"] for r in task.dataset()]
    check_reward(trainer.rewards[0], model, trainer.tokenizer, rows, cons.min_new_tokens)  # the tokenizer of tiny_dir


def test_sampler_honours_the_stop_rule(stories, tmp_path):
    from gfnlm.sampling import sample

    tok = byte_tokenizer()
    cfg = config(stories, tmp_path, max_new_tokens=12, min_new_tokens=3)
    task = InfillingTask(cfg.task_args)
    cons = task.constraints(cfg, tok)
    stop = byte_ids(tok, ".")
    assert cons.stop_token_ids == stop  # the full stop ends the middle sentence
    not_actions = byte_ids(tok, "\n!?") + [tok.eos_token_id] + stop
    assert not set(not_actions) & set(cons.allowed_token_ids)
    model = make_tiny_lm(vocab_size=len(tok), seed=5, max_positions=512)
    with torch.no_grad():  # make the full stop and the newline likely: episodes stop of their own accord
        model.lm_head.weight.mul_(20)
        model.lm_head.weight[stop[0]] = model.model.norm.weight.sign() * 2
        model.lm_head.weight[not_actions[0]] = model.model.norm.weight.sign() * 3
    prompt = byte_ids(tok, task.dataset()[0]["prompt"])
    s = sample(model, [prompt], torch.zeros(200, dtype=torch.long), cons, pad_id=0, generator=torch.Generator().manual_seed(0))
    lengths = s.lengths.tolist()
    assert min(lengths) >= 3 and max(lengths) <= 12
    assert any(n < 12 for n in lengths)  # some stopped before the limit
    for b, n in enumerate(lengths):
        assert not set(s.tokens[b, :n].tolist()) & set(not_actions)  # one sentence; the stop is not part of Z
    texts = [t for ss, g in task.infill(model, tok, cfg, cons, task.dataset()[:2], k=3, temperature=0.9) for t in ss + [g]]
    assert len(texts) == 8 and all(t.endswith(".") and t.count(".") == 1 and "\n" not in t for t in texts)


def test_metrics_on_known_pairs(stories):
    from gfnlm.evaluation import BERTScore, bleu4, gleu4

    same, ref = "Al got a warm red hat.", "Al got a warm red hat."
    assert bleu4(same, ref) == pytest.approx(1.0) and gleu4(same, ref) == pytest.approx(1.0)
    other = "Zebras swim quickly tonight!"
    assert bleu4(other, ref) < 0.05 and gleu4(other, ref) == 0.0
    assert bleu4("Al got a warm red coat.", ref) < 1.0 and bleu4("Al got a warm red coat.", ref) > bleu4(other, ref)
    task = InfillingTask(task_args(stories))
    bs = task.scorer()
    assert "all-MiniLM-L6-v2, layer 6" in bs.describe() and "rescaled" in bs.describe()
    s = bs([same, other, ""], [ref, ref, ref])
    assert s["bertscore"][0] == pytest.approx(1.0, abs=1e-4) and s["bertscore_rescaled"][0] == pytest.approx(1.0, abs=1e-4)
    assert s["bertscore"][1] < s["bertscore"][0] - 0.2 and s["bertscore_rescaled"][1] < s["bertscore"][1]
    plain = BERTScore("all-MiniLM-L6-v2", 6)
    assert plain([other], [ref])["bertscore"] == pytest.approx([s["bertscore"][1]], abs=1e-5)
    assert "bertscore_rescaled" not in plain([other], [ref])


def test_sample_statistics_score_each_middle_against_its_own_story(stories):
    """The per-sample figures the diagnostics weigh: [stories, k] in the order of the texts, each
    middle scored against its own story's true middle (an exact copy scores 1 on every metric)."""
    task = InfillingTask(task_args(stories))
    rows = task.split()["test"][:2]
    a, b = rows[0]["middle"], rows[1]["middle"]
    stats = task.sample_statistics(rows, [[a, "Zebras swim quickly tonight."], ["Zebras swim quickly tonight.", b]])
    assert set(stats) == {"bleu4", "gleu4", "bertscore", "bertscore_rescaled", "length_words"}
    assert all(len(v) == 2 and all(len(x) == 2 for x in v) for v in stats.values())
    for m in ("bleu4", "gleu4", "bertscore"):
        assert stats[m][0][0] == pytest.approx(1.0, abs=1e-4) and stats[m][1][1] == pytest.approx(1.0, abs=1e-4)
        assert stats[m][0][1] < 0.9 and stats[m][1][0] < 0.9
    assert stats["length_words"] == [[len(a.split()), 4], [4, len(b.split())]]
    assert task.sample_statistics([{**rows[0], "middle": ""}], [["x"]]) == {}  # nothing to compare with


def test_commands_end_to_end(stories, tmp_path, tiny_dir, capsys):
    from gfnlm.cli import main
    from gfnlm.trainer import load_trained

    args = [f"--task_args.{k}={v}" for k, v in task_args(stories).items()]
    common = ["--model", str(tiny_dir), "--report_to", "[]", "--disable_tqdm", "true"] + args
    # SFT of the policy, and of a reward LM
    assert main(["sft", "--task", "infilling", "--max_steps", "2", "--output_dir", str(tmp_path / "sft")] + common) == 0
    assert main(["sft", "--task", "infilling", "--target", "reward", "--max_steps", "3", "--learning_rate", "1e-2",
                 "--output_dir", str(tmp_path / "rlm")] + common) == 0
    assert "sft (reward): 3 steps" in capsys.readouterr().out
    assert main(["sft", "--task", "infilling", "--target", "judge", "--max_steps", "1"] + common) == 2
    # GFlowNet training against the fine-tuned reward LM, the buffer seeded with the true middles
    rlm = tmp_path / "rlm" / "checkpoint-3"
    cfg = config(stories, tmp_path, model=str(tiny_dir), task_args=task_args(stories, reward_model=str(rlm)))
    task, trainer = make_trainer(cfg)
    assert sum(len(trainer.buffer.entries(i)) for i in range(len(trainer.rows))) == 0  # seeded when first drawn
    assert sorted(trainer.collector.pending_seeds) == list(range(len(trainer.rows)))
    merged = task.reward_lm(trainer.model, cfg)
    tok = trainer.tokenizer
    check_reward(trainer.rewards[0], merged, tok, task.dataset()[:2], trainer.constraints.min_new_tokens)
    base = load_trained(str(rlm))[0]
    ids = torch.tensor([byte_ids(tok, "It was cold.")])
    with torch.no_grad():
        with base.disable_adapter():
            assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits)  # not the base LM
    assert main(["train", "--task", "infilling", "--max_steps", "2", "--output_dir", str(tmp_path / "gfn"),
                 f"--task_args.reward_model={rlm}"] + common) == 0
    gfn = tmp_path / "gfn" / "checkpoint-2"
    capsys.readouterr()
    # the table of methods, with the reward model and the BERTScore model named
    assert main(["eval", "--checkpoint", str(gfn), "--sft_checkpoint", str(tmp_path / "sft" / "checkpoint-2"),
                 "-n", "2", "--diagnostics", "2", "--diagnostics_prompts", "3", "--output", str(tmp_path / "t2.json")]) == 0
    out = capsys.readouterr().out
    for name in ("| Prompting |", "| Supervised fine-tuning |", "| GFlowNet fine-tuning |", "BLEU-4", "GLEU-4",
                 f"fine-tuned reward LM {rlm}", "all-MiniLM-L6-v2, layer 6", "ELBO", "bleu4: the samples' mean"):
        assert name in out, name
    saved = json.loads((tmp_path / "t2.json").read_text())
    # the diagnostics on 3 test stories x 2 samples, with what a sampler of the target would score
    d = saved["diagnostics"]
    assert d["n_prompts"] == 3 and d["n_samples"] == 2
    for m in ("bleu4", "gleu4", "bertscore", "length_words"):
        assert set(d["target_means"][m]) == {"sampler", "target", "target_se"}
    assert 1 <= d["target_means"]["length_words"]["target"] <= 24 and 0 <= d["target_means"]["bleu4"]["target"] <= 1
    assert saved["GFlowNet fine-tuning"]["T=0.9"]["bleu4"]["n"] == 4 and saved["Prompting"]["greedy"]["gleu4"]["n"] == 2
    # the middles' length beside the metrics, and the true middles' length for comparison
    words = [len(r["middle"].split()) for r in task.split()["test"] if r.get("middle")][:2]
    assert saved["Prompting"]["reference_length_words"]["mean"] == pytest.approx(sum(words) / 2)
    assert "| length (words) |" in out and f"true middles: {sum(words) / 2:.1f} words" in out
    # sampling from a beginning and an ending given on the command line
    assert main(["sample", "--checkpoint", str(gfn), "-n", "3", "--json", "--beginning", "Al was sad. It was cold.",
                 "--ending", "Al is glad."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(json.loads(x).endswith(".") and "\n" not in json.loads(x) for x in lines)
    assert main(["sample", "--checkpoint", str(gfn), "--beginning", "Al was sad.", "--ending", " "]) == 2
    assert "the ending is empty" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(gfn), "--temprature", "0.5"]) == 2
    assert "unrecognized arguments: --temprature (this checkpoint's task takes --beginning, --ending)" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "rlm" / "checkpoint-3"), "--beginning", "A.", "--ending", "B."]) == 2
    assert "reward LM" in capsys.readouterr().err
    long = " ".join(["Al was sad."] * 60)
    assert main(["sample", "--checkpoint", str(gfn), "--beginning", long, "--ending", "Al is glad."]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_lazy_seeds_enter_the_buffer_when_their_row_is_drawn(stories, tmp_path, tiny_dir):
    """A lazily seeded row gets exactly the entry eager seeding gives it, before its first replay
    draw, and never again after a resume."""
    cfg = config(stories, tmp_path, model=str(tiny_dir), prompts_per_step=3, replay_fraction=0.5)
    task, eager = make_trainer(cfg)
    eager.collector.pending_seeds.clear()
    eager.seed_buffer(task.supervised_completions())  # every row now
    _, lazy = make_trainer(cfg)
    g = torch.Generator().manual_seed(7)
    lazy.collector.generator = g
    rows = lazy.collector.draw_rows(3)
    lazy.collector.generator = torch.Generator().manual_seed(7)
    ep = lazy.collector.collect(lazy.model, lazy.accelerator.device)
    assert (ep.kind == 2).any()  # the seeds were there to replay at the first draw
    for r in set(rows):
        seeded = [e for e in lazy.buffer.entries(r) if tuple(e.tokens) == tuple(eager.buffer.entries(r)[0].tokens)]
        assert len(seeded) == 1 and seeded[0].log_r_terminal == pytest.approx(eager.buffer.entries(r)[0].log_r_terminal, abs=1e-5)
        assert r not in lazy.collector.pending_seeds
    # resume: the rows whose seeds were used travel in the checkpoint; an emptied buffer (as after an
    # EM step) does not bring them back
    path = lazy.save_checkpoint(tmp_path / "ck")
    _, again = make_trainer(cfg)
    again.load_checkpoint(path)
    assert again.collector.seeds_used == set(rows)
    again.buffer.clear()
    again.collector.draw_rows = lambda n: [rows[0]] * n
    again.collector.collect(again.model, again.accelerator.device)
    middle = eager.buffer.entries(rows[0])[0].tokens
    assert not any(tuple(e.tokens) == tuple(middle) for e in again.buffer.entries(rows[0]))


def test_optional_llm_judge_through_an_openai_compatible_endpoint(stories, tmp_path, tiny_dir):
    """A local fake of the chat-completions endpoint: each middle is sent with its story, the
    rating is read from the answer, and answers without one are counted, not scored."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    pytest.importorskip("openai")
    asked = []

    class Fake(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            q = body["messages"][0]["content"]
            asked.append(q)
            answer = {2: "10 out of 10", 3: "I cannot tell."}.get(len(asked), f" {1 + len(asked) % 5}.")
            out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        cfg = config(stories, tmp_path, model=str(tiny_dir), task_args=task_args(stories, judge_url=url, judge_model="fake"))
        task, trainer = make_trainer(cfg)
        out = task.evaluate(trainer.model, trainer.tokenizer, cfg, trainer.constraints, n=2)
    finally:
        server.shutdown()
    assert len(asked) == 2 * 2 + 2  # 2 stories x 2 samples, then 2 greedy middles
    story = task.split()["test"][0]
    assert story["beginning"] in asked[0] and story["ending"] in asked[0] and "Fourth sentence:" in asked[0]
    assert out["T=0.9"]["judge"]["n"] + out["judge_unrated_T=0.9"] == 4 and out["judge_unrated_T=0.9"] == 2
    assert out["T=0.9"]["judge"]["mean"] == pytest.approx((2 + 5) / 2)  # "10 out of 10" is not a rating of 1
    assert "LLM judge (1-5)" in __import__("gfnlm.tasks.infilling", fromlist=["table2"]).table2({"GFN": out})


def brute_nll(checkpoint, completions) -> float:
    """Mean NLL of ``completions`` under a saved policy: one forward per prefix, the constrained
    distribution (allowed tokens, stop ids, length limits) renormalised by hand."""
    from gfnlm.data import render_prompt
    from gfnlm.trainer import load_trained

    model, tok, cfg, cons = load_trained(checkpoint)
    V = model.get_output_embeddings().weight.shape[0]
    tok_mask, stop_mask = cons.token_mask(V, "cpu")
    nlls = []
    with torch.no_grad():
        for prompt, texts in completions.items():
            for text in texts:
                p_ids, z = render_prompt(tok, prompt, cfg.chat_template), tok.encode(text, add_special_tokens=False)
                total = 0.0
                for t in range(len(z) + 1):
                    x = model(input_ids=torch.tensor([p_ids + z[:t]])).logits[0, -1].double()
                    allowed = (tok_mask & (t < cons.max_new_tokens)) | (stop_mask & (t >= cons.min_new_tokens))
                    norm = torch.logsumexp(x[allowed], 0)
                    total += float((x[z[t]] if t < len(z) else torch.logsumexp(x[stop_mask], 0)) - norm)
                nlls.append(-total)
    return sum(nlls) / len(nlls)


@pytest.mark.parametrize("target", ["reward", "policy"])
def test_sft_heldout_nll_matches_brute_force(stories, tmp_path, tiny_dir, capsys, target):
    """``gfnlm sft`` reports the NLL of the validation stories (never trained on) before and after
    training, and with ``--eval_steps`` every k steps, keeping the best step's checkpoint; each figure
    equals the brute force on the checkpoint of its step, and measuring it changes no weight."""
    from gfnlm.cli import main
    from safetensors.torch import load_file

    args = [f"--task_args.{k}={v}" for k, v in task_args(stories).items()]
    common = ["sft", "--task", "infilling", "--target", target, "--max_steps", "3", "--learning_rate", "3e-2",
              "--model", str(tiny_dir), "--report_to", "[]", "--disable_tqdm", "true", "--save_total_limit", "1"] + args
    assert main(common + ["--output_dir", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert "held-out nll on 2 validation completions (never trained on), by step: 0 " in out
    assert main(common + ["--output_dir", str(tmp_path / "es"), "--eval_steps", "1"]) == 0
    assert "by step: 0 " in capsys.readouterr().out
    assert main(common + ["--eval_steps", "-1"]) == 2

    task = InfillingTask(task_args(stories))
    held = task.heldout_completions(target)
    valid = task.split()["valid"]
    assert set(held) == {r["beginning" if target == "reward" else "prompt"] for r in valid}
    assert not set(held) & {r["prompt"] for r in task.sft_data(target)[0] or task.dataset()}  # never trained on
    plain = json.loads((tmp_path / "plain" / "heldout.json").read_text())
    es = json.loads((tmp_path / "es" / "heldout.json").read_text())
    assert [s for s, _ in plain["curve"]] == [0, 3] and [s for s, _ in es["curve"]] == [0, 1, 2, 3]
    assert es["curve"][0] == plain["curve"][0] and es["curve"][3][1] == pytest.approx(plain["curve"][1][1], abs=1e-9)
    a, b = (load_file(tmp_path / d / "checkpoint-3" / "trainable.safetensors") for d in ("plain", "es"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # evaluating does not change training
    assert plain["curve"][1][1] == pytest.approx(brute_nll(tmp_path / "plain" / "checkpoint-3", held), abs=1e-3)
    best_step, best_nll = min(es["curve"], key=lambda c: c[1])
    assert (es["best_step"], es["best_heldout_nll"]) == (best_step, best_nll)
    kept = sorted(p.name for p in (tmp_path / "es").glob("checkpoint-*"))
    if best_step in (0, 3):
        assert kept == ["checkpoint-3"] and es["checkpoint"] == (None if best_step == 0 else str(tmp_path / "es" / "checkpoint-3"))
    else:
        assert kept == [f"checkpoint-{best_step}", "checkpoint-3"]
        assert best_nll == pytest.approx(brute_nll(tmp_path / "es" / f"checkpoint-{best_step}", held), abs=1e-3)


def test_sft_keeps_the_checkpoint_of_the_best_heldout_step(stories, tmp_path, monkeypatch):
    """Early stopping's bookkeeping, on a scripted held-out curve: the best step's checkpoint is kept
    (earlier bests removed), the last step's is always written, heldout.json names the best."""
    import gfnlm.sft as sft

    curve = iter([5.0, 4.0, 3.0, 3.5, 2.5, 4.5, 6.0])  # steps 0, 1, ..., 6: best at 4
    monkeypatch.setattr(sft, "heldout_nll", lambda trainer, completions, batch_size=8: next(curve))
    task = InfillingTask(task_args(stories))
    rows, completions, defaults = task.sft_data("reward")
    cfg = config(stories, tmp_path, **{**defaults, "max_steps": 6, "output_dir": str(tmp_path / "rlm"),
                                       "save_total_limit": 1, "task_args": {**task_args(stories), **defaults["task_args"]}})
    _, trainer = make_trainer(cfg, with_rewards=False, dataset=rows)
    losses = sft.sft_train(trainer, completions, heldout=task.heldout_completions("reward"), eval_steps=1)
    assert len(losses) == 6
    h = json.loads((tmp_path / "rlm" / "heldout.json").read_text())
    assert h["curve"] == [[0, 5.0], [1, 4.0], [2, 3.0], [3, 3.5], [4, 2.5], [5, 4.5], [6, 6.0]]
    assert (h["best_step"], h["best_heldout_nll"], h["checkpoint"]) == (4, 2.5, str(tmp_path / "rlm" / "checkpoint-4"))
    assert sorted(p.name for p in (tmp_path / "rlm").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
