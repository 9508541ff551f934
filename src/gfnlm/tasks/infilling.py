"""Story infilling (the paper's Table 2): sample the middle of a story given its beginning and ending.

Data: five-sentence stories (``../shared/data/stories/stories.jsonl``, ROCStories; or the user's
file in the same form, or with ``beginning`` / ``ending`` [/ ``middle``] fields). X = sentences
1-3 (the beginning), Z = sentence 4 (the middle), Y = sentence 5 (the ending). A fixed split with
``split_seed``: the first ``test_stories`` of a seeded shuffle are the test set, the next
``valid_stories`` the validation set, the next ``train_stories`` the training set; a training story
whose beginning also occurs in the test or validation set is dropped.

Policy q(Z | X, Y): the prompt "Beginning: X\\nEnding: Y\\nMiddle:" (no chat template). Z is one
sentence: the stop action is the full stop "." that ends it, so the middle's text is Z + "."; the
actions are the tokens without a newline, ".", "!" or "?" (and no special tokens), 2 to 24 of them
(every true middle of the data is 2 to 19 SmolLM2 tokens before its final punctuation). Stopping at
the end of a sentence rather than at EOS or a newline keeps episodes one sentence long: the base
model rarely writes a newline after its sentence and ran on to the length limit in most episodes.
True middles that end with "!" or "?" (6% of the data) are used with "." in the buffer and SFT.

Reward, the paper's definition (not its code's): log R(z_1:t ⊤) = log p_LM(z_1:t "." | X) +
log p_LM(" " Y | X z_1:t "."), with X the beginning only, for every prefix where the policy may stop
(t >= 2), from the engine's one :class:`~gfnlm.rewards.LMLikelihoodReward` (context = beginning,
suffix = ". " + ending, full vocabulary). The LM is the base model (adapters off), or with
``task_args.reward_model`` a reward LM fine-tuned on the training stories (``gfnlm sft --task
infilling --target reward``: LoRA, maximum likelihood of sentences 4-5 given 1-3), merged and frozen.

Replay: each training story's buffer is seeded with its true middle (``seed_buffer``), scored and
added when the story is first drawn.

Evaluation (``gfnlm eval --task infilling``): on the test stories, ``eval_samples`` middles per
story at ``eval_temperature`` (the paper's 0.9) and one greedy middle, scored against the true
sentence 4 with nltk BLEU-4 and GLEU-4 and with BERTScore (bert-score on a packaged embedding
model, named in every report); mean ± std over samples and stories; then the sampler diagnostics.
Optional, off by default: an LLM judge's 1-5 rating of each middle in its story, through any
OpenAI-compatible endpoint (``task_args.judge_url``, ``judge_model``; the ``openai`` client).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import JSON_ERRORS, json_problem, read_utf8, render_prompt
from ..errors import DataError, GFNLMError
from ..rewards import LMLikelihoodReward
from ..sampling import Constraints
from ..trainer import constraints_from_config
from . import Task, format_diagnostics

PROMPT = "Beginning: {beginning}\nEnding: {ending}\nMiddle:"
JUDGE_PROMPT = ("Here is a five-sentence story with its fourth sentence given separately.\n"
                "Beginning: {beginning}\nFourth sentence: {middle}\nEnding: {ending}\n"
                "Rate from 1 (does not fit) to 5 (fits perfectly) how well the fourth sentence connects the "
                "beginning to the ending. Answer with the number only.")
END = "."  # the stop action: the middle sentence's full stop
NOT_IN_A_SENTENCE = ("\n", "\r", ".", "!", "?")
METRICS = ("bleu4", "gleu4", "bertscore", "bertscore_rescaled", "judge")


# --- data ---------------------------------------------------------------------------------------
def story_row(beginning: str, ending: str, middle: str | None = None, id: str | None = None, where: str = "story") -> dict:
    """A dataset row: the policy's prompt and the columns the reward and evaluation read."""
    beginning, ending = " ".join(str(beginning).split()), " ".join(str(ending).split())
    if not beginning:
        raise DataError(f"{where}: the beginning is empty: give the first sentences of the story")
    if not ending:
        raise DataError(f"{where}: the ending is empty: give the story's last sentence")
    row = {"prompt": PROMPT.format(beginning=beginning, ending=ending), "beginning": beginning, "ending": ending}
    if middle is not None:
        row["middle"] = " ".join(str(middle).split())
    if id is not None:
        row["id"] = str(id)
    return row


def load_stories(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines story file: each line ``{"sentences": [s1, .., s5]}`` (X = s1-s3, Z = s4,
    Y = s5) or ``{"beginning", "ending"[, "middle"]}``. A bad line is a one-line error naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"story file {path} not found: give task_args.data_file (JSON lines of five-sentence stories)")
    rows = []
    for n, line in enumerate(read_utf8(p).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except JSON_ERRORS as e:
            raise DataError(f"{where}: not JSON ({json_problem(e)}): each line must be one story object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each line must be a JSON object with 'sentences' or 'beginning'/'ending'")
        if "sentences" in obj:
            s = obj["sentences"]
            if not isinstance(s, list) or len(s) != 5 or not all(isinstance(x, str) and x.strip() for x in s):
                got = len(s) if isinstance(s, list) else type(s).__name__
                raise DataError(f"{where}: 'sentences' must be 5 non-empty sentences (got {got}): X = 1-3, Z = 4, Y = 5")
            rows.append(story_row(" ".join(s[:3]), s[4], s[3], obj.get("id", f"line{n}"), where))
        elif "beginning" in obj and "ending" in obj:
            rows.append(story_row(obj["beginning"], obj["ending"], obj.get("middle"), obj.get("id", f"line{n}"), where))
        else:
            raise DataError(f"{where}: a story needs 'sentences' (5) or 'beginning' and 'ending'")
    if not rows:
        raise DataError(f"story file {path} holds no stories")
    return rows


def split_stories(rows: list[dict], seed: int, n_test: int, n_valid: int, n_train: int) -> dict[str, list[dict]]:
    """Seeded shuffle, then test / validation / train in that order. A story whose beginning occurs
    in an earlier part is dropped from the later one, so no test beginning is ever trained on."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    parts: dict[str, list[dict]] = {"test": [], "valid": [], "train": []}
    sizes = {"test": n_test, "valid": n_valid, "train": n_train}
    seen: set[str] = set()
    i = 0
    for name in ("test", "valid", "train"):
        while len(parts[name]) < sizes[name] and i < len(order):
            r = rows[order[i]]
            i += 1
            key = r["beginning"].lower()
            if key not in seen:
                seen.add(key)
                parts[name].append(r)
    return parts


def summary(values: list[float]) -> dict:
    """Mean and standard deviation (over samples and stories)."""
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)}


# --- the task -----------------------------------------------------------------------------------
@dataclass
class InfillingArgs:
    data_file: str = "../shared/data/stories/stories.jsonl"
    split_seed: int = 0
    test_stories: int = 100
    valid_stories: int = 100
    train_stories: int = 900
    reward_model: str | None = None  # a `gfnlm sft --task infilling --target reward` checkpoint; None: the base LM
    seed_buffer: bool = True
    eval_stories: int = 100
    eval_samples: int = 4
    eval_temperature: float = 0.9
    bertscore_model: str = "all-MiniLM-L6-v2"
    bertscore_layer: int = 6
    judge_url: str | None = None  # optional LLM judge: an OpenAI-compatible endpoint (off by default)
    judge_model: str = "gpt-4o-mini"
    judge_api_key_env: str = "OPENAI_API_KEY"
    one_sentence: bool = True  # actions exclude newlines and sentence ends (False: only the reward LM's SFT)


class InfillingTask(Task):
    name = "infilling"
    Args = InfillingArgs
    sft_targets = ("policy", "reward")
    config_defaults = {
        "task": "infilling",
        "chat_template": "never",
        "stop_tokens": [END],
        "min_new_tokens": 2,
        "max_new_tokens": 24,
        "loss_type": "modified_subtb",
        "samples_per_prompt": 8,
        "prompts_per_step": 2,
        "tempered_fraction": 0.5,
        "replay_fraction": 0.25,
        "reward_temperature": 1.1,
        "reward_temperature_end": 0.85,
        "reward_temperature_horizon": 100,
        "learning_rate": 1e-4,
        "warmup_steps": 20,
        "max_steps": 200,
        "output_dir": "runs/infilling",
    }

    def __init__(self, task_args: dict | None = None):
        super().__init__(task_args)
        self._split: dict[str, list[dict]] | None = None
        self._bertscore = None
        self._reward_lm: dict[str, object] = {}  # the merged reward LM, by device: loaded once per task

    # data
    def split(self) -> dict[str, list[dict]]:
        """``{"test", "valid", "train"}`` rows of the story file (:func:`split_stories`)."""
        if self._split is None:
            a = self.args
            self._split = split_stories(load_stories(self.data_file(a.data_file)), a.split_seed, a.test_stories,
                                        a.valid_stories, a.train_stories)
            if not self._split["train"]:
                raise DataError(f"{a.data_file}: no training stories left after {a.test_stories} test and "
                                f"{a.valid_stories} validation stories: lower task_args.test_stories / valid_stories")
        return self._split

    def dataset(self) -> list[dict]:
        return self.split()["train"]

    def eval_rows(self) -> list[dict]:
        return self.split()["test"]

    prompt_fields = ("beginning", "ending")

    def prompt_of(self, columns: dict) -> str:
        """``gfnlm sample --beginning TEXT --ending TEXT``."""
        if not self.args.one_sentence:
            raise GFNLMError("this checkpoint is a reward LM (it continues a beginning): sample from it with --prompt TEXT")
        if set(columns) != {"beginning", "ending"}:
            raise GFNLMError("infilling samples from --beginning TEXT --ending TEXT (the story's first sentences and its last)")
        return story_row(columns["beginning"], columns["ending"], where="command line")["prompt"]

    # policy
    def allowed_token_ids(self, tokenizer) -> list[int] | None:
        special = set(tokenizer.all_special_ids)
        if not self.args.one_sentence:
            return None
        ids = self.tokens_where(tokenizer, lambda t: bool(t) and not any(c in t for c in NOT_IN_A_SENTENCE),
                                "free of newlines and sentence ends")
        return [i for i in ids if i not in special]

    def completion_text(self, text: str) -> str:
        """The middle sentence an episode stands for: its tokens, then the full stop (the stop action)."""
        return text.strip() + END if self.args.one_sentence else text

    def constraints(self, config, tokenizer) -> Constraints:
        return constraints_from_config(config, tokenizer, allowed_token_ids=self.allowed_token_ids(tokenizer))

    def reward_lm(self, model, config=None):
        """The LM the reward reads: the policy's base model, or the ``reward_model`` checkpoint's LoRA
        merged into a frozen copy (on the policy's device)."""
        path = self.args.reward_model
        if not path:
            return model
        device = next(model.parameters()).device
        if str(device) in self._reward_lm:  # training and the diagnostics of gfnlm eval both ask for it
            return self._reward_lm[str(device)]
        from ..trainer import load_trained

        lm, _, cfg, _ = load_trained(path)
        if config is not None and cfg.model != config.model:
            raise GFNLMError(f"reward_model {path} was trained on {cfg.model}, not {config.model}: "
                             "fine-tune a reward LM on the policy's model")
        if hasattr(lm, "merge_and_unload"):
            lm = lm.merge_and_unload()
        lm.requires_grad_(False).eval()
        self._reward_lm[str(device)] = lm.to(device)
        return self._reward_lm[str(device)]

    def reward_model_name(self) -> str:
        return f"fine-tuned reward LM {self.args.reward_model}" if self.args.reward_model else "base LM"

    def reward_funcs(self, model, tokenizer, constraints, config=None) -> list:
        """log R(z_1:t ⊤) = log p_LM(z_1:t "." | X) + log p_LM(" " Y | X z_1:t "."), X the beginning only,
        at every prefix where the policy may stop (the one LM-likelihood reward)."""
        return [LMLikelihoodReward(self.reward_lm(model, config), tokenizer, context=lambda row: row["beginning"],
                                   suffix=lambda row: END + " " + row["ending"], prefixes="stoppable",
                                   constraints=constraints, renormalise=False, name="middle_and_ending_likelihood")]

    def supervised_completions(self, rows: list[dict] | None = None) -> dict[str, list[str]]:
        """The true middles of the training stories (or of ``rows``), without their final punctuation
        (the stop action writes the full stop)."""
        out = {}
        for r in self.dataset() if rows is None else rows:
            body = r.get("middle", "").rstrip(" .!?")
            if body and not any(c in body for c in NOT_IN_A_SENTENCE):  # else the policy cannot write it
                out[r["prompt"]] = [" " + body]
        return out

    def sft_data(self, target: str):
        """``policy``: (beginning, ending) -> middle; ``reward``: the reward LM, maximum likelihood of
        " s4 s5" after the beginning alone (the reward's context), so its output is the reward's text."""
        if target == "policy":
            return super().sft_data(target)
        if target != "reward":
            raise GFNLMError(f"infilling fine-tunes --target policy or reward, not {target!r}")
        rows = [{"prompt": r["beginning"]} for r in self.dataset() if r.get("middle")]
        return rows, self.reward_completions(self.dataset()), {"task_args": {"one_sentence": False}, "stop_tokens": ["eos"], "min_new_tokens": 1,
                             "max_new_tokens": 96, "output_dir": "runs/infilling-reward-lm"}

    @staticmethod
    def reward_completions(rows: list[dict]) -> dict[str, list[str]]:
        """The reward LM's labelled text: " s4 s5" after the beginning alone, by beginning."""
        return {r["beginning"]: [f" {r['middle']} {r['ending']}"] for r in rows if r.get("middle")}

    def heldout_completions(self, target: str = "policy") -> dict[str, list[str]]:
        """The validation stories' middles (``policy``) or middles and endings (``reward``)."""
        rows = self.split()["valid"]
        return self.reward_completions(rows) if target == "reward" else self.supervised_completions(rows)

    def prepare_trainer(self, trainer) -> None:
        if self.args.seed_buffer and trainer.args.max_steps > 0:
            kept, skipped = trainer.collector.writable(self.supervised_completions())
            if skipped:
                print(f"infilling: {skipped} true middles the policy cannot write (length outside "
                      f"{trainer.constraints.min_new_tokens}..{trainer.constraints.max_new_tokens} tokens, or a token "
                      "that is not an action) not put in the replay buffer")
            if kept:  # scored when a story is first drawn: a short run never scores all 900
                trainer.seed_buffer(kept, lazy=True)

    # evaluation
    def scorer(self):
        """BERTScore on the packaged embedding model, rescaled against random pairs of training middles."""
        from ..evaluation import BERTScore

        if self._bertscore is None:
            sents = [r["middle"] for r in self.dataset() if r.get("middle")]
            self._bertscore = BERTScore(self.args.bertscore_model, self.args.bertscore_layer, sents)
        return self._bertscore

    def score_texts(self, candidates: list[str], references: list[str]) -> dict[str, list[float]]:
        """Per pair: BLEU-4, GLEU-4 (nltk) and BERTScore F1 (raw and rescaled)."""
        from ..evaluation import bleu4, gleu4

        out = {"bleu4": [bleu4(c, r) for c, r in zip(candidates, references)],
               "gleu4": [gleu4(c, r) for c, r in zip(candidates, references)]}
        return {**out, **self.scorer()(candidates, references)}

    def sample_statistics(self, rows: list[dict], texts: list[list[str]]) -> dict[str, list[list[float]]]:
        """Table 2's figures of each sampled middle against its story's true middle (BLEU-4, GLEU-4,
        BERTScore F1, raw and rescaled) and its length in words, so that the diagnostics estimate what
        a sampler that matched the target posterior would score (none where a row has no true middle)."""
        if not rows or not all(r.get("middle") for r in rows):
            return {}
        flat = [(t, r["middle"]) for r, ts in zip(rows, texts) for t in ts]
        scores = self.score_texts([c for c, _ in flat], [m for _, m in flat])
        scores["length_words"] = [float(len(c.split())) for c, _ in flat]
        k = len(texts[0])
        return {name: [v[i * k:(i + 1) * k] for i in range(len(rows))] for name, v in scores.items()}

    def judge_scores(self, rows: list[dict], middles: list[str]) -> list[float | None]:
        """The LLM judge's 1-5 rating of each middle in its story (None when the answer holds no rating)."""
        import re

        from ..evaluation import LLMJudge

        judge = LLMJudge(self.args.judge_url, self.args.judge_model, self.args.judge_api_key_env)
        answers = judge.ask([JUDGE_PROMPT.format(beginning=r["beginning"], middle=m, ending=r["ending"])
                             for r, m in zip(rows, middles)])
        found = [re.match(r"\s*([1-5])(?![0-9])", a) for a in answers]  # the answer starts with the rating
        return [float(f.group(1)) if f else None for f in found]

    @torch.no_grad()
    def infill(self, model, tokenizer, config, constraints, rows: list[dict], *, k: int, temperature: float,
               seed: int = 0, progress: bool = False) -> list[tuple[list[str], str]]:
        """For each row, ``k`` middles sampled at ``temperature`` and one greedy middle (text)."""
        from ..evaluation import sample_votes

        prompts = [render_prompt(tokenizer, r["prompt"], config.chat_template) for r in rows]
        dec = lambda ids: self.completion_text(tokenizer.decode(ids, skip_special_tokens=True))  # noqa: E731
        return [([dec(s) for s in sampled], dec(greedy))
                for sampled, greedy in sample_votes(model, tokenizer, prompts, constraints, k, temperature, seed=seed,
                                                    batch_prompts=max(1, 32 // (k + 1)), progress=progress,
                                                    desc="infilling")]

    def evaluate(self, model, tokenizer, config, constraints, *, n: int | None = None, seed: int = 0,
                 progress: bool = False, **kw) -> dict:
        """BLEU-4, GLEU-4 and BERTScore against the true middles of the first ``n`` test stories, for the
        samples at ``eval_temperature`` and for greedy decoding (mean, std over samples and stories)."""
        a = self.args
        rows = [r for r in self.split()["test"] if r.get("middle")][: n or a.eval_stories]
        if not rows:
            raise DataError("infilling evaluation needs test stories with a true middle")
        made = self.infill(model, tokenizer, config, constraints, rows, k=a.eval_samples,
                           temperature=a.eval_temperature, seed=seed, progress=progress)
        sampled = [(s, r["middle"]) for (ss, _), r in zip(made, rows) for s in ss]
        greedy = [(g, r["middle"]) for (_, g), r in zip(made, rows)]
        out = {"stories": len(rows), "samples_per_story": a.eval_samples, "temperature": a.eval_temperature,
               "reward_model": self.reward_model_name(), "bertscore": self.scorer().describe(),
               "reference_length_words": summary([len(r["middle"].split()) for r in rows])}
        for label, pairs in ((f"T={a.eval_temperature:g}", sampled), ("greedy", greedy)):
            scores = self.score_texts([c for c, _ in pairs], [r for _, r in pairs])
            if a.judge_url:
                story = [r for r, (ss, _) in zip(rows, made) for _ in (ss if label != "greedy" else [0])]
                rated = self.judge_scores(story, [c for c, _ in pairs])
                scores["judge"] = [x for x in rated if x is not None]
                out[f"judge_unrated_{label}"] = sum(x is None for x in rated)
            out[label] = {m: summary(v) for m, v in scores.items()}
            out[label]["length_words"] = summary([len(c.split()) for c, _ in pairs])
        out["examples"] = [{"beginning": r["beginning"], "ending": r["ending"], "true_middle": r["middle"],
                            "sampled": ss[:3], "greedy": g} for (ss, g), r in list(zip(made, rows))[:3]]
        return out

    @classmethod
    def eval_command(cls, args, extra: dict) -> int:
        """Table 2: prompting (the base model, same prompt), the SFT checkpoint if given, and the
        GFlowNet checkpoint, by metric; then the GFlowNet sampler's diagnostics."""
        from ..policy import base_model
        from ..trainer import load_trained

        model, tok, config, cons, task = cls.load_for_eval(args, extra)
        results: dict[str, dict] = {}
        run = dict(n=args.n, seed=args.seed, progress=True)
        with torch.no_grad():
            with base_model(model) as base:
                results["Prompting"] = task.evaluate(base, tok, config, cons, **run)
            if args.sft_checkpoint:
                results["Supervised fine-tuning"] = task.evaluate(load_trained(args.sft_checkpoint)[0], tok, config,
                                                                  cons, **run)
            if args.checkpoint:
                results["GFlowNet fine-tuning"] = task.evaluate(model, tok, config, cons, **run)
        print(table2(results))
        if args.diagnostics and args.checkpoint:
            results["diagnostics"] = task.diagnostics(model, tok, config, cons, k=args.diagnostics,
                                                      max_prompts=args.diagnostics_prompts, seed=args.seed,
                                                      progress=True)
            print("GFlowNet policy, test stories: " + format_diagnostics(results["diagnostics"]))
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=1))
        return 0


def table2(results: dict[str, dict]) -> str:
    """The paper's Table 2: one row per method; BLEU-4 and GLEU-4 in %, BERTScore F1 (raw and
    rescaled); mean ± std over samples and stories, sampled (greedy in brackets); and the middles'
    mean length in words, where the results have it."""
    methods = {k: v for k, v in results.items() if isinstance(v, dict) and "stories" in v}
    if not methods:
        return "(no results)"
    first = next(iter(methods.values()))
    t = f"T={first['temperature']:g}"
    scale = {"bleu4": 100, "gleu4": 100, "bertscore": 1, "bertscore_rescaled": 1, "judge": 1}
    cols = [m for m in METRICS if m in first[t]]
    names = {"bleu4": "BLEU-4 (%)", "gleu4": "GLEU-4 (%)", "bertscore": "BERTScore F1", "bertscore_rescaled": "BERTScore F1, rescaled",
             "judge": "LLM judge (1-5)"}
    length = all("length_words" in r[t] and "length_words" in r["greedy"] for r in methods.values())
    lines = ["| method | " + " | ".join(names[c] for c in cols) + (" | length (words)" if length else "") + " |",
             "|---|" + "---|" * (len(cols) + length)]
    for name, r in methods.items():
        cells = []
        for c in cols:
            s, g, f = r[t][c], r["greedy"][c], scale[c]
            digits = 1 if f == 100 else 3
            cells.append(f"{f * s['mean']:.{digits}f} ± {f * s['std']:.{digits}f} ({f * g['mean']:.{digits}f})")
        if length:
            cells.append(f"{r[t]['length_words']['mean']:.1f} ({r['greedy']['length_words']['mean']:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rewards = {r["reward_model"] for r in methods.values()}
    reward = (first["reward_model"] if len(rewards) == 1 else
              "; ".join(f"{name}: {r['reward_model']}" for name, r in methods.items()))
    ref = next((r["reference_length_words"] for r in methods.values() if "reference_length_words" in r), None)
    lines.append(f"\n{first['stories']} test stories x {first['samples_per_story']} samples at {t} (greedy in brackets); "
                 + (f"true middles: {ref['mean']:.1f} words on average; " if ref and length else "")
                 + f"reward: {reward}; {first['bertscore']}")
    return "\n".join(lines)
