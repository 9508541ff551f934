"""The `gfnlm` command on a tiny local model: train, sample, eval, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_lm
from test_rng_task import digit_tokenizer
from gfnlm import checkpoint as ckpt
from gfnlm.cli import main

DIGITS = [str(d) for d in range(10)]


@pytest.fixture
def tiny_model_dir(tmp_path):
    tok = digit_tokenizer(extra=("The", "following"))
    model = make_tiny_lm(vocab_size=len(tok))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_train_sample_eval_roundtrip(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"task: rng\nmodel: {tiny_model_dir}\noutput_dir: {out}\nmax_steps: 4\nreport_to: []\n"
                   "samples_per_prompt: 8\nchat_template: never\n")
    assert main(["train", "--config", str(cfg), "--learning_rate", "1e-3", "--disable_tqdm", "true",
                 "--task_args.eval_samples", "64"]) == 0
    ck = out / "checkpoint-4"
    assert ckpt.is_complete(ck)
    capsys.readouterr()

    assert main(["sample", "--checkpoint", str(ck), "-n", "5", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    for line in lines:  # the task's sampler: digits only, 1..3 tokens
        text = json.loads(line)
        assert 1 <= len(text) <= 3 and text.isdigit()

    metrics = tmp_path / "m.json"
    n = 512  # enough samples to check the exact valid mass against (binomial sd ≈ 0.02)
    assert main(["eval", "--task", "rng", "--checkpoint", str(ck), "-n", str(n), "--output", str(metrics)]) == 0
    printed = capsys.readouterr().out
    assert "valid_fraction" in printed and "exact_tv_to_uniform" in printed
    assert "sampler diagnostics (1 prompts x 16 samples" in printed and "ELBO E_q[log R - log q]" in printed
    m = json.loads(metrics.read_text())
    d = m["diagnostics"]  # on the policy's own samples; the ELBO is a lower bound on log Z, the IW bound between
    assert d["elbo"] <= d["iw_bound"] + 1e-9 <= d["log_z_is"] + 2e-9 and 0 < d["ess"] <= 1 and d["log_w_var"] >= 0
    assert d["elbo_se"] == pytest.approx(math.sqrt(d["log_w_var"] / 16))  # one prompt, 16 samples
    assert f"= {d['elbo']:.4f} ± {d['elbo_se']:.4f} (± one standard error)" in printed
    assert f"E_p[log R] (self-normalised IS) = {d['target_mean_log_r']:.4f}" in printed
    assert m["n"] == n and sum(m["counts"]) + m["invalid"] == n
    # the TVs are those of the run's own samples and exact probabilities (target: uniform on 0..100)
    u = 1.0 / 101
    assert len(m["counts"]) == 101
    assert m["tv_to_uniform"] == pytest.approx(0.5 * (sum(abs(c / n - u) for c in m["counts"]) + m["invalid"] / n))
    probs = m["exact_probs"]
    assert len(probs) == 101 and m["exact_valid_mass"] == pytest.approx(sum(probs))
    assert m["exact_tv_to_uniform"] == pytest.approx(0.5 * (sum(abs(p - u) for p in probs) + 1.0 - sum(probs)))
    # ... and the exact valid mass is the one the samples show (binomial, 4.5 standard deviations)
    mass = m["exact_valid_mass"]
    assert abs(m["valid_fraction"] - mass) < 4.5 * math.sqrt(mass * (1 - mass) / n), (m["valid_fraction"], mass)


def test_resume_flag_continues_from_latest(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = ["train", "--task", "rng", "--model", str(tiny_model_dir), "--output_dir", str(out), "--report_to", "[]",
            "--samples_per_prompt", "4", "--chat_template", "never", "--disable_tqdm", "true", "--save_total_limit", "5"]
    assert main(args + ["--max_steps", "2"]) == 0
    assert main(args + ["--max_steps", "3", "--resume"]) == 0
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and ckpt.is_complete(out / "checkpoint-2")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--task", "rng", "--max_stepz", "3"], "unknown config field 'max_stepz' in config (did you mean 'max_steps'?)"),
        (["train", "--task", "rng", "--model", "no-such-model-xyz"], "no-such-model-xyz"),
        (["train", "--task", "nope"], "unknown task 'nope'"),
        (["train", "--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' not found"),
        (["sample", "--checkpoint", "/nonexistent-ckpt"], "not a complete gfnlm checkpoint"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert message in err


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: rng\nmax_steps: [1, 2\nlearning_rate: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML at line" in err


def test_malformed_dataset_file(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a"}\n{"prompt": \n')
    argv = ["train", "--task", "rng", "--model", str(tiny_model_dir), "--dataset", str(data), "--max_steps", "1",
            "--report_to", "[]", "--chat_template", "never", "--task_args.seed_buffer", "false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "line 2 is not valid JSON" in err


def test_compile_decoder_trains_the_same_policy(tmp_path, tiny_model_dir, monkeypatch):
    """``--compile_decoder true`` reaches the sampler (its compiled step runs) and trains the policy the
    eager decoder trains: same seed, same episodes, the same adapters to float rounding. The run's history
    holds every second it spent compiling (``time/compile_seconds``), the eager run's has no such key."""
    import json

    from safetensors.torch import load_file

    from gfnlm.decoding import LlamaDecoder, compile_seconds

    calls = []
    compiled_body = LlamaDecoder._compiled_body
    monkeypatch.setattr(LlamaDecoder, "_compiled_body", lambda self, *a: calls.append(1) or compiled_body(self, *a))
    adapters = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        compiling = compile_seconds()
        assert main(["train", "--task", "rng", "--model", str(tiny_model_dir), "--output_dir", str(out),
                     "--report_to", "[]", "--samples_per_prompt", "4", "--chat_template", "never", "--disable_tqdm",
                     "true", "--max_steps", "2", "--compile_decoder", flag]) == 0
        assert bool(calls) == (flag == "true")
        history = json.loads((out / "history.json").read_text())
        assert all(h["time/step_seconds"] > 0 for h in history)
        logged = [h.get("time/compile_seconds") for h in history]
        if flag == "true":
            assert sum(logged) == pytest.approx(compile_seconds() - compiling)
        else:
            assert logged == [None, None]
        files = sorted((out / "checkpoint-2").rglob("*.safetensors"))
        assert files
        adapters.append({f.name + k: v for f in files for k, v in load_file(str(f)).items()})
    assert adapters[0].keys() == adapters[1].keys()
    for k in adapters[0]:
        torch.testing.assert_close(adapters[1][k], adapters[0][k], atol=1e-5, rtol=1e-4)
