"""Kill-and-resume: a run SIGKILLed mid-training and restarted ends bit-identical to an
uninterrupted run with the same seed (CPU, one thread)."""

import os
import signal
import subprocess
import sys
import time

import torch

from tsquant.fileio import load_json, load_tensor_meta, load_tensors

STAGES_WITH_MODELS = ("train", "codes", "transform", "finetune")


def _command(args, out_dir):
    return [
        sys.executable,
        "-m",
        "tsquant",
        "run",
        *args,
        "--set",
        f"out_dir={out_dir}",
        "--set",
        "train.checkpoint_seconds=0",
        "--set",
        "codes.checkpoint_seconds=0",
    ]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_to_end(args, out_dir):
    done = subprocess.run(_command(args, out_dir), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _kill_when(args, out_dir, ready, timeout=120):
    proc = subprocess.Popen(
        _command(args, out_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


def _progress(path):
    try:
        return load_tensor_meta(path) if path.exists() else {}
    except Exception:  # pragma: no cover - the file is replaced atomically, but be safe
        return {}


def _untimed(log: dict) -> dict:
    return {k: v for k, v in log.items() if k != "wall_s"}


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_run_args):
    _run_to_end(tiny_run_args, tmp_path / "straight")
    killed = tmp_path / "killed"
    train_resume = killed / "tiny" / "train" / "resume.safetensors"
    codes_resume = killed / "tiny" / "codes" / "resume.safetensors"
    # 1: mid-epoch in the second FP epoch: model, optimizer, RNG and data order must resume
    assert _kill_when(
        tiny_run_args,
        killed,
        lambda: (p := _progress(train_resume)).get("epoch") == 1 and p.get("batch", 0) >= 3,
    ), "the run finished before it could be killed"
    assert not (killed / "tiny" / "train" / "meta.json").exists()
    # 2: resumed, then killed again inside step 1
    assert _kill_when(
        tiny_run_args, killed, lambda: _progress(codes_resume).get("batch", 0) >= 2
    ), "the resumed run finished before it could be killed"
    assert (killed / "tiny" / "train" / "meta.json").exists()
    # 3: to the end; the finished FP stage is not re-run, step 1 resumes
    out = _run_to_end(tiny_run_args, killed)
    assert "[run] train: done, skipped" in out and "[step1] resuming at epoch 1 batch" in out
    for stage in STAGES_WITH_MODELS:
        a = load_tensors(tmp_path / "straight" / "tiny" / stage / "model.safetensors")
        b = load_tensors(killed / "tiny" / stage / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{stage}: {key} differs after resume"
    for stage in ("train", "codes"):  # the interrupted epochs' running loss/accuracy resumed too
        logs_a = load_json(tmp_path / "straight" / "tiny" / stage / "meta.json")["logs"]
        logs_b = load_json(killed / "tiny" / stage / "meta.json")["logs"]
        assert [_untimed(e) for e in logs_a] == [_untimed(e) for e in logs_b]
        clock = [e["wall_s"] for e in logs_b]  # counts on across the kills, never restarts
        assert clock == sorted(clock) and clock[0] > 0
        wall = load_json(killed / "tiny" / stage / "meta.json")["wall_s"]
        assert wall >= clock[-1]
    assert not train_resume.exists() and not codes_resume.exists()
