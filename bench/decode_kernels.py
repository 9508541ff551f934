"""What one decode step of the sampler is made of, on this machine: the microbenchmarks behind the
README's figures for :class:`gfnlm.decoding.LlamaDecoder` (issue 11, "a faster sampler").

1. Each linear product of a decode step (SmolLM2-135M's shapes by default: q/k/v fused, o, gate/up
   fused, down, the LM head) on ``--rows`` rows: ``F.linear`` against MKL's packed small-batch product
   (``torch.ops.mkl._mkl_linear`` on a weight packed once, what the decoder uses), in microseconds per
   call and GFLOP/s, with all of torch's threads and with one. Also whether the two agree bit for bit.
2. ``--steps`` decode steps of the LoRA model (r = 16 on every linear, as in ``bench/step.py``) for
   ``--rows`` rows after a ``--prompt``-token prompt: the decoder eager with unpacked weights, eager
   with packed weights, a static-shape version of its step (attention over the whole static cache under
   its mask, the step index a tensor: what ``torch.compile`` needs to compile once), eager and through
   ``torch.compile`` with unpacked weights (packed MKL weights do not lower through inductor), with the
   compilation time apart and each variant's logits checked against the decoder's.

No figure here is a target: ``bench/step.py`` measures those. Writes ``bench/results/decode_kernels.{md,json}``.

    .venv/bin/python bench/decode_kernels.py                  # about 2 minutes
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
    p.add_argument("--calls", type=int, default=300, help="calls per product timing (median of 5 blocks)")
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


def products(lm, rows: int, calls: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    layer = lm.model.layers[0]
    a, f = layer.self_attn, layer.mlp
    groups = {"q/k/v": [a.q_proj, a.k_proj, a.v_proj], "o": [a.o_proj], "gate/up": [f.gate_proj, f.up_proj],
              "down": [f.down_proj], "LM head": [lm.get_output_embeddings()]}
    out = []
    threads = torch.get_num_threads()
    for name, mods in groups.items():
        w = torch.cat([m.weight.detach() for m in mods]).contiguous()
        x = torch.randn(rows, w.shape[1])
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        same = torch.equal(F.linear(x, w), torch.ops.mkl._mkl_linear(x, packed, w, None, rows))
        flop = 2 * rows * w.shape[0] * w.shape[1]
        row = {"product": name, "shape": f"{rows} x {w.shape[1]} -> {w.shape[0]}", "bit_identical": same}
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            plain = _per_call(lambda: F.linear(x, w), calls)
            fast = _per_call(lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, rows), calls)
            row[f"threads_{n}"] = {"linear_us": plain * 1e6, "packed_us": fast * 1e6,
                                   "linear_gflops": flop / plain / 1e9, "packed_gflops": flop / fast / 1e9}
        torch.set_num_threads(threads)
        out.append(row)
    return out


def static_step(dec, kv, ids, positions, t):
    """``dec.step`` with static shapes for ``torch.compile``: the step index ``t`` is a 0-dim tensor, the
    new key and value are written with ``index_copy_`` and attention reads the whole static cache under
    its mask (``dec.step`` reads the filled part only, a shape that changes every token). Returns the
    logits [B, V]; ``kv.filled`` is not advanced (the caller keeps ``t``)."""
    import torch
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import rotate_half

    from gfnlm.decoding import _rms_norm

    B, H, KV, D = ids.shape[0], dec.heads, dec.kv_heads, dec.head_dim
    kv.mask.index_fill_(-1, t.view(1), True)
    h = dec.embed(ids)
    cos, sin = dec.rotary(h, positions[:, None])
    cos, sin = cos[:, None], sin[:, None]
    for i, (norm1, qkv, scaling, o, norm2, gate_up, act, down) in enumerate(dec.blocks):
        q, k, v = qkv(_rms_norm(norm1, h))
        qk = torch.cat([q, k], -1).view(B, H + KV, 1, D)
        qk = qk * cos + rotate_half(qk) * sin
        kv.keys[i].index_copy_(2, t.view(1), qk[:, H:])
        kv.values[i].index_copy_(2, t.view(1), v.view(B, KV, 1, D))
        a = F.scaled_dot_product_attention(qk[:, :H], kv.keys[i], kv.values[i], attn_mask=kv.mask, scale=scaling,
                                           enable_gqa=H != KV)
        h = h + o(a.reshape(B, H * D))[0]
        g, u = gate_up(_rms_norm(norm2, h))
        h = h + down(act(g) * u)[0]
    x = _rms_norm(dec.norm, h)
    return dec.head(x)[0] if hasattr(dec.head, "packed") else dec.head(x)


def decode_steps(model, lm, args) -> dict:
    import torch

    from gfnlm.decoding import LlamaDecoder

    torch.manual_seed(0)
    prompt = torch.randint(100, 1000, (1, args.prompt))
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    cache.batch_repeat_interleave(args.rows)
    attn = torch.ones(args.rows, args.prompt, dtype=torch.long)
    ids = torch.randint(100, 1000, (args.steps, args.rows))

    def run(dec, step, static=False):
        kv = dec.begin(cache, attn, args.steps)
        out = []
        for t in range(args.steps):
            pos = torch.full((args.rows,), args.prompt + t)
            if static:
                out.append(step(dec, kv, ids[t], pos, torch.tensor(args.prompt + t)))
            else:
                out.append(step(kv, ids[t], pos))
        return out

    def timed(dec, step, static=False) -> float:
        ts = []
        for _ in range(args.reps):
            t = time.perf_counter()
            run(dec, step, static)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    out = {}
    with torch.no_grad():
        for name, pack in (("eager, unpacked", None), ("eager, packed", args.rows)):
            dec = LlamaDecoder(lm, pack)
            for g in dec._groups():
                g.load_adapters()
            run(dec, dec.step)  # warm-up
            out[name] = {"seconds": timed(dec, dec.step)}
        dec = LlamaDecoder(lm, None)
        for g in dec._groups():
            g.load_adapters()
        want = run(dec, dec.step)
        got = run(dec, static_step, static=True)
        err = max(float((a - b).abs().max()) for a, b in zip(want, got))
        out["eager, unpacked, static shapes"] = {"seconds": timed(dec, static_step, static=True),
                                                 "max_abs_diff_to_decoder": err}
        if args.compile:
            from torch._dynamo.utils import counters

            counters.clear()
            step = torch.compile(static_step)
            t = time.perf_counter()
            got = run(dec, step, static=True)  # compiles
            first = time.perf_counter() - t
            s = timed(dec, step, static=True)
            err = max(float((a - b).abs().max()) for a, b in zip(want, got))
            out["torch.compile, unpacked, static shapes"] = {
                "seconds": s, "first_run_seconds": first, "compile_seconds": first - s,
                "max_abs_diff_to_decoder": err, "graphs": int(counters["stats"]["unique_graphs"])}
    return out


def main(argv=None) -> int:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from gfnlm.decoding import _MKL
    from gfnlm.models import load_model

    args = parse_args(argv)
    if not _MKL:
        print("this torch has no MKL packed product (torch.ops.mkl._mkl_linear): nothing to measure")
        return 0
    t0 = time.perf_counter()
    base, _ = load_model(args.model)
    lm = base
    part1 = products(lm, args.rows, args.calls)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    model.eval()
    part2 = decode_steps(model, lm, args)
    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "model": args.model,
            "rows": args.rows, "steps": args.steps, "prompt": args.prompt, "load_average": os.getloadavg()[0]}
    res = {"info": info, "products": part1, "decode": part2, "seconds": round(time.perf_counter() - t0, 1)}
    th = sorted({k for r in part1 for k in r if k.startswith("threads_")}, key=lambda k: -int(k.split("_")[1]))
    lines = [f"# The products and steps of one decode step: {args.model}, {args.rows} rows", "",
             f"{info['date']} · {info['cpus']} CPUs · torch {torch.__version__} ({info['threads']} threads) · "
             f"load average {info['load_average']:.2f}", "",
             "## 1. Linear products, microseconds per call (GFLOP/s)", "",
             "| product | shape | bit-identical | " + " | ".join(f"F.linear, {k.split('_')[1]} thr | packed, {k.split('_')[1]} thr"
                                                        for k in th) + " |",
             "|---|---|---|" + "---:|---:|" * len(th)]
    for r in part1:
        cells = []
        for k in th:
            d = r[k]
            cells += [f"{d['linear_us']:.0f} ({d['linear_gflops']:.0f})", f"{d['packed_us']:.0f} ({d['packed_gflops']:.0f})"]
        lines.append(f"| {r['product']} | {r['shape']} | {'yes' if r['bit_identical'] else 'NO'} | " + " | ".join(cells) + " |")
    lines += ["", f"## 2. {args.steps} decode steps of the LoRA model (r = 16, all linear layers), median of {args.reps}", "",
              "| decoder | seconds | compilation s | max abs. logit difference to the decoder |", "|---|---:|---:|---:|"]
    for name, d in part2.items():
        comp = f"{d['compile_seconds']:.1f} ({d['graphs']} graph(s))" if "compile_seconds" in d else "—"
        diff = f"{d['max_abs_diff_to_decoder']:.1e}" if "max_abs_diff_to_decoder" in d else "—"
        lines.append(f"| {name} | {d['seconds']:.3f} | {comp} | {diff} |")
    text = "\n".join(lines) + "\n"
    print(text)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "decode_kernels.md").write_text(text)
    (dest / "decode_kernels.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
