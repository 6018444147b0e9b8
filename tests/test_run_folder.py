"""What survives what: kills at every point of the checkpoint saves, a second run on the same folder,
starting over, resuming with another config, damaged checkpoints and bad output folders (cnn smoke
runs in-process; kills in forked children, so no run pays for a fresh interpreter)."""
from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMOKE_CNN, accelerate_launch, read_metrics
from harness import checkpoint as ckpt
from harness import rundir
from harness.cli import run_cli
from harness.config import load_config
from harness.errors import ConfigError, UserError
from harness.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

# 16 updates (4 epochs of 4), an evaluation every 2 and a `last` every 3 besides each epoch's, top-2
# by val/loss: 8 evaluations of which 5 enter the top 2 (2, 4, 6, 8 each the new best, 10 the
# second), 3 pruned, 10 `last` saves. Dropout makes the RNG state matter to an exact resume.
RUN = ["log.wandb=disabled", "log.plot=false", "log.progress=none", "trainer.epochs=4", "data.num_train=64",
       "data.num_val=32", "trainer.batch_size=16", "sched.name=cosine", "optim.lr=0.03", "trainer.deterministic=true",
       "model.dropout=0.2", "trainer.eval_every_steps=2", "trainer.save_every_steps=3", "checkpoint.keep_top_k=2",
       "checkpoint.monitor=val/loss", "checkpoint.mode=min"]
# (point, n): killed the n-th time the run reaches the point. best:done 3 is the kill between the best
# save and the `last` save of step 6 that made every later resume fail before.
KILLS = [("best:done", 3), ("best:written", 4), ("best:placed", 5), ("best:arranging", 2), ("best:pruned", 2),
         ("last:state", 4), ("last:written", 6), ("last:swapping", 3), ("last:placed", 7)]
REACHED = {"best:done": 5, "best:written": 5, "best:placed": 5, "best:arranging": 7, "best:pruned": 3,
           "last:state": 10, "last:written": 10, "last:swapping": 9, "last:placed": 10}


def run(run_dir: Path, *extra: str) -> dict:
    return train(load_config(SMOKE_CNN, [f"output_dir={run_dir}", *RUN, *extra]))


def in_child(function, *args) -> int:
    """Run `function(*args)` in a forked child; its exit code (-9: SIGKILLed)."""
    def body():
        function(*args)

    child = multiprocessing.get_context("fork").Process(target=body)
    child.start()
    child.join(120)
    return child.exitcode


def run_killed_at(run_dir: Path, point: str) -> None:
    os.environ[ckpt.KILL_AT_ENV] = point
    ckpt._points_reached.clear()  # the counts the parent process made are not this run's
    run(run_dir)


def snapshot(run_dir: Path) -> dict:
    """What a finished run leaves: last's full state, every best (name, step, score, weights), the metrics."""
    checkpoints = run_dir / "checkpoints"
    bests = {path.name: (ckpt.read_meta(path)["step"], ckpt.read_meta(path)["monitor_value"],
                         load_file(str(path / ckpt.WEIGHTS))) for path in ckpt.best_dirs(checkpoints)}
    # A resume restarts the window train/loss averages over (log.every_steps): keys, steps and
    # evaluations must match exactly, the train values only in their names.
    metrics = [{k: v if k.startswith(("val", "step", "epoch")) else None for k, v in row.items()} for row in read_metrics(run_dir)]
    return {"model": load_file(str(checkpoints / "last" / "model.safetensors")), "bests": bests, "metrics": metrics,
            "dirs": sorted(p.name for p in checkpoints.iterdir()), "reason": ckpt.read_meta(checkpoints / "last")["reason"]}


def assert_same_run(a: dict, b: dict) -> None:
    assert a["dirs"] == b["dirs"] and a["reason"] == b["reason"] == "finished"
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert {n: s[:2] for n, s in a["bests"].items()} == {n: s[:2] for n, s in b["bests"].items()}
    for name, (_, _, weights) in a["bests"].items():
        assert all(torch.equal(weights[k], b["bests"][name][2][k]) for k in weights)
    assert a["metrics"] == b["metrics"]  # nothing logged twice, nothing lost


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The unkilled run, and how often it passes each named point of its saves."""
    run_dir = tmp_path_factory.mktemp("reference")
    os.environ[ckpt.KILL_AT_ENV] = "count-only"
    ckpt._points_reached.clear()
    try:
        run(run_dir)
    finally:
        del os.environ[ckpt.KILL_AT_ENV]
    return {"snapshot": snapshot(run_dir), "reached": dict(ckpt._points_reached)}


def kill_then_resume(tmp_path: Path, point: str, n: int) -> dict:
    run_dir = tmp_path / f"{point.replace(':', '-')}-{n}"
    assert in_child(run_killed_at, run_dir, f"{point}:{n}") == -signal.SIGKILL
    run(run_dir)  # resume=auto, no kill
    return snapshot(run_dir)


def test_the_scenario_passes_every_named_point_as_counted(reference):
    assert reference["reached"] == REACHED


@pytest.mark.parametrize("point,n", KILLS)
def test_a_kill_inside_a_checkpoint_save_resumes_to_the_same_run(reference, tmp_path, point, n):
    assert_same_run(kill_then_resume(tmp_path, point, n), reference["snapshot"])


@pytest.mark.slow
def test_a_kill_at_every_pass_of_every_point_resumes_to_the_same_run(reference, tmp_path):
    for point, times in REACHED.items():
        for n in range(1, times + 1):
            assert_same_run(kill_then_resume(tmp_path, point, n), reference["snapshot"])


def test_two_kills_in_a_row_still_resume_to_the_same_run(reference, tmp_path):
    run_dir = tmp_path / "twice"
    assert in_child(run_killed_at, run_dir, "best:done:3") == -signal.SIGKILL
    assert in_child(run_killed_at, run_dir, "best:arranging:1") == -signal.SIGKILL  # the resumed run, killed again
    run(run_dir)
    assert_same_run(snapshot(run_dir), reference["snapshot"])


# ---- the lock ---------------------------------------------------------------------------------------


def hold_lock(run_dir: Path, ready, release) -> None:
    lock = rundir.RunLock(run_dir)
    lock.acquire()
    ready.set()
    release.wait(60)


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_holder(tmp_path, capsys):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    tmp_path.mkdir(exist_ok=True)
    holder = ctx.Process(target=hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        started = time.monotonic()
        code = run_cli([str(SMOKE_CNN), f"output_dir={tmp_path}", *RUN], train, "")
        took = time.monotonic() - started
        err = capsys.readouterr().err
        assert code == 2 and f"pid {holder.pid}" in err and str(tmp_path) in err and err.count("\n") == 1, err
        assert took < 5 and not (tmp_path / "metrics.jsonl").exists()  # stopped before any work
        assert rundir.lock_holder(tmp_path)["pid"] == holder.pid
    finally:
        release.set()
        holder.join(30)
    assert rundir.lock_holder(tmp_path) is None  # its holder gone, the lock is free


@pytest.mark.slow
def test_under_accelerate_launch_every_process_stops_when_the_folder_is_locked(tmp_path):
    lock = rundir.RunLock(tmp_path)  # this process plays the run that holds the folder
    lock.acquire()
    try:
        result = accelerate_launch(2, "train.py", SMOKE_CNN, f"output_dir={tmp_path}", *RUN)
    finally:
        lock.release()
    assert result.returncode != 0
    assert result.stderr.count(f"error: output_dir {str(tmp_path)!r} is in use by another run (pid {os.getpid()}") == 1
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    assert in_child(run_killed_at, tmp_path, "last:placed:2") == -signal.SIGKILL
    stale = rundir.read_holder(tmp_path / rundir.LOCK)["pid"]
    assert stale != os.getpid() and rundir.lock_holder(tmp_path) is None
    assert run(tmp_path)["step"] == 16
    assert rundir.read_holder(tmp_path / rundir.LOCK)["pid"] == os.getpid()


# ---- starting over, resuming with another config ----------------------------------------------------


def test_resume_never_moves_the_old_run_aside_and_never_mixes_them(tmp_path, capsys):
    run(tmp_path, "optim.lr=0.03")
    old_best = ckpt.read_meta(tmp_path / "checkpoints" / "best")
    # A run that learns nothing (lr tiny): with the old `best` kept, its summary would report the old model.
    summary = run(tmp_path, "resume=never", "optim.lr=1e-7", "trainer.epochs=1")
    out = capsys.readouterr().out
    (previous,) = tmp_path.glob(".previous-*")
    assert f"moved aside to {previous}" in out
    assert ckpt.read_meta(previous / "checkpoints" / "best") == old_best
    assert {p["step"] for p in map(ckpt.read_meta, ckpt.best_dirs(tmp_path / "checkpoints"))} <= {2, 4}
    assert summary["best"]["step"] <= 4 and summary["best"]["val/loss"] != old_best["monitor_value"]
    assert max(r["step"] for r in read_metrics(tmp_path)) == 4  # the old run's records went with it
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == ["best", "best_step00000010", "last"]


@pytest.mark.parametrize("change", ["model.width=16", "sched.name=constant", "seed=1"])
def test_resume_with_a_run_changing_key_is_refused_naming_it(tmp_path, change, capsys):
    run(tmp_path, "trainer.epochs=1")
    code = run_cli([str(SMOKE_CNN), f"output_dir={tmp_path}", *RUN, "trainer.epochs=2", change], train, "")
    err = capsys.readouterr().err
    key = change.split("=")[0]
    assert code == 2 and err.startswith(f"error: key {key!r}: ") and "resume_changes=allow" in err and err.count("\n") == 1
    assert ckpt.read_meta(tmp_path / "checkpoints" / "last")["step"] == 4


def test_resume_changes_allow_resumes_and_a_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    run(tmp_path, "trainer.epochs=1")
    assert run(tmp_path, "trainer.epochs=2", "seed=1", "resume_changes=allow")["step"] == 8
    with pytest.raises(UserError, match=r"^cannot resume from .*last.*size mismatch"):
        run(tmp_path, "trainer.epochs=3", "model.width=16", "resume_changes=allow")


def test_each_start_that_trains_records_its_config_and_a_resume_says_what_changed(tmp_path, capsys):
    run(tmp_path, "trainer.epochs=1")
    first = (tmp_path / "config.yaml").read_text()
    run(tmp_path, "trainer.epochs=1", "optim.lr=0.5")  # finished: trains nothing, records nothing
    out = capsys.readouterr().out
    assert "nothing to train" in out and (tmp_path / "config.yaml").read_text() == first
    assert [p.name for p in (tmp_path / rundir.HISTORY).iterdir()] == ["001.yaml"]
    run(tmp_path, "trainer.epochs=2", "optim.lr=0.01")
    out = capsys.readouterr().out
    assert "resume: config changed since step 4: trainer.epochs 1 -> 2; optim.lr 0.03 -> 0.01" in out
    history = sorted((tmp_path / rundir.HISTORY).iterdir())
    assert [p.name for p in history] == ["001.yaml", "002.yaml"]
    assert "# changed: optim.lr 0.03 -> 0.01" in history[1].read_text()
    assert load_config(history[0]).optim.lr == 0.03 and load_config(history[1]).optim.lr == 0.01
    assert load_config(tmp_path / "config.yaml").optim.lr == 0.01


def test_a_resumed_run_does_not_repeat_metric_records(tmp_path):
    # Killed saving step 8's best: its train record is written, `last` is step 6's.
    assert in_child(run_killed_at, tmp_path, "best:done:4") == -signal.SIGKILL
    assert max(r["step"] for r in read_metrics(tmp_path)) == 8 and ckpt.read_meta(tmp_path / "checkpoints" / "last")["step"] == 6
    run(tmp_path)
    keys = [(r["step"], tuple(sorted(r))) for r in read_metrics(tmp_path)]
    assert len(keys) == len(set(keys)) and max(k[0] for k in keys) == 16


# ---- checked before the first step ------------------------------------------------------------------


def test_a_monitor_typo_stops_before_the_first_step(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'checkpoint.monitor': 'val/los' is not an evaluation metric; available: val/acc, val/loss$"):
        run(tmp_path, "checkpoint.monitor=val/los")
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    with pytest.raises(ConfigError, match="val_raw/loss"):  # with EMA both weights are evaluated
        run(tmp_path, "checkpoint.monitor=val/los", "ema.enabled=true")


@pytest.mark.parametrize("output_dir,message", [
    ("", "key 'output_dir': empty"),
    ("/proc/kagglerig", "is under /proc"),
    ("/proc/self/cwd/x", "is under /proc"),
    ("FILE", "is a file, not a folder"),
    ("FILE/run", "cannot create"),
])
def test_a_bad_output_dir_is_one_line_before_any_work(tmp_path, capsys, output_dir, message):
    (tmp_path / "FILE").write_text("not a folder")
    output_dir = output_dir.replace("FILE", str(tmp_path / "FILE"))
    assert run_cli([str(SMOKE_CNN), *RUN, f"output_dir={output_dir}"], train, "") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_one_line(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="not writable|cannot"):
            run(tmp_path / "run")
    finally:
        tmp_path.chmod(0o755)


# ---- damaged checkpoints, full disks ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "delete"])
@pytest.mark.parametrize("name", ["model.safetensors", ckpt.WEIGHTS, "optimizer.bin"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, damage, name):
    run(tmp_path, "trainer.epochs=1")
    path = tmp_path / "checkpoints" / "last" / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    assert run_cli([str(SMOKE_CNN), f"output_dir={tmp_path}", *RUN, "trainer.epochs=2"], train, "") == 2
    err = capsys.readouterr().err
    assert f"{path} is {'damaged' if damage == 'truncate' else 'missing'}" in err and err.count("\n") == 1, err


def test_a_damaged_last_falls_back_to_the_previous_state_a_crash_left(tmp_path, capsys):
    assert in_child(run_killed_at, tmp_path, "last:swapping:2") == -signal.SIGKILL  # leaves .old-last (step 4)...
    (tmp_path / "checkpoints" / ".tmp-last").rename(tmp_path / "checkpoints" / "last")  # ...and `last` as if placed
    weights = tmp_path / "checkpoints" / "last" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-10])
    assert run(tmp_path)["step"] == 16
    assert f"{weights} is damaged" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / ".damaged-last").is_dir()


def test_inference_names_a_truncated_weights_file(tmp_path):
    run(tmp_path, "trainer.epochs=1")
    weights = tmp_path / "checkpoints" / "best" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:50])
    from cnn.models import create_model

    with pytest.raises(UserError, match=f"{weights} is damaged"):
        ckpt.load_weights(create_model("smoke_cnn", in_channels=3, num_classes=4, width=8), tmp_path)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run(tmp_path, "trainer.epochs=1")
    before = ckpt.read_meta(tmp_path / "checkpoints" / "last")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_weights", full)
    assert run_cli([str(SMOKE_CNN), f"output_dir={tmp_path}", *RUN, "trainer.epochs=2"], train, "") == 1
    err = capsys.readouterr().err
    assert err.startswith("run failed: no space left on the device while writing") and err.count("\n") == 1, err
    assert "the previous checkpoint" in err and ckpt.read_meta(tmp_path / "checkpoints" / "last") == before
    assert not (tmp_path / "checkpoints" / ".tmp-best").exists() and not (tmp_path / "checkpoints" / ".tmp-last").exists()
