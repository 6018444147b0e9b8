"""`python -m harness.runs`: the table comparing the runs of an outputs folder, on runs of the real loop."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SMOKE_CNN, clean_env, read_metrics
from gwi.report import val_mae_curve
from harness import checkpoint as ckpt
from harness import rundir
from harness.config import load_config
from harness.loop import train
from harness.plots import plot_metrics
from harness.runs import main as runs_main, read_run, run_status
from harness.tracking import read_metrics as read_metrics_file


def runs_from_the_shell(*args, columns: int = 200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.runs", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=clean_env(COLUMNS=str(columns)))


@pytest.fixture
def runs_cli(capsys, monkeypatch):
    """`python -m harness.runs ARGS` run in this process (harness.runs.main), its exit code and output as
    runs_from_the_shell returns them: a process start would cost more than the command."""
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = runs_main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["harness.runs", *map(str, args)], code, out, err)
    return run


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """Three cnn smoke runs that differ in lr, one of them stopped by its time budget (after one evaluation)."""
    root = tmp_path_factory.mktemp("outputs")
    common = ["trainer.epochs=2", "log.wandb=disabled", "log.plot=false"]
    started = time.time()
    for name, extra in (("lr-slow", ["optim.lr=0.002"]), ("lr-fast", ["optim.lr=0.02"]),
                        ("budget", ["optim.lr=0.01", "trainer.max_minutes=0.0001", "trainer.eval_every_steps=1"])):
        train(load_config(SMOKE_CNN, [*common, *extra, f"output_dir={root / name}"]))
    (root / "took_s").write_text(str(time.time() - started))
    return root


def csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_has_one_row_per_run_best_first_with_the_keys_that_differ(outputs, runs_cli):
    result = runs_cli(outputs, "--csv")
    assert result.returncode == 0, result.stderr
    rows = csv_rows(result.stdout)
    assert list(rows[0]) == ["run", "status", "steps", "wall_s", "monitor", "mode", "best", "best_step",
                             "optim.lr", "trainer.eval_every_steps", "trainer.max_minutes"]
    bests = {name: max(r["val/acc"] for r in read_metrics(outputs / name) if "val/acc" in r) for name in ("lr-slow", "lr-fast", "budget")}
    assert [row["run"] for row in rows] == sorted(bests, key=bests.get, reverse=True)  # val/acc: higher first
    by_name = {row["run"]: row for row in rows}
    for name, best in bests.items():
        row = by_name[name]
        assert (row["monitor"], row["mode"], float(row["best"])) == ("val/acc", "max", best)
        assert int(row["best_step"]) == ckpt.read_meta(outputs / name / "checkpoints" / "best")["step"]
        assert 0 <= float(row["wall_s"]) <= float((outputs / "took_s").read_text())
    assert (by_name["lr-slow"]["status"], by_name["lr-slow"]["steps"], by_name["lr-slow"]["optim.lr"]) == ("finished", "16", "0.002")
    assert by_name["lr-fast"]["optim.lr"] == "0.02" and by_name["lr-fast"]["trainer.max_minutes"] == ""
    stopped = ckpt.read_meta(outputs / "budget" / "checkpoints" / "last")
    assert by_name["budget"]["status"] == "stopped (max_minutes)" and int(by_name["budget"]["steps"]) == stopped["step"] < 16


def test_table_is_printed_with_rich_and_csv_goes_to_a_path(outputs, tmp_path, runs_cli):
    result = runs_cli(outputs, "--csv", tmp_path / "runs.csv")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("3 runs in ") and "┃ run" in result.stdout
    assert "best val/acc" in result.stdout and "optim.lr" in result.stdout
    rows = csv_rows((tmp_path / "runs.csv").read_text())
    order = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert order == [row["run"] for row in rows]


def test_a_run_without_its_final_save_is_running_while_its_lock_is_held_then_crashed(outputs, tmp_path):
    # From the shell: the lock is held by this process, which a check in the same process would not see.
    # A copy of a finished run whose last save is an epoch's: what a lost machine leaves behind.
    shutil.copytree(outputs / "lr-slow", tmp_path / "lost")
    meta_path = tmp_path / "lost" / "checkpoints" / "last" / ckpt.META
    meta_path.write_text(json.dumps({**ckpt.read_meta(meta_path.parent), "reason": "epoch"}))
    lock = rundir.RunLock(tmp_path / "lost")  # this process plays the live run
    lock.acquire()
    assert csv_rows(runs_from_the_shell(tmp_path, "--csv").stdout)[0]["status"] == "running"
    lock.release()
    assert csv_rows(runs_from_the_shell(tmp_path, "--csv").stdout)[0]["status"] == "crashed"  # no live holder, fresh metrics or not

    # A run from before locks existed (no .lock): the time of its last metrics decides.
    (tmp_path / "lost" / rundir.LOCK).unlink()
    assert csv_rows(runs_from_the_shell(tmp_path, "--csv").stdout)[0]["status"] == "running"
    hour_ago = time.time() - 3600
    os.utime(tmp_path / "lost" / "metrics.jsonl", (hour_ago, hour_ago))
    assert csv_rows(runs_from_the_shell(tmp_path, "--csv").stdout)[0]["status"] == "crashed"


def test_a_folder_without_runs_or_a_folder_as_csv_path_exits_2_naming_it(tmp_path, runs_cli):
    result = runs_from_the_shell(tmp_path)  # the exit code as the shell sees it
    assert result.returncode == 2 and f"no runs under {str(tmp_path)!r}" in result.stderr
    result = runs_cli(tmp_path / "missing")
    assert result.returncode == 2 and "is not a folder" in result.stderr
    result = runs_cli("--csv", tmp_path)  # the folder taken as the CSV's path
    assert result.returncode == 2 and f"python -m harness.runs {tmp_path} --csv" in result.stderr


def test_every_metrics_reader_skips_bad_lines_alike(tmp_path):
    """A run killed mid-write leaves a torn last line; damage elsewhere can break a middle one. The
    one reader keeps every complete record and skips the rest, for the run table, the learning
    curves and the demo's report alike."""
    rows = [{"step": 1, "epoch": 0.5, "train/loss": 2.0}, {"step": 2, "epoch": 1.0, "val/loss": 1.5, "val/mae": 300.0},
            {"step": 3, "epoch": 1.5, "train/loss": 1.0}, {"step": 4, "epoch": 2.0, "val/loss": 0.9, "val/mae": 200.0}]
    torn = json.dumps({"step": 2, "epoch": 1.0, "train/loss": 1.7})[:17]
    text = [json.dumps(rows[0]), torn, "not json", "[1, 2]", "", *map(json.dumps, rows[1:]), torn]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(text))
    (run / "config.yaml").write_text("checkpoint:\n  monitor: val/loss\n  mode: min\n")
    assert read_metrics_file(run) == rows
    assert plot_metrics(run).read_bytes()[:4] == b"\x89PNG"
    table_row = read_run(run, tmp_path, time.time())
    assert (table_row.steps, table_row.best, table_row.best_step) == (4, 0.9, 4)
    assert val_mae_curve(run) == [300.0, 200.0]


def test_a_run_stopped_by_a_bad_sample_is_failed_not_running_or_crashed():
    assert run_status(ckpt.DATA_ERROR_REASON, since_last_metric_s=0.0) == "failed (data error)"
    assert run_status(ckpt.DATA_ERROR_REASON, since_last_metric_s=1e9, locked_runs=True) == "failed (data error)"
    assert run_status(ckpt.DATA_ERROR_REASON, since_last_metric_s=0.0, held=True) == "running"  # resumed since
