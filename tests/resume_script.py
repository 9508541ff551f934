"""Run by tests/test_distributed.py under ``accelerate launch`` (2 CPU processes, gloo): a tiny LoRA
run that checkpoints every ``save_steps`` steps, slowed down so that the test can kill it mid-run.

Usage: resume_script.py OUT_DIR MAX_STEPS [--resume] [--slow-save]

* each step sleeps ``STEP_SLEEP`` seconds (env, default 0) after it is taken, so a kill lands between
  checkpoints;
* ``--slow-save``: the model file of every checkpoint after the first is written, then the save sleeps
  10 s before the rest (``OUT/saving-<step>`` appears when it starts sleeping), so a kill lands inside
  the write;
* at the end, rank r writes its trainable parameters to ``OUT/final<r>.pt``.
"""

import os
import sys
import time
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


def main(out: Path, max_steps: int, resume: bool, slow_save: bool):
    args = GFNConfig(use_peft=True, lora_r=2, lora_alpha=4, max_new_tokens=3, allowed_tokens=["a", "b", "c"],
                     chat_template="never", report_to=[], disable_tqdm=True, learning_rate=1e-2, warmup_steps=2,
                     samples_per_prompt=8, prompts_per_step=2, max_steps=max_steps, output_dir=str(out / "run"),
                     seed=5, replay_fraction=0.25, tempered_fraction=0.25, save_steps=2, save_total_limit=None,
                     log_z="scalar")
    tr = GFNTrainer(make_tiny_lm(vocab_size=6), PrefixRuleReward(rule), args=args,
                    train_dataset=["<s>", "<s> a", "<s> b c"], processing_class=make_tiny_tokenizer())
    pause = float(os.environ.get("STEP_SLEEP", "0"))
    step = tr.training_step

    def slow_step():
        m = step()
        time.sleep(pause)
        return m

    tr.training_step = slow_step
    if slow_save:
        save = tr._save_trainable

        def slow(models, weights, output_dir):
            save(models, weights, output_dir)
            if tr.step > 2:
                (out / f"saving-{tr.step}").write_text("")
                time.sleep(10)

        tr.accelerator._save_model_state_pre_hook.clear()
        tr.accelerator.register_save_state_pre_hook(slow)
    tr.train(resume_from_checkpoint=True if resume else None)
    torch.save(tr.trainable_state(), out / f"final{tr.accelerator.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), "--resume" in sys.argv, "--slow-save" in sys.argv)
