"""The shared loop end to end on the cnn smoke config: training, resume, checkpoints, processes, W&B."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SMOKE_CNN, accelerate_launch, clean_env, read_metrics, run_entry, train_here, wandb_log
from harness import checkpoint as ckpt
from harness.config import load_config
from harness.loop import train
from harness.tracking import with_offline_fallback


def test_overfits_one_batch(tmp_path):
    cfg = load_config(SMOKE_CNN, [f"output_dir={tmp_path}", "data.num_train=32", "trainer.batch_size=32",
                                  "trainer.epochs=60", "sched.name=constant", "optim.lr=0.01", "log.wandb=disabled",
                                  "trainer.eval_every_epochs=0", "data.noise=0.5", "model.width=16"])
    train(cfg)
    train_losses = [row["train/loss"] for row in read_metrics(tmp_path) if "train/loss" in row]
    assert train_losses[0] > 1.0
    assert train_losses[-1] < 0.02


def test_writes_run_directory_and_wandb_offline_log(tmp_path):
    result = run_entry("train.py", SMOKE_CNN, f"output_dir={tmp_path}", "log.wandb=online")  # no key: falls back
    assert result.returncode == 0, result.stderr
    assert "logging offline" in result.stderr
    assert (tmp_path / "config.yaml").read_text().count("output_dir: " + str(tmp_path)) == 1
    rows = read_metrics(tmp_path)
    assert all({"step", "epoch"} <= row.keys() for row in rows)
    evals = [row for row in rows if "val/acc" in row]
    assert len(evals) == 3 and evals[-1]["val/acc"] > 0.7  # 3 epochs, one evaluation each; it learned
    assert {"train/loss", "train/lr", "train/samples_per_s"} <= rows[0].keys()
    history, summary = wandb_log(tmp_path)
    logged = [row["val/acc"] for row in history if "val/acc" in row]
    assert logged == pytest.approx([row["val/acc"] for row in evals])
    assert [r["train/loss"] for r in history if "train/loss" in r] == pytest.approx([r["train/loss"] for r in rows if "train/loss" in r])
    best = ckpt.resolve(tmp_path)
    assert best.name == "best" and ckpt.read_meta(best)["monitor_value"] == max(row["val/acc"] for row in evals)
    assert summary["best/val/acc"] == pytest.approx(max(row["val/acc"] for row in evals))
    assert ckpt.readable(tmp_path / "checkpoints" / "last")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_an_online_wandb_start_that_fails_is_retried_offline_once(capsys):
    # The one fallback training (start_wandb) and cnn.analyze share; `start` stands for their wandb start.
    tried = []

    def start(mode):
        tried.append(mode)
        if mode == "online":
            raise ConnectionError("cannot reach api.wandb.ai")
        return f"run ({mode})"

    assert with_offline_fallback("online", start) == "run (offline)" and tried == ["online", "offline"]
    assert capsys.readouterr().err == "W&B: online start failed (cannot reach api.wandb.ai); logging offline instead\n"
    with pytest.raises(ConnectionError):  # an offline start that fails is a real error: no second try
        with_offline_fallback("offline", lambda mode: start("online"))
    assert with_offline_fallback("online", lambda mode: f"run ({mode})") == "run (online)"


# Under test-all: the default run covers stop-save-resume through test_faults' SIGTERM-during-evaluation
# run and test_run_folder's kill-and-resume points.
@pytest.mark.slow
def test_sigterm_then_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    # Dropout and EMA make the RNG and EMA state matter; 2 accumulation steps make the stop land
    # on an update boundary mid-epoch; 10 epochs (80 updates) leave time to interrupt it after step 13.
    args = [SMOKE_CNN, "trainer.epochs=10", "data.num_train=256", "trainer.batch_size=16", "trainer.grad_accum_steps=2",
            "model.dropout=0.3", "ema.enabled=true", "ema.decay=0.9", "log.every_steps=1", "log.wandb=disabled",
            "trainer.deterministic=true", "trainer.num_workers=2"]
    straight = run_entry("train.py", *args, f"output_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr

    interrupted = tmp_path / "interrupted"
    # Its own process group, signalled as a whole like a shutdown or a Ctrl-C: DataLoader workers included.
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args), f"output_dir={interrupted}"],
                               cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # signal once the run is a little way in, mid-epoch
        if (interrupted / "metrics.jsonl").exists() and any(r["step"] >= 13 for r in read_metrics(interrupted)):
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    stopped = ckpt.read_meta(interrupted / "checkpoints" / "last")
    assert stopped["reason"] == "SIGTERM" and 13 <= stopped["step"] < 80, stopped
    assert "run the same command again to resume" in out

    resumed = run_entry("train.py", *args, f"output_dir={interrupted}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {interrupted / 'checkpoints' / 'last'} at step {stopped['step']}" in resumed.stdout
    a, b = _weights(tmp_path / "straight"), _weights(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "weights.safetensors"))
    ema_b = load_file(str(interrupted / "checkpoints" / "last" / "weights.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    finals = [read_metrics(d)[-1] for d in (tmp_path / "straight", interrupted)]
    assert finals[0]["val/loss"] == finals[1]["val/loss"]


def test_two_cpu_processes_give_the_same_eval_metric_as_one(tmp_path):
    # No BatchNorm or dropout, so 2 x 8 samples per step is the same update as 1 x 16; 100 validation
    # samples in batches of 16 on 2 processes pad the last batch, which must not be counted twice.
    # The one-process run is this process's (the launcher adds nothing to a single process).
    common = ["model.norm=none", "log.wandb=disabled", "trainer.eval_batch_size=16", "data.num_val=100",
              "trainer.epochs=2", "trainer.deterministic=true"]
    train(load_config(SMOKE_CNN, [*common, "trainer.batch_size=16", f"output_dir={tmp_path / 'one'}"]))
    two = accelerate_launch(2, "train.py", SMOKE_CNN, *common, "trainer.batch_size=8", f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    evals = [[r for r in read_metrics(tmp_path / d) if "val/loss" in r] for d in ("one", "two")]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]]
    for a, b in zip(*evals):
        assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4)
        assert a["val/acc"] == pytest.approx(b["val/acc"], abs=1e-6)  # accuracy out of exactly 100 samples
    assert len(list((tmp_path / "two" / "checkpoints" / "last").glob("random_states_*.pkl"))) == 2
    assert two.stdout.count("done:") == 1  # only the main process reports


def test_unknown_key_exits_2_naming_the_nearest_keys(smoke_cnn_args):
    result = run_entry("train.py", *smoke_cnn_args, "optim.lrr=0.1")
    assert result.returncode == 2
    assert "unknown key 'optim.lrr'" in result.stderr and "optim.lr" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_type_exits_2_naming_key_expected_type_and_value(smoke_cnn_args, capsys):
    result = train_here(capsys, *smoke_cnn_args, "--trainer.epochs=three")
    assert result.returncode == 2
    assert "key 'trainer.epochs': expected int, got 'three'" in result.stderr
    assert "Traceback" not in result.stderr
    result = train_here(capsys, *smoke_cnn_args, "trainer.mixed_precision=fp8")
    assert result.returncode == 2 and "trainer.mixed_precision" in result.stderr and "fp8" in result.stderr


def test_sweep_style_overrides_are_applied_and_saved(tmp_path, capsys):
    result = train_here(capsys, SMOKE_CNN, f"--output_dir={tmp_path}", "--trainer.epochs=1", "--optim.lr=3e-4",
                       "--ema.enabled=True", "--log.wandb=disabled", "--trainer.grad_clip=None", "sched.name=constant")
    assert result.returncode == 0, result.stderr
    saved = load_config(tmp_path / "config.yaml")
    assert (saved.trainer.epochs, saved.optim.lr, saved.ema.enabled, saved.trainer.grad_clip, saved.sched.name) == (1, 3e-4, True, None, "constant")
    assert {r["train/lr"] for r in read_metrics(tmp_path) if "train/lr" in r} == {3e-4}
    assert "val_raw/acc" in read_metrics(tmp_path)[-1]  # EMA on: both weights evaluated


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    run = [f"output_dir={tmp_path}", "log.wandb=disabled", "sched.name=cosine"]
    train(load_config(SMOKE_CNN, [*run, "trainer.epochs=1"]))
    last = tmp_path / "checkpoints" / "last"
    before = ckpt.read_meta(last)["step"]

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    # A crash in the middle of writing the new state: the old `last` is untouched.
    monkeypatch.setattr(ckpt, "write_meta", crash)
    with pytest.raises(OSError):
        train(load_config(SMOKE_CNN, [*run, "trainer.epochs=2"]))
    monkeypatch.undo()
    assert ckpt.readable(last) == last and ckpt.read_meta(last)["step"] == before

    # A crash between the two renames that swap the new state in: the old one survives as .old-last.
    real_replace = os.replace

    def crash_on_second_swap(src, dst):
        if Path(src).name == ".tmp-last":
            raise OSError("power cut (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second_swap)
    with pytest.raises(OSError):
        train(load_config(SMOKE_CNN, [*run, "trainer.epochs=2"]))
    monkeypatch.undo()
    assert not last.exists() and ckpt.readable(last) == tmp_path / "checkpoints" / ".old-last"

    # resume=auto picks that survivor up and finishes the run.
    summary = train(load_config(SMOKE_CNN, [*run, "trainer.epochs=2"]))
    assert summary["step"] == 2 * before and ckpt.read_meta(last)["step"] == 2 * before


def test_top_k_best_checkpoints_are_kept_by_metric(tmp_path):
    cfg = load_config(SMOKE_CNN, [f"output_dir={tmp_path}", "trainer.epochs=4", "checkpoint.keep_top_k=2",
                                  "checkpoint.monitor=val/loss", "checkpoint.mode=min", "log.wandb=disabled",
                                  "optim.lr=0.003"])
    train(cfg)
    losses = sorted(r["val/loss"] for r in read_metrics(tmp_path) if "val/loss" in r)
    kept = ckpt.best_dirs(tmp_path / "checkpoints")
    assert [ckpt.read_meta(p)["monitor_value"] for p in kept] == pytest.approx(losses[:2])
    assert kept[0].name == "best" and kept[1].name.startswith("best_step")
    model = torch.nn.Sequential()  # loading checks the file; the cnn task rebuilds the real module
    from cnn.models import create_model
    model = create_model("smoke_cnn", in_channels=3, num_classes=4, width=8)
    assert ckpt.load_weights(model, tmp_path)["monitor_value"] == pytest.approx(losses[0])


def test_nonfinite_loss_stops_with_a_message_or_is_skipped(tmp_path, capsys):
    blow_up = ["optim.lr=1e12", "sched.name=constant", "optim.name=sgd", "model.norm=none", "log.wandb=disabled",
               "trainer.epochs=2", "log.every_steps=1"]
    result = train_here(capsys, SMOKE_CNN, f"output_dir={tmp_path / 'stop'}", *blow_up)
    assert result.returncode == 1
    assert "non-finite loss" in result.stderr and "Traceback" not in result.stderr
    skipped = train_here(capsys, SMOKE_CNN, f"output_dir={tmp_path / 'skip'}", *blow_up, "trainer.on_nonfinite=skip")
    assert skipped.returncode == 0, skipped.stderr
    assert sum(r.get("train/skipped_batches", 0) for r in read_metrics(tmp_path / "skip")) > 0


def test_time_budget_saves_last_and_exits_0(tmp_path, capsys):
    result = train_here(capsys, SMOKE_CNN, f"output_dir={tmp_path}", "trainer.max_minutes=0.0001", "log.wandb=disabled")
    assert result.returncode == 0, result.stderr
    meta = ckpt.read_meta(tmp_path / "checkpoints" / "last")
    assert meta["reason"] == "max_minutes" and 1 <= meta["step"] < 24  # stopped within its first updates


def test_deterministic_runs_are_bit_identical(tmp_path):
    def run(name):
        train(load_config(SMOKE_CNN, [f"output_dir={tmp_path / name}", "trainer.deterministic=true", "log.wandb=disabled",
                                      "model.dropout=0.2", "trainer.epochs=2"]))
        return [{k: v for k, v in r.items() if k != "train/samples_per_s"} for r in read_metrics(tmp_path / name)]

    assert run("a") == run("b")
