"""Faults that must neither hang, nor lose work, nor pass silently: an error with DataLoader workers
running, a failed prediction over an earlier good one, SIGTERM during an evaluation, W&B's own
switches and an unreachable server, killed simulation workers, `--help` into a closed pipe."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SMOKE_CNN, SMOKE_GWI, clean_env, read_metrics, run_entry
from gwi_files import write_tree
from harness import checkpoint as ckpt
from harness.config import load_config
from harness.loop import train
from harness.tracking import configured_wandb_mode

QUIET = ["log.wandb=disabled", "log.plot=false", "log.progress=plain"]


def nan_sample(path: Path, row: int = 1) -> None:
    array = np.load(path)
    array[row, 0, 0, 0] = np.nan
    np.save(path, array)


def test_a_bad_sample_with_dataloader_workers_exits_instead_of_hanging(tmp_path):
    # The workers ignore a process-group SIGTERM; they must still obey the one multiprocessing sends
    # them at exit, or the process waits for them forever after printing the error.
    nan_sample(write_tree(tmp_path / "tree") / "FlatVel_A" / "data" / "data1.npy")
    run = tmp_path / "run"
    started = time.monotonic()
    try:
        result = run_entry("train.py", SMOKE_GWI, "data.source=files", f"data.roots=[{tmp_path / 'tree'}]", "trainer.num_workers=2",
                           "trainer.batch_size=2", "data.time_steps=64", "data.flip=false", *QUIET, f"output_dir={run}", timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("train.py hung after a bad sample with trainer.num_workers=2")
    assert result.returncode == 1, result.stderr
    assert f"{tmp_path / 'tree' / 'FlatVel_A' / 'data' / 'data1.npy'}: sample 1 contains NaN or inf values" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = ckpt.read_meta(run / "checkpoints" / "last")  # the work before the bad batch is kept
    assert last["reason"] == "data error" and last["step"] > 0, last
    assert f"saved {run / 'checkpoints' / 'last'} at step {last['step']}" in result.stderr
    print(f"exited in {time.monotonic() - started:.1f} s")


def test_a_failed_save_predictions_keeps_the_earlier_file(tmp_path, gwi_smoke_run, capsys):
    import infer

    data = write_tree(tmp_path / "labelled")
    out = tmp_path / "oof.npy"
    args = ["--checkpoint", str(gwi_smoke_run), "--data", str(data), "--num-workers", "0", "--batch-size", "2",
            "--save-predictions", str(out)]
    assert infer.main(args) == 0
    good = out.read_bytes()
    assert np.load(out).shape == (12, 1, 70, 70) and np.abs(np.load(out)).min() >= 1500  # 2 x 3 + 3 x 2 samples

    nan_sample(data / "CurveFault_A" / "seis3_1_0.npy")  # the last file: met after most of the folder is predicted
    assert infer.main(args) == 2
    assert "seis3_1_0.npy: sample 1 contains NaN or inf values" in capsys.readouterr().err
    assert out.read_bytes() == good  # not zeros, not half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled", "oof.npy"]  # no temporary file left


def test_sigterm_during_an_evaluation_stops_it_and_the_next_run_redoes_it(tmp_path):
    # One epoch of 8 updates, then an evaluation of 2,000 images one by one (many seconds); SIGTERM
    # arrives when the training's last step is printed.
    run = tmp_path / "run"
    args = [str(ROOT / "train.py"), str(SMOKE_CNN), "trainer.epochs=1", "data.num_val=2000", "trainer.eval_batch_size=1",
            *QUIET, "log.every_steps=8", f"output_dir={run}"]
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step 8/8"):
            break
    os.kill(process.pid, signal.SIGTERM)
    signalled = time.monotonic()
    out, err = process.communicate(timeout=120)
    stop_seconds = time.monotonic() - signalled
    assert process.returncode == 0, err
    assert "stopped by SIGTERM at step 8" in out, out
    last = ckpt.read_meta(run / "checkpoints" / "last")
    assert last["reason"] == "SIGTERM" and last["step"] == 8
    assert not any("val/acc" in record for record in read_metrics(run))  # the interrupted evaluation logged nothing
    assert not (run / "checkpoints" / "best").exists()

    started = time.monotonic()
    resumed = run_entry("train.py", *args[1:], env=clean_env(OMP_NUM_THREADS="1"), timeout=300)
    eval_seconds = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stderr
    evaluations = [record for record in read_metrics(run) if "val/acc" in record]
    assert [record["step"] for record in evaluations] == [8]
    assert ckpt.read_meta(run / "checkpoints" / "best")["step"] == 8
    assert ckpt.read_meta(run / "checkpoints" / "last")["reason"] == "finished"
    print(f"stopped {stop_seconds:.1f} s after SIGTERM; the resumed run with its whole evaluation took {eval_seconds:.1f} s")


@pytest.mark.parametrize("env, requested, expected", [
    ({}, "online", "online"),
    ({"WANDB_MODE": "disabled"}, "offline", "disabled"),
    ({"WANDB_MODE": "offline"}, "online", "offline"),
    ({"WANDB_MODE": "dryrun"}, "online", "offline"),
    ({"WANDB_MODE": "online"}, "disabled", "online"),
    ({"WANDB_DISABLED": "true"}, "online", "disabled"),
])
def test_wandb_environment_switches_override_log_wandb(env, requested, expected, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert configured_wandb_mode(requested) == expected


@pytest.mark.usefixtures("one_thread")
def test_wandb_mode_disabled_runs_without_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    train(load_config(SMOKE_CNN, ["trainer.epochs=1", "log.wandb=offline", "log.plot=false", "log.progress=none",
                                  f"output_dir={run}"]))
    assert (run / "checkpoints" / "last").is_dir()
    assert not (run / "wandb").exists()


def test_an_unreachable_wandb_server_falls_back_to_offline_at_once():
    with socket_closed_port() as port:
        env = clean_env(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}")
        code = "from harness.tracking import resolve_wandb_mode; print(resolve_wandb_mode('online'))"
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "offline"
    assert f"W&B: cannot connect to http://127.0.0.1:{port}" in result.stderr


class socket_closed_port:
    """A local TCP port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc):
        return False


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
def test_killed_synth_takes_its_workers_with_it(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "gwi.physics.synth", "--family", "FlatVel_A", "--n", "40", "--per-file", "10",
                                "--workers", "2", "--threads", "1", "--batch-size", "1", "--out", str(tmp_path / "synth")],
                               cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = b""
    while not re.search(rb"\b[1-9]\d*/40\b", progress):  # a worker has simulated a sample: both are at work
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, progress.decode(errors="replace")
        progress += chunk
    workers = children(process.pid)
    assert len(workers) >= 2, workers
    process.kill()
    process.wait(timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(alive, workers)):
        time.sleep(0.1)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "synth workers kept simulating after their parent was killed"


def test_help_into_a_closed_pipe_is_not_an_error():
    # `train.py --help | head -1` where head has gone before the text is written: every write fails.
    read_end, write_end = os.pipe()
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, env=clean_env(),
                               stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    os.close(read_end)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    print(f"--help took {time.monotonic() - started:.1f} s")
