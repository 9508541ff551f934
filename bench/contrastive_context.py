"""Which unconditional context U makes the contrastive target R = p̃(Z.|X)^a p̃(Z.|U)^b prefer sentences
to junk? A measurement, not a training run.

A GFlowNet run on the contrastive task (README, "The target rewards junk on this model") found that with
U = "<|endoftext|>" on SmolLM2-135M the target scores one token repeated to the length limit far above
any sentence: the model given only that one special token (or only a newline) finds each repeat ever
less likely, while given the prompt it copies. For each candidate U this script scores, through the
task's own reward terms (the same objects as in training, renormalised over the legal tokens, at the
stop), on the first ``--prompts`` validation prompts:

* sentences: ``--sentences`` samples from p̃(Z|X) per prompt (the base model under the sentence constraint,
  the task's ``sampling`` baseline);
* junk: each of ``--junk`` random legal tokens, and each token of ``--junk_texts`` (default "LEGATO", the
  token that run repeated), the same for every prompt and every U, repeated ``max_new_tokens`` times,
  then the stop.

without the task's n-gram rule (``no_repeat_ngram_size`` 0: under it every junk string here has c = 0),
and reports, per U: mean log R and PMI of sentences and of junk; the fraction of (prompt, junk string)
pairs whose log R exceeds the best sentence of that prompt (junk that outranks every sampled
sentence); and the mean margin max log R(junk) - max log R(sentence) per prompt. A U under which no junk
string outranks the sentences leaves the target's mass on text.

    .venv/bin/python bench/contrastive_context.py            # table + bench/results/contrastive_context.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONTEXTS = ["<|endoftext|>", "\n", "Here is some text:", "The following is an excerpt from a web page.",
            "The following is an excerpt from a news article."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", nargs="+", default=CONTEXTS, help="candidate unconditional contexts U")
    p.add_argument("--prompts", type=int, default=10, help="validation prompts scored")
    p.add_argument("--sentences", type=int, default=8, help="samples from p(Z|X) per prompt")
    p.add_argument("--junk", type=int, default=20, help="random legal tokens, each repeated to the length limit")
    p.add_argument("--junk_texts", nargs="*", default=["LEGATO"],
                   help="junk tokens found by training runs, as text (each must be one legal token)")
    p.add_argument("--a", type=float, default=1.5)
    p.add_argument("--b", type=float, default=-0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from gfnlm.evaluation import completion_log_rewards, md_cell
    from gfnlm.models import load_model
    from gfnlm.tasks import build_config, get_task_class

    args = parse_args(argv)
    t0 = time.perf_counter()
    # the target without the task's n-gram rule (no_repeat_ngram_size 0): under the rule every junk string
    # here has c = 0, which is what the rule is for; this measures what the contexts alone do
    config = build_config("contrastive", {"model": args.model, "report_to": [], "seed": args.seed,
                                          "no_repeat_ngram_size": 0,
                                          "task_args": {"a": args.a, "b": args.b, "eval_samples": args.sentences}})
    model, tok = load_model(config.model)
    task = get_task_class("contrastive")(config.task_args)
    cons = task.constraints(config, tok)
    rows = task.eval_rows()[: args.prompts]
    spec = {"label": "sampling", "method": "sampling", "k": args.sentences, "keep": args.sentences, "marker": "o",
            "kw": {}}
    with torch.no_grad():
        sents = task._samplers(None, model, tok, config, cons, rows, [spec], seed=args.seed,
                               progress=False)["sampling"]["completions"]
    legal = cons.token_mask(len(tok), "cpu")[0].clone()
    legal[list(cons.stop_token_ids)] = False
    ids = legal.nonzero().flatten()
    g = torch.Generator().manual_seed(args.seed)
    junk_ids = ids[torch.randperm(len(ids), generator=g)[: args.junk]].tolist()
    for text in args.junk_texts:
        t = tok(text, add_special_tokens=False)["input_ids"]
        if len(t) != 1 or not legal[t[0]]:
            raise SystemExit(f"--junk_texts {text!r} is not one legal token")
        junk_ids.append(t[0])
    junk = [[[t] * cons.max_new_tokens for t in junk_ids] for _ in rows]
    out = {"model": args.model, "a": args.a, "b": args.b, "prompts": len(rows), "sentences": args.sentences,
           "junk_tokens": tok.convert_ids_to_tokens(junk_ids), "junk_length": cons.max_new_tokens, "contexts": {}}
    for u in args.contexts:
        t = get_task_class("contrastive")({**config.task_args, "unconditional_context": u})
        with torch.no_grad():
            cond, uncond = t.terms(model, tok, cons, weights=(1.0, 1.0))
            sc = {k: [completion_log_rewards(config, tok, rows, [term], cons, comps) for term in (cond, uncond)]
                  for k, comps in (("sentences", sents), ("junk", junk))}
        log_r = {k: [[args.a * x + args.b * y for x, y in zip(c, un)] for c, un in zip(*v)] for k, v in sc.items()}
        pmi = {k: statistics.fmean(x - y for c, un in zip(*v) for x, y in zip(c, un)) for k, v in sc.items()}
        best = [max(r) for r in log_r["sentences"]]
        above = statistics.fmean(x > b for r, b in zip(log_r["junk"], best) for x in r)
        out["contexts"][u] = {
            "sentence_log_r": statistics.fmean(x for r in log_r["sentences"] for x in r),
            "junk_log_r": statistics.fmean(x for r in log_r["junk"] for x in r),
            "sentence_pmi": pmi["sentences"], "junk_pmi": pmi["junk"], "junk_above_best_sentence": above,
            "margin": statistics.fmean(max(j) - b for j, b in zip(log_r["junk"], best)),
            "worst_junk": tok.convert_ids_to_tokens(junk_ids[max(range(len(junk_ids)), key=lambda i: statistics.fmean(
                r[i] for r in log_r["junk"]))])}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    lines = [f"# Contrastive target without the n-gram rule: sentences against junk under each unconditional context U "
             f"({args.model})", "",
             f"R = p̃(Z.|X)^{args.a:g} p̃(Z.|U)^{args.b:g}; {len(rows)} validation prompts; {args.sentences} samples from "
             f"p̃(Z|X) per prompt; junk: {args.junk} random legal tokens and {args.junk_texts} each repeated {cons.max_new_tokens} times; "
             f"{out['seconds']} s.", "",
             "| U | mean log R, sentences | mean log R, junk | PMI, sentences | PMI, junk | junk above the best sentence "
             "| max junk − best sentence | highest junk |", "|---|---|---|---|---|---|---|---|"]
    for u, r in out["contexts"].items():
        lines.append(f"| {md_cell(json.dumps(u))} | {r['sentence_log_r']:.2f} | {r['junk_log_r']:.2f} | {r['sentence_pmi']:.2f} | "
                     f"{r['junk_pmi']:.2f} | {100 * r['junk_above_best_sentence']:.1f} % | {r['margin']:.2f} | "
                     f"{md_cell(json.dumps(r['worst_junk']))} |")
    text = "\n".join(lines) + "\n"
    print(text)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "contrastive_context.md").write_text(text)
    (dest / "contrastive_context.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
