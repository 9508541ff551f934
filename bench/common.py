"""What the benchmark scripts share: running the chosen methods and writing each run's results."""

from __future__ import annotations

import json
from pathlib import Path


def slug(text: str) -> str:
    """A file-name form of a variant's label: letters, digits and dashes."""
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def run_methods(bench: str, methods: str, seed: int, folder: Path, run_method, args, variant: str = "") -> None:
    """Run each of the comma-separated ``methods`` (``run_method(method, args) -> dict``) and write
    ``<folder>/<method>[-<variant>][-seed<k>].json`` atomically, its step history (if any) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for m in [m.strip() for m in methods.split(",") if m.strip()]:
        print(f"[bench/{bench}] {m} ...", flush=True)
        res = run_method(m, args)
        name = m + (f"-{slug(variant)}" if variant else "")
        name = name if seed == 0 else f"{name}-seed{seed}"  # other seeds: their own file, one table row
        if "history" in res["info"]:  # every step's figures (log R per kind of episode, loss, log Z, ...)
            (folder / f"{name}-history.json").write_text(json.dumps(res["info"].pop("history"), indent=0))
        tmp = folder / f".{name}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(folder / f"{name}.json")
        print(f"[bench/{bench}] {m} done in {res['seconds']:.0f} s", flush=True)


def merged_report(bench: str, out: Path, title: str, table, plot, targets) -> str:
    """Combine ``<out>/<bench>/*.json`` (each a run's ``result`` with per-method rows; the GFlowNet runs
    first, the default one before its variants, rows of seeds other than 0 labelled with their seed) into one table (``table(merged)``), the
    targets (``targets(methods) -> {name: (measured, met)}``) and one plot (``plot(merged, path)``);
    write ``<out>/<bench>.md``, ``.json`` and ``.png``. Returns the markdown."""
    folder = out / bench
    runs = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json")) if not f.stem.endswith("-history")}
    if not runs:
        return "(no runs yet)"
    merged = None
    order = lambda n: (not n.startswith("gfn"), n.split("-seed")[0] != "gfn", n.split("-seed")[0],  # noqa: E731
                       runs[n]["settings"]["seed"])  # the default run first, each run's seeds after its seed 0
    for name in sorted(runs, key=order):
        r, seed = runs[name]["result"], runs[name]["settings"]["seed"]
        merged = merged or {**r, "methods": {}}
        merged["methods"].update({(k if seed == 0 else f"{k}, seed {seed}"): v for k, v in r["methods"].items()})
    checks = targets(merged["methods"])
    model = next(iter(runs.values()))["settings"]["model"]
    lines = [f"# {title} on {model}", "", table(merged), "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {'yes' if ok else 'no'} |" for k, (v, ok) in checks.items()]
    lines += ["", f"Targets met: {sum(ok for _, ok in checks.values())} of {len(checks)}.", "", "Runs:"]
    lines += [f"- {name}: {r['seconds']:.0f} s in all; {json.dumps(r['info'])}" for name, r in runs.items()]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{bench}.md").write_text(text)
    (out / f"{bench}.json").write_text(json.dumps(
        {"result": merged, "runs": {k: {**v, "result": None} for k, v in runs.items()},
         "targets": {k: {"measured": v, "met": ok} for k, (v, ok) in checks.items()}}, indent=1))
    plot(merged, out / f"{bench}.png")
    return text
