"""The README's Python example, run as written with only the model swapped for a tiny local one:
it trains, samples only digit strings, moves its mass off the odd numbers (R = e^-50 there), and
prints diagnostics consistent with its target (uniform over the even numbers of 1-4 digits, log Z =
log 5555). The figures on the embedded model are measured by bench/readme_example.py."""

from __future__ import annotations

import ast
import contextlib
import io
import math
import re
from pathlib import Path

from conftest import make_tiny_lm
from test_rng_task import digit_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def odd_fraction(trainer, n=400) -> float:
    return sum(int(c) % 2 for c in trainer.sample(["Write an even number:"], n)[0]) / n


def test_readme_python_example_reaches_its_target(tmp_path, monkeypatch):
    import torch

    tok = digit_tokenizer(extra=("Write", "an", "even", "number:"))
    model = make_tiny_lm(vocab_size=len(tok), seed=1)
    with torch.no_grad():  # a random tiny model's logits span a fraction of a nat: no adapter could sharpen them
        model.lm_head.weight.mul_(20.0)
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    code = readme_example()
    assert '"smollm2-135m"' in code
    code = code.replace('"smollm2-135m"', repr(str(model_dir)))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)
    samples_line, diag_line = out.getvalue().strip().splitlines()[-2:]
    samples = ast.literal_eval(samples_line)[0]
    assert len(samples) == 5 and all(s.isdigit() and 1 <= len(s) <= 4 for s in samples)
    d = ast.literal_eval(diag_line)
    assert d["elbo"] <= math.log(5555) + 0.05 and d["n_samples"] == 256  # a lower bound on log Z
    trainer = scope["trainer"]
    assert odd_fraction(trainer) < 0.2  # the untrained policy: about half odd (checked below)
    assert (Path(tmp_path) / "runs" / "x" / "checkpoint-100").is_dir()
    from gfnlm import GFNConfig, GFNTrainer

    base = GFNTrainer(str(model_dir), reward_funcs=scope["log_reward"],
                      args=GFNConfig(**{**scope["args"].to_dict(), "output_dir": str(tmp_path / "base")}),
                      train_dataset=[{"prompt": "Write an even number:"}])
    assert odd_fraction(base) > 0.35
