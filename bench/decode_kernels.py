"""What one decode step of the sampler is made of, on this machine: the microbenchmarks behind the
README's figures for :class:`gfnlm.decoding.LlamaDecoder` (issue 11, "a faster sampler").

1. Each linear product of a decode step (SmolLM2-135M's shapes by default: q/k/v fused, o, gate/up
   fused, down, the LM head) on ``--rows`` rows, called over and over on one weight: ``F.linear``, MKL's
   packed small-batch product (``torch.ops.mkl._mkl_linear``) and oneDNN's packed product
   (``torch.ops.mkldnn._linear_pointwise``, what the decoder uses), in microseconds per call and GFLOP/s,
   with all of torch's threads and with one, and each packed result's largest difference to ``F.linear``.
1b. All of one step's products (every layer, then the head), each weight read once per step, as the
   decoder reads them: the weights come from memory, not the caches, and the kernels rank differently.
2. ``--steps`` decode steps of the LoRA model (r = 16 on every linear, as in ``bench/step.py``) for
   ``--rows`` rows after a ``--prompt``-token prompt through ``LlamaDecoder``: eager with unpacked
   weights, eager with packed weights (the sampler's default) and compiled with packed weights
   (``compile_decoder``), with the compilation time apart and each variant's logits checked against the
   unpacked eager decoder's.

No figure here is a target: ``bench/step.py`` measures those. Writes ``bench/results/decode_kernels.{md,json}``.

    .venv/bin/python bench/decode_kernels.py                  # about 3 minutes (1 of them compiling)
    .venv/bin/python bench/decode_kernels.py --no-compile     # skip part 2's compiled row
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt", type=int, default=28)
    p.add_argument("--calls", type=int, default=100, help="calls per product timing (median of 5 blocks)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of part 2 (median)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def _per_call(fn, calls: int) -> float:
    """Median seconds per call over 5 blocks of ``calls`` calls, after a warm-up block."""
    for _ in range(max(10, calls // 10)):
        fn()
    blocks = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append((time.perf_counter() - t) / calls)
    return statistics.median(blocks)


def _kernels(rows: int):
    """The three products compared: name -> (prepare(weight) -> packed, product(x, packed) -> y)."""
    import torch
    import torch.nn.functional as F

    return {
        "F.linear": (lambda w: w, lambda x, w: F.linear(x, w)),
        "MKL packed": (lambda w: (torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w),
                       lambda x, p: torch.ops.mkl._mkl_linear(x, p[0], p[1], None, rows)),
        "oneDNN packed": (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows),
                          lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")),
    }


def _groups(lm):
    """One decode step's products of ``lm``, as the decoder groups them: [(name, layer index, weight)] per
    layer, then the head (layer index 0)."""
    import torch

    out = []
    for i, layer in enumerate(lm.model.layers):
        a, f = layer.self_attn, layer.mlp
        for name, mods in (("q/k/v", [a.q_proj, a.k_proj, a.v_proj]), ("o", [a.o_proj]),
                           ("gate/up", [f.gate_proj, f.up_proj]), ("down", [f.down_proj])):
            out.append((name, i, torch.cat([m.weight.detach() for m in mods]).contiguous()))
    out.append(("LM head", 0, lm.get_output_embeddings().weight.detach().contiguous()))
    return out


def products(lm, rows: int, calls: int) -> list[dict]:
    """Part 1: each product of layer 0 (and the head) called over and over on one weight (it stays in
    the CPU's caches), per kernel and thread count."""
    import torch
    import torch.nn.functional as F

    kernels = _kernels(rows)
    out = []
    threads = torch.get_num_threads()
    for name, _, w in [g for g in _groups(lm) if g[1] == 0]:  # layer 0 and the head
        x = torch.randn(rows, w.shape[1])
        ref = F.linear(x, w)
        flop = 2 * rows * w.shape[0] * w.shape[1]
        row = {"product": name, "shape": f"{rows} x {w.shape[1]} -> {w.shape[0]}", "max_abs_diff": {}}
        for k, (prep, prod) in kernels.items():
            p = prep(w)
            row["max_abs_diff"][k] = float((prod(x, p) - ref).abs().max())
            for n in sorted({threads, 1}, reverse=True):
                torch.set_num_threads(n)
                sec = _per_call(lambda: prod(x, p), calls)
                row.setdefault(f"threads_{n}", {})[k] = {"us": sec * 1e6, "gflops": flop / sec / 1e9}
            torch.set_num_threads(threads)
        out.append(row)
    return out


def step_products(lm, rows: int, reps: int) -> dict:
    """Part 1b: all of one decode step's products, each weight read once per step as the decoder reads
    them (so from memory, not from the caches): seconds per step, median of ``reps`` steps, per kernel."""
    import torch

    groups = _groups(lm)
    out = {}
    nbytes = sum(w.numel() * w.element_size() for _, _, w in groups)
    flop = sum(2 * rows * w.numel() for _, _, w in groups)
    for k, (prep, prod) in _kernels(rows).items():
        packed = [(prep(w), torch.randn(rows, w.shape[1])) for _, _, w in groups]

        def step():
            for p, x in packed:
                prod(x, p)

        step()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t)
        sec = statistics.median(ts)
        out[k] = {"seconds": sec, "weight_gb_per_s": nbytes / sec / 1e9, "gflops": flop / sec / 1e9}
    return out


def decode_steps(model, lm, args) -> dict:
    """Part 2: ``args.steps`` decode steps of the LoRA model through :class:`gfnlm.decoding.LlamaDecoder`,
    eager with unpacked weights, eager with packed weights (the sampler's default), and compiled with
    packed weights (``compile_decoder``), each variant's logits against the unpacked eager decoder's."""
    import torch

    from gfnlm.decoding import LlamaDecoder, compile_seconds

    torch.manual_seed(0)
    prompt = torch.randint(100, 1000, (1, args.prompt))
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    cache.batch_repeat_interleave(args.rows)
    attn = torch.ones(args.rows, args.prompt, dtype=torch.long)
    ids = torch.randint(100, 1000, (args.steps, args.rows))

    def run(dec):
        kv = dec.begin(cache, attn, args.steps)
        return [dec.step(kv, ids[t], torch.full((args.rows,), args.prompt + t)) for t in range(args.steps)]

    variants = [("eager, unpacked", None, False), ("eager, packed (oneDNN)", args.rows, False)]
    if args.compile:
        variants.append(("torch.compile, packed (oneDNN)", args.rows, True))
    out, want, decs = {}, None, {}
    with torch.no_grad():
        for name, pack, compiled in variants:
            dec = decs[name] = LlamaDecoder(lm, pack, compiled)
            for g in dec._groups():
                g.load_adapters()
            before, t = compile_seconds(), time.perf_counter()
            got = run(dec)  # warm-up (and compilation)
            first = time.perf_counter() - t
            want = got if want is None else want
            out[name] = {"times": [],
                         "max_abs_diff_to_unpacked": max(float((a - b).abs().max()) for a, b in zip(want, got))}
            if compiled:
                out[name].update(first_run_seconds=first, compile_seconds=compile_seconds() - before)
        for _ in range(args.reps):  # interleaved, so that the machine's drift hits every variant alike
            for name, dec in decs.items():
                t = time.perf_counter()
                run(dec)
                out[name]["times"].append(time.perf_counter() - t)
    for d in out.values():
        d["seconds"] = statistics.median(d["times"])
    return out


def main(argv=None) -> int:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from gfnlm.decoding import _ONEDNN
    from gfnlm.models import load_model

    args = parse_args(argv)
    if not (_ONEDNN and torch.backends.mkl.is_available()):
        print("this torch lacks oneDNN's or MKL's packed products: nothing to compare")
        return 0
    t0 = time.perf_counter()
    base, _ = load_model(args.model)
    lm = base
    part1 = products(lm, args.rows, args.calls)
    part1b = step_products(lm, args.rows, args.reps * 2)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    model.eval()
    part2 = decode_steps(model, lm, args)
    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": _cpu_name(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "model": args.model,
            "rows": args.rows, "steps": args.steps, "prompt": args.prompt, "load_average": os.getloadavg()[0],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    res = {"info": info, "products": part1, "step_products": part1b, "decode": part2,
           "seconds": round(time.perf_counter() - t0, 1)}
    kernels = list(_kernels(args.rows))
    th = sorted({k for r in part1 for k in r if k.startswith("threads_")}, key=lambda k: -int(k.split("_")[1]))
    lines = [f"# The products and steps of one decode step: {args.model}, {args.rows} rows", "",
             f"{info['date']} · {info['cpu']} · {info['cpus']} CPUs · torch {torch.__version__} "
             f"({info['threads']} threads) · load average {info['load_average']:.2f}", "",
             "## 1. One product on one weight, called over and over (the weight stays in the caches): "
             "microseconds per call (GFLOP/s)", "",
             "| product | shape | " + " | ".join(f"{k}, {t.split('_')[1]} thr" for t in th for k in kernels)
             + " | max abs. difference to F.linear (MKL; oneDNN) |",
             "|---|---|" + "---:|" * (len(th) * len(kernels)) + "---|"]
    for r in part1:
        cells = [f"{r[t][k]['us']:.0f} ({r[t][k]['gflops']:.0f})" for t in th for k in kernels]
        diffs = "; ".join(f"{r['max_abs_diff'][k]:.1e}" for k in kernels[1:])
        lines.append(f"| {r['product']} | {r['shape']} | " + " | ".join(cells) + f" | {diffs} |")
    lines += ["", f"## 1b. All products of one decode step, each weight read once (as in decoding), median of "
              f"{args.reps * 2} steps", "", "| kernel | ms per step | weights GB/s | GFLOP/s |", "|---|---:|---:|---:|"]
    for k, d in part1b.items():
        lines.append(f"| {k} | {d['seconds'] * 1e3:.1f} | {d['weight_gb_per_s']:.1f} | {d['gflops']:.0f} |")
    lines += ["", f"## 2. {args.steps} decode steps of the LoRA model (r = 16, all linear layers) through "
              f"`LlamaDecoder`, median of {args.reps} interleaved", "",
              "| decoder | seconds | compilation s | max abs. logit difference to the unpacked eager decoder |",
              "|---|---:|---:|---:|"]
    for name, d in part2.items():
        comp = f"{d['compile_seconds']:.1f}" if "compile_seconds" in d else "—"
        lines.append(f"| {name} | {d['seconds']:.3f} | {comp} | {d['max_abs_diff_to_unpacked']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "decode_kernels.md").write_text(text)
    (dest / "decode_kernels.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
