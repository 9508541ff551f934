"""Two CPU processes (gloo) through ``accelerate launch``: gradients are averaged across ranks,
each rank samples its own episodes.

On a machine without GPUs Accelerate 1.15 only runs several CPU processes when it is told to
use the CPU (``ACCELERATE_USE_CPU=1``) and started by the torchrun launcher (``--multi_gpu``);
``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from gfnlm.config import GFNConfig
from gfnlm.errors import ConfigError
from gfnlm.rewards import PrefixRuleReward

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_share_adapters_and_sample_differently(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(HERE / "dist_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=str(HERE.parent))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == r1["world"] == 2
    assert r0["grad_sync"] == "DistributedDataParallel"
    assert r0["step"] == r1["step"] == 3
    # same adapter init on both ranks, and the same adapters after training ...
    assert r0["init"].keys() == r1["init"].keys() and all("lora_" in k for k in r0["init"])
    for k in r0["init"]:
        assert torch.equal(r0["init"][k], r1["init"][k]), k
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    # ... which did train
    assert any(not torch.equal(r0["init"][k], r0["final"][k]) for k in r0["init"])
    # each rank sampled its own episodes (so identical adapters mean the gradients were averaged)
    steps0 = "\n".join(r0["hashes"]).split("|")
    steps1 = "\n".join(r1["hashes"]).split("|")
    assert len(steps0) == len(steps1) == 4
    assert all(a != b for a, b in zip(steps0[:3], steps1[:3]))
    # one complete checkpoint written (by the main process), with both ranks' states
    ck = tmp_path / "run" / "checkpoint-3"
    assert (ck / "COMPLETE").is_file() and (ck / "rank0.pt").is_file() and (ck / "rank1.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]


def test_processes_that_accelerate_does_not_see_are_an_error(tmp_path, monkeypatch):
    """Started as one of several processes (WORLD_SIZE=2) but Accelerate runs single-process:
    a clear error instead of ranks overwriting each other's checkpoints."""
    from gfnlm.trainer import GFNTrainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = GFNConfig(use_peft=False, max_new_tokens=2, chat_template="never", report_to=[], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=1"):
        GFNTrainer(make_tiny_lm(vocab_size=6), PrefixRuleReward(lambda p, t: 0.0), args=args, train_dataset=["<s>"],
                   processing_class=make_tiny_tokenizer())
