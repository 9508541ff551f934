"""The README's Python example, run as written with only the model swapped for a tiny local one:
it trains, samples only digit strings, and its diagnostics show the policy close to its target
(uniform over the even numbers of 1-4 digits, log Z = log 5555)."""

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


def test_readme_python_example_reaches_its_target(tmp_path, monkeypatch):
    tok = digit_tokenizer(extra=("Write", "an", "even", "number:"))
    model_dir = tmp_path / "tiny"
    make_tiny_lm(vocab_size=len(tok), seed=1).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    code = readme_example()
    assert '"smollm2-135m"' in code
    code = code.replace('"smollm2-135m"', repr(str(model_dir))).replace("report_to", "report_to")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code + "\ntrainer.args.disable_tqdm = True\n", "README.md", "exec"), scope)
    samples_line, diag_line = out.getvalue().strip().splitlines()[-2:]
    samples = ast.literal_eval(samples_line)[0]
    assert len(samples) == 5 and all(s.isdigit() and 1 <= len(s) <= 4 for s in samples)
    d = ast.literal_eval(diag_line)
    log_z = math.log(5555)
    # the ELBO is a lower bound on log Z; after 100 steps the tiny policy is within a nat of it and the
    # importance-sampling estimate of log Z recovers it
    assert d["elbo"] <= log_z + 0.05 and d["elbo"] > log_z - 1.0, d
    assert abs(d["log_z_is"] - log_z) < 0.5, d
    assert (Path(tmp_path) / "runs" / "x" / "checkpoint-100").is_dir()
