"""What the benchmark scripts share: running the chosen methods and writing each run's results."""

from __future__ import annotations

import json
from pathlib import Path


def run_methods(bench: str, methods: str, seed: int, folder: Path, run_method, args) -> None:
    """Run each of the comma-separated ``methods`` (``run_method(method, args) -> dict``) and write
    ``<folder>/<method>[-seed<k>].json`` atomically, its step history (if any) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for m in [m.strip() for m in methods.split(",") if m.strip()]:
        print(f"[bench/{bench}] {m} ...", flush=True)
        res = run_method(m, args)
        name = m if seed == 0 else f"{m}-seed{seed}"  # other seeds: their own file, one table row
        if "history" in res["info"]:  # every step's figures (log R per kind of episode, loss, log Z, ...)
            (folder / f"{name}-history.json").write_text(json.dumps(res["info"].pop("history"), indent=0))
        tmp = folder / f".{name}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(folder / f"{name}.json")
        print(f"[bench/{bench}] {m} done in {res['seconds']:.0f} s", flush=True)
