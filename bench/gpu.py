"""GPU check: the engine trains on a CUDA device, in fp32 and bf16, and how fast.

On a CUDA machine, with PyTorch, transformers, PEFT and Accelerate and nothing else of ours (no
embedded-model package, no hub, no shared data), this script

* builds a randomly initialised model with SmolLM2-135M's configuration (the same shapes, so the
  timings hold for the real model) and a byte-level tokenizer made locally;
* times the sampler (``gfnlm.sampling.sample``: the lean Llama decoder, or under bf16 autocast the
  model's forward with merged LoRA weights; inverse-CDF draws), also with the decoder's step compiled
  (``compile_decoder``, fp32; its compilation timed apart) and through the model's forward
  (``fast_decode=False``), against HF ``generate`` on the same shapes (16 episodes of 20 tokens after a
  28-token prompt, LoRA r=16), and checks that the compiled step draws the eager step's episodes;
* trains the rng task and one LM-reward task (arithmetic: calculator tool, few-shot LM likelihood
  of the answer) for a few steps in fp32 and in bf16, and times each step against the bare-model
  floor on the same device and shapes (HF generate + a no-grad forward + a forward/backward);
* reports peak GPU memory, and the exact total variation of the rng policy to uniform (every one of
  the 101 answers scored);
* writes ``bench/results/gpu.md`` and ``gpu.json``.

Where no CUDA device is present it says so in one line and exits 0 (``--device cpu --tiny`` runs the
same path on CPU with a tiny model, to check the script itself).

Usage::

    python bench/gpu.py                  # ~3 min on one H200 before the compiled rows (they add two compilations)
    python bench/gpu.py --device cpu --tiny --steps 2   # the script's own check, on CPU
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without installing

import torch  # noqa: E402

#: SmolLM2-135M's configuration (read from the model gfnlm embeds): 30 layers, hidden 576, GQA 9/3 heads.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
TINY = dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512)


def random_model(shape: dict, seed: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(device)
    return model.eval()


def arithmetic_data(folder: Path, seed: int = 0) -> Path:
    """Synthetic questions in the arithmetic task's file format (the timings do not depend on which
    questions): a labelled file with rationales, a pool and three test files."""
    rng = random.Random(seed)

    def question(k: int) -> dict:
        xs = [rng.randint(0, 9) for _ in range(k)]
        ops = [rng.choice("+-") for _ in range(k - 1)]
        steps, acc = [], xs[0]
        for op, x in zip(ops, xs[1:]):
            steps.append(f"{acc} {op} {x} =")
            acc = acc + x if op == "+" else acc - x
        expr = " ".join([str(xs[0])] + [f"{op} {x}" for op, x in zip(ops, xs[1:])])
        return {"str_query": f"Question: {expr} = ? Answer:", "num_sol": acc, "str_rationale": ", ".join(steps),
                "str_sol": f". The answer is {acc}."}

    folder.mkdir(parents=True, exist_ok=True)
    files = {"1digit_34_op+-_train_50.json": [question(rng.choice([3, 4])) for _ in range(50)],
             "1digit_34_op+-_hw.json": [question(rng.choice([3, 4])) for _ in range(200)]}
    files.update({f"1digit_{k}_op+-_test.json": [question(k) for _ in range(20)] for k in (3, 4, 5)})
    for name, rows in files.items():
        (folder / name).write_text(json.dumps(rows))
    return folder


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> list[float]:
    """Wall seconds of ``fn()`` for ``reps`` repetitions after one warm-up, synchronised."""
    fn()
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def autocast(device, precision: str):
    import contextlib

    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def reset_accelerate() -> None:
    """Accelerate keeps one precision per process; each run here starts from a fresh state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------ sampler


def lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False)).eval()


def sampler_vs_generate(shape, device, precision: str, reps: int, B=16, N=20, L=28) -> dict:
    """The engine's sampler against HF generate on the same shapes (same LoRA model)."""
    from gfnlm.policy import fp32_logits
    from gfnlm.sampling import Constraints, sample

    model = fp32_logits(lora(random_model(shape, 0, device), 1))
    prompt = list(range(3, 3 + L))
    cons = Constraints(stop_token_ids=[2], min_new_tokens=N, max_new_tokens=N)
    ids = torch.tensor([prompt] * B, device=device)
    gen = torch.Generator(device=device)

    def ours(merge=True, fast=True, compiled=False):
        gen.manual_seed(0)
        with autocast(device, precision):
            s = sample(model, [prompt], torch.zeros(B, dtype=torch.long), cons, generator=gen, merge_adapters=merge,
                       fast_decode=fast, compile_decoder=compiled)
        assert int(s.lengths.min()) == N

    def hf():
        with torch.no_grad(), autocast(device, precision):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, min_new_tokens=N,
                                 max_new_tokens=N, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        assert out.shape == (B, L + N)

    t = {"sampler": timed(ours, device, reps),
         "sampler, model forward": timed(lambda: ours(True, False), device, reps),
         "sampler, adapters unmerged": timed(lambda: ours(False, False), device, reps),
         "HF generate": timed(hf, device, reps)}
    compiled = compiled_sampler(lambda: ours(compiled=True), device, reps) if precision == "no" else {}
    if "seconds" in compiled:
        t["sampler, compiled"] = compiled.pop("seconds")
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"precision": precision, "B": B, "N": N, "prompt": L, "seconds": med,
            "sampler_over_generate": med["sampler"] / med["HF generate"], "compiled": compiled}


def compiled_sampler(run, device, reps: int) -> dict:
    """``compile_decoder=True`` (fp32 only: under bf16 autocast the sampler uses the model's forward):
    the first sampling, which compiles, then ``reps`` timed ones. A compiler failure is recorded as its
    one-line message, not raised, so the rest of the check still runs."""
    from gfnlm.decoding import compile_seconds
    from gfnlm.errors import ConfigError

    c0 = compile_seconds()
    sync(device)
    t0 = time.perf_counter()
    try:
        run()
    except ConfigError as e:
        return {"error": str(e)}
    sync(device)
    first = time.perf_counter() - t0
    return {"first_sampling_seconds": first, "compile_seconds": compile_seconds() - c0,
            "seconds": timed(run, device, reps)}


def device_checks(shape, device) -> dict:
    """What CI cannot see: on this device, a seed gives the same episodes, sampled log q equals the
    teacher-forced pass's (fp32), and the bf16 sampler's episodes score finitely under the fp32 pass."""
    from gfnlm.errors import ConfigError
    from gfnlm.policy import fp32_logits
    from gfnlm.sampling import Constraints, sample
    from gfnlm.scoring import score

    model = fp32_logits(lora(random_model(shape, 0, device), 1))
    cons = Constraints(stop_token_ids=[2], min_new_tokens=1, max_new_tokens=20)
    prompts = [list(range(3, 31)), list(range(40, 50))]
    idx = torch.tensor([0, 1] * 8)

    def draw(seed, precision="no", compiled=False):
        g = torch.Generator(device=device).manual_seed(seed)
        with autocast(device, precision):
            return sample(model, prompts, idx, cons, generator=g, temperature=1.5, compile_decoder=compiled)

    a, b = draw(7), draw(7)
    try:
        c = draw(7, compiled=True)
        compiled = {"compiled_decoder_same_episodes": bool(torch.equal(a.tokens, c.tokens)
                                                           and torch.equal(a.lengths, c.lengths)),
                    "compiled_vs_eager_log_pf_max_abs": float((a.log_pf - c.log_pf).abs().max())}
    except ConfigError as e:
        compiled = {"compiled_decoder_error": str(e)}
    with torch.no_grad():
        sc = score(model, prompts, a.prompt_index, a.tokens, a.lengths, cons)
        lo = draw(7, "bf16")
        sc_lo = score(model, prompts, lo.prompt_index, lo.tokens, lo.lengths, cons)
    fin = torch.isfinite(a.log_pterm)
    return {"same_seed_same_episodes": bool(torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)),
            "sampled_vs_scored_log_pf_max_abs": float((a.log_pf - sc.log_pf).abs().max()),
            "sampled_vs_scored_log_pterm_max_abs": float((a.log_pterm[fin] - sc.log_pterm[fin]).abs().max()),
            "bf16_sampler_vs_fp32_scoring_log_pf_max_abs": float((lo.log_pf - sc_lo.log_pf).abs().max()),
            **compiled, "mean_length": float(a.lengths.float().mean())}


# ------------------------------------------------------------------------------------ training


def floor_seconds(model, device, precision, B: int, N: int, L: int, reps: int) -> dict:
    """The bare model on a step's shapes: generate B x N tokens after an L-token prompt, a no-grad
    forward over the B x (L+N) sequences (adapters off), a forward+backward over the same."""
    from gfnlm.policy import base_model

    ids = torch.randint(3, 200, (B, L), device=device)

    def gen():
        with torch.no_grad(), autocast(device, precision):
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  min_new_tokens=N, max_new_tokens=N, top_k=0, top_p=1.0, pad_token_id=0)

    seqs = gen()

    def fwd():
        with torch.no_grad(), base_model(model) as base:
            base(input_ids=seqs).logits

    def fwd_bwd():
        with autocast(device, precision):
            loss = model(input_ids=seqs).logits.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    parts = {"generate": timed(gen, device, reps), "forward (no grad)": timed(fwd, device, reps),
             "forward+backward": timed(fwd_bwd, device, reps)}
    med = {k: statistics.median(v) for k, v in parts.items()}
    return {**med, "total": sum(med.values())}


def train_task(task: str, shape, tok, device, precision: str, steps: int, data_dir: Path, out_dir: Path) -> dict:
    from gfnlm.tasks import build_config, make_trainer

    reset_accelerate()
    overrides = {"mixed_precision": precision, "max_steps": steps, "report_to": [], "disable_tqdm": True,
                 "output_dir": str(out_dir / f"{task}-{precision}"), "seed": 0, "chat_template": "never"}
    if task == "arithmetic":
        overrides["task_args"] = {"data_dir": str(data_dir)}
    config = build_config(task, overrides)
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    task_obj, trainer = make_trainer(config, model=random_model(shape, 0, "cpu"), tokenizer=tok)  # seeds the buffer too
    if trainer.accelerator.device.type != torch.device(device).type:
        raise RuntimeError(f"the trainer chose {trainer.accelerator.device}, expected {device}")
    texts = ["7", "42", "100", "5"] if task == "rng" else ["1 + 2 =", "3 - 1 =", "4 + 4 =", "9 + 9 ="]
    tokens, lengths, mask = trainer.encode_completions(texts)
    fixed = trainer.collector.reward_batch([0], torch.zeros(4, dtype=torch.long), tokens, lengths,
                                           mask if trainer.tool is not None else None)
    reward_before = trainer.log_rewards(fixed)
    times, history = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        history.append(trainer.training_step())
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None
    a = trainer.args
    B = a.prompts_per_step * a.samples_per_prompt
    N = a.max_new_tokens + (a.max_tool_tokens if trainer.tool is not None else 0)
    L = max(len(p) for p in trainer.prompt_ids)
    row = {"task": task, "precision": precision, "steps": steps, "step_seconds": times,
           "step_median": statistics.median(times[1:] if len(times) > 1 else times),
           "loss": [h["loss"] for h in history], "log_r_mean": [h["reward/log_r_mean"] for h in history],
           "peak_gib": peak, "reward_of_fixed_batch": reward_before.tolist(),
           "reward_unchanged_by_training": bool(torch.equal(reward_before, trainer.log_rewards(fixed))),
           "episodes_per_step": B, "max_state_tokens": N, "prompt_tokens": L}
    if task == "rng":
        ev = task_obj.evaluate(trainer.model, tok, config, trainer.constraints, n=256, seed=0)
        row.update(exact_tv_to_uniform=ev["exact_tv_to_uniform"], exact_valid_mass=ev["exact_valid_mass"])
    if task == "rng":  # checkpoint on this device, two more steps; a fresh trainer resumes and takes the same two
        ck = trainer.save_checkpoint(out_dir / f"{task}-{precision}" / "checkpoint-resume")
        for _ in range(2):
            trainer.training_step()
        want = trainer.trainable_state()
        _, again = make_trainer(config, model=random_model(shape, 0, "cpu"), tokenizer=tok)
        again.load_checkpoint(ck)
        for _ in range(2):
            again.training_step()
        got = again.trainable_state()
        row["resume_max_abs_diff"] = max(float((got[k] - want[k]).abs().max()) for k in want)
        _, control = make_trainer(config, model=random_model(shape, 0, "cpu"), tokenizer=tok)  # the same run again
        for _ in range(steps + 2):
            control.training_step()
        again_state = control.trainable_state()
        row["run_to_run_max_abs_diff"] = max(float((again_state[k] - want[k]).abs().max()) for k in want)
        del control
        row["checkpoint_files"] = sorted(p.name for p in Path(ck).iterdir())
        del again
    row["floor"] = floor_seconds(trainer.model, device, precision, B, N, L, reps=3)
    row["step_over_floor"] = row["step_median"] / row["floor"]["total"]
    del trainer
    return row


# ------------------------------------------------------------------------------------ report


def machine(device) -> dict:
    import transformers

    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import accelerate
        import peft

        info.update(peft=peft.__version__, accelerate=accelerate.__version__)
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["gpu"] = f"none (CPU, {os.cpu_count()} cores)"
    return info


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# GPU check: {res['model']}", "",
             f"{m['date']} · {m['gpu']} · torch {m['torch']} · transformers {m['transformers']} · "
             f"peft {m.get('peft', '?')} · accelerate {m.get('accelerate', '?')}", "",
             "## Sampler against HF generate (same LoRA model, 16 episodes x 20 tokens, prompt 28)", "",
             "| precision | sampler s | sampler, compiled s | sampler, model forward s | sampler, adapters unmerged s "
             "| HF generate s | sampler / generate | compiled / generate |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["sampler"]:
        s = r["seconds"]
        c = s.get("sampler, compiled")
        comp_s, comp_ratio = ("—", "—") if c is None else (f"{c:.3f}", f"{c / s['HF generate']:.2f}")
        lines.append(f"| {r['precision']} | {s['sampler']:.3f} | {comp_s} | "
                     f"{s.get('sampler, model forward', float('nan')):.3f} | {s['sampler, adapters unmerged']:.3f} | "
                     f"{s['HF generate']:.3f} | {r['sampler_over_generate']:.2f} | {comp_ratio} |")
    for r in res["sampler"]:
        comp = r.get("compiled") or {}
        if "error" in comp:
            lines.append(f"- {r['precision']}, compile_decoder: {comp['error']}")
        elif comp:
            lines.append(f"- {r['precision']}, compile_decoder: the first sampling took {comp['first_sampling_seconds']:.1f} s, "
                         f"{comp['compile_seconds']:.1f} s of it compiling (bf16 autocast samples through the model's forward, "
                         "which is not compiled)")
    lines += ["", f"## Training steps ({res['steps']} per run; median after the first)", "",
              "| task | precision | step s | floor s | step / floor | peak GiB | exact TV (rng) | losses |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in res["training"]:
        peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        tv = f"{r['exact_tv_to_uniform']:.3f}" if "exact_tv_to_uniform" in r else "—"
        losses = ", ".join(f"{x:.3g}" for x in r["loss"])
        lines.append(f"| {r['task']} | {r['precision']} | {r['step_median']:.3f} | {r['floor']['total']:.3f} | "
                     f"{r['step_over_floor']:.2f} | {peak} | {tv} | {losses} |")
    lines += ["", "## Checks on this device", ""] + [f"- {k}: {v}" for k, v in res["checks"].items()]
    lines += [f"- {r['task']} {r['precision']}: checkpoint, 2 more steps, resume in a fresh trainer, the same 2 steps: "
              f"max |difference| of the trainable parameters {r['resume_max_abs_diff']:.3g} (the whole run again, "
              f"uninterrupted: {r['run_to_run_max_abs_diff']:.3g})"
              for r in res["training"] if "resume_max_abs_diff" in r]
    lines += ["", "- floor = HF generate of the step's episodes (B x max state tokens, prompt repeated per row) + one "
              "no-grad forward over them (adapters off) + one forward+backward, in the run's precision, same device.",
              "- The model is randomly initialised with SmolLM2-135M's configuration, so the exact TV of the rng policy "
              "after a few steps shows that evaluation runs on the device, not what training reaches.",
              "- bf16: the policy's forward and backward under autocast; LM rewards in fp32, logits of every pass in fp32."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu (a check of the script)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of SmolLM2-135M's shapes")
    ap.add_argument("--steps", type=int, default=4, help="training steps per (task, precision)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of the sampler comparison")
    ap.add_argument("--tasks", default="rng,arithmetic")
    ap.add_argument("--precisions", default="no,bf16")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("gpu check: no CUDA device on this machine; nothing measured (run it on a CUDA machine, or "
              "--device cpu --tiny to check the script)")
        return 0
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu check: --device {device} but torch sees no CUDA device; nothing measured")
        return 0
    t_start = time.perf_counter()
    shape = TINY if args.tiny else SMOLLM2_135M
    from gfnlm.models import byte_level_tokenizer

    tok = byte_level_tokenizer()
    precisions = args.precisions.split(",")
    res = {"model": "random init, " + ("tiny Llama" if args.tiny else "SmolLM2-135M configuration"),
           "machine": machine(device), "steps": args.steps, "sampler": [], "training": []}
    res["checks"] = device_checks(shape, device)
    print(json.dumps(res["checks"]), flush=True)
    for p in precisions:
        res["sampler"].append(sampler_vs_generate(shape, device, p, args.reps))
        print(json.dumps(res["sampler"][-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path("../shared/data/arithmetic")
        data = data if data.is_dir() else arithmetic_data(Path(tmp) / "arithmetic")
        for task in args.tasks.split(","):
            for p in precisions:
                row = train_task(task, shape, tok, device, p, args.steps, data, Path(tmp))
                res["training"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("step_seconds",)}), flush=True)
    by = {(r["task"], r["precision"]): r for r in res["training"]}
    for task in args.tasks.split(","):
        if (task, "no") in by and (task, "bf16") in by:
            x, y = (torch.tensor(by[(task, q)]["reward_of_fixed_batch"]) for q in ("no", "bf16"))
            ok = torch.isfinite(x)
            res["checks"][f"{task}_reward_bf16_run_vs_fp32_run_max_abs"] = float((x[ok] - y[ok]).abs().max())
    res["wall_seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu" if device.startswith("cuda") and not args.tiny else "gpu_cpu_check"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {out / name}.md and .json in {res['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
