"""The README's Python example on the embedded model, run exactly as written (its code is read from
README.md), then measured: the fraction of odd numbers among 512 samples of the trained policy
against the untrained one, and the diagnostics the example prints (ELBO, IW bound, ESS,
Var(log R - log q) on 256 samples; the target's log Z is log 5555 = 8.62).

    .venv/bin/python bench/readme_example.py        # writes bench/results/readme_example.{md,json}
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def odd_fraction(trainer, n: int = 512) -> float:
    texts = trainer.sample(["Write an even number:"], n)[0]
    return sum(int(c) % 2 for c in texts) / n


def main() -> int:
    from gfnlm import GFNConfig, GFNTrainer
    from gfnlm.cli import _setup_runtime

    _setup_runtime()
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Python API"):], re.S).group(1)
    run_dir = ROOT / "runs" / "readme-example"
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)
    t0 = time.perf_counter()
    out, scope = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)
    seconds = time.perf_counter() - t0
    lines = out.getvalue().strip().splitlines()
    samples, diag = ast.literal_eval(lines[-2])[0], ast.literal_eval(lines[-1])
    trained = odd_fraction(scope["trainer"])
    base = GFNTrainer("smollm2-135m", reward_funcs=scope["log_reward"],
                      args=GFNConfig(**{**scope["args"].to_dict(), "output_dir": str(run_dir / "base")}),
                      train_dataset=[{"prompt": "Write an even number:"}])
    base_diag = base.diagnostics(k=256)
    res = {"seconds": round(seconds, 1), "samples": samples, "odd_fraction_trained": trained,
           "odd_fraction_base": odd_fraction(base), "diagnostics_trained": diag, "diagnostics_base": base_diag,
           "log_z_target": math.log(5555)}
    rows = [("odd fraction (512 samples)", res["odd_fraction_base"], trained)]
    rows += [(k, base_diag[k], diag[k]) for k in ("elbo", "iw_bound", "log_z_is", "ess", "log_w_var")]
    md = ["# The README's Python example on SmolLM2-135M-Instruct", "",
          f"100 steps as written in README.md ({seconds:.0f} s on this machine, training and sampling); "
          f"target: uniform over the 5,555 even numbers of 1-4 digits, log Z = {math.log(5555):.2f}.", "",
          "| figure | untrained | after 100 steps |", "|---|---|---|"]
    md += [f"| {name} | {a:.4f} | {b:.4f} |" for name, a, b in rows]
    md += ["", f"samples the example printed: {samples}"]
    folder = ROOT / "bench" / "results"
    (folder / "readme_example.json").write_text(json.dumps(res, indent=1))
    (folder / "readme_example.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
