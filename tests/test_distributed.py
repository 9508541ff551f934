"""Two CPU processes (gloo) through ``accelerate launch``: gradients are averaged across ranks,
each rank samples its own episodes.

On a machine without GPUs Accelerate 1.15 only runs several CPU processes when it is told to
use the CPU (``ACCELERATE_USE_CPU=1``) and started by the torchrun launcher (``--multi_gpu``);
``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
    # one complete checkpoint written, with both ranks' RNG states (Accelerate's) and run states
    ck = tmp_path / "run" / "checkpoint-3"
    assert (ck / "COMPLETE").is_file() and (ck / "random_states_0.pkl").is_file() and (ck / "random_states_1.pkl").is_file()
    run_state = torch.load(ck / "custom_checkpoint_1.pkl", weights_only=False)
    assert run_state["step"] == 3 and len(run_state["ranks"]) == 2
    assert run_state["ranks"][0]["buffer"] != run_state["ranks"][1]["buffer"]  # each rank's own replay buffer
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


# ----------------------------------------------------------------------------------------------
# exact resume of a two-process run killed with SIGKILL (tests/resume_script.py)
# ----------------------------------------------------------------------------------------------

STEPS = 8


def launch(out: Path, *args, step_sleep: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1", STEP_SLEEP=str(step_sleep))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(HERE / "resume_script.py"), str(out), str(STEPS), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(HERE.parent), start_new_session=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:] + err[-6000:]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    """SIGKILL the launcher and both ranks as soon as ``ready()`` holds (the run must still be going)."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-3000:]
        assert time.time() - t0 < timeout, "timed out waiting for the moment to kill"
        time.sleep(0.02)
    for pid in [*descendants(proc.pid), proc.pid]:  # the ranks first: torchrun starts them in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), deepest first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out[::-1]


def final(out: Path) -> list[dict]:
    return [torch.load(out / f"final{r}.pt") for r in (0, 1)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_process_run_killed_with_sigkill_resumes_exactly(tmp_path):
    from gfnlm import checkpoint as ckpt

    # the machine's run-to-run reproducibility, measured first: two uninterrupted runs
    runs = [tmp_path / "a", tmp_path / "b"]
    for r in runs:
        finish(launch(r))
    a, b = final(runs[0]), final(runs[1])
    noise = max(max_diff(a[0], b[0]), max_diff(a[1], b[1]))
    print(f"two uninterrupted 2-process runs: max |difference| of the trainable parameters = {noise}")
    assert max_diff(a[0], a[1]) == 0.0  # DDP: both ranks hold the same adapters and log Z

    # killed between checkpoints (after checkpoint-4 is complete), then resumed from the latest one
    c = tmp_path / "c"
    kill_when(launch(c, step_sleep=0.3), lambda: ckpt.is_complete(c / "run" / "checkpoint-4"))
    start = ckpt.latest(c / "run")
    assert start is not None and int(start.name.split("-")[1]) < STEPS and not (c / "final0.pt").exists()
    finish(launch(c, "--resume"))
    got = final(c)
    assert max(max_diff(got[0], a[0]), max_diff(got[1], a[1])) <= 2 * noise, (start, noise)

    # killed inside a checkpoint write: the half-written folder is never one resume would load
    d = tmp_path / "d"
    kill_when(launch(d, "--slow-save"), lambda: (d / "saving-4").exists())
    run = d / "run"
    assert (run / "checkpoint-4.tmp").is_dir() and not ckpt.is_complete(run / "checkpoint-4.tmp")
    assert not (run / "checkpoint-4").exists() and ckpt.latest(run) == run / "checkpoint-2"
    finish(launch(d, "--resume"))
    got = final(d)
    assert max(max_diff(got[0], a[0]), max_diff(got[1], a[1])) <= 2 * noise, noise
