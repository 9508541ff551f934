"""Run by tests/test_distributed.py under ``accelerate launch`` (2 CPU processes, gloo).

Trains a tiny LoRA policy for a few steps; each rank writes its initial and final trainable
parameters and the hashes of the episodes it sampled to ``<out>/rank<r>.pt``.
Usage: dist_script.py OUT_DIR
"""

import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_lm, make_tiny_tokenizer  # noqa: E402

from gfnlm.config import GFNConfig  # noqa: E402
from gfnlm.rewards import PrefixRuleReward  # noqa: E402
from gfnlm.trainer import GFNTrainer  # noqa: E402


def rule(prompt, text):
    words = text.split()
    return words.count("a") - 0.5 * words.count("c")


def main(out: Path):
    args = GFNConfig(use_peft=True, lora_r=2, lora_alpha=4, max_new_tokens=3, allowed_tokens=["a", "b", "c"],
                     chat_template="never", report_to=[], disable_tqdm=True, learning_rate=1e-2, warmup_steps=0,
                     samples_per_prompt=8, prompts_per_step=1, max_steps=3, output_dir=str(out / "run"), seed=5,
                     replay_fraction=0.25, tempered_fraction=0.25)
    tr = GFNTrainer(make_tiny_lm(vocab_size=6), PrefixRuleReward(rule), args=args,
                    train_dataset=["<s>", "<s> a"], processing_class=make_tiny_tokenizer())
    init = tr.trainable_state()
    hashes = []
    collect = tr._collect

    def recording_collect():
        batch = collect()
        for p, row, n in zip(batch.prompt_index.tolist(), batch.tokens.tolist(), batch.lengths.tolist()):
            hashes.append(hashlib.sha1(repr((batch.prompts[p], row[:n])).encode()).hexdigest())
        hashes.append("|")  # step boundary
        return batch

    tr._collect = recording_collect
    tr.train()
    r = tr.accelerator.process_index
    torch.save({"rank": r, "world": tr.accelerator.num_processes, "init": init, "final": tr.trainable_state(),
                "hashes": hashes, "step": tr.step,
                "grad_sync": type(tr.policy).__name__}, out / f"rank{r}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
