"""The LR finder (harness/lr_find.py, `python -m cnn.lr_find`): smoothing, early stop, exact restore of
the model and optimizer, a suggestion that trains well, and the command's files and exit codes."""
from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cnn import lr_find as cnn_lr_find
from conftest import ROOT, SMOKE_CNN, clean_env, read_metrics
from harness.config import load_config, validate
from harness.loop import train
from harness.lr_find import SmoothedLoss, exponential_lrs, lr_find, range_test, suggest
from harness.optim import build_optimizer
from harness.task import Task, get_task, register_task

pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoothed_loss_is_a_bias_corrected_moving_average():
    smoother = SmoothedLoss(beta=0.5)
    # avg: 0.5, 1.25, 2.125; corrected by 1 - 0.5^t = 0.5, 0.75, 0.875
    assert [smoother.update(x) for x in (1.0, 2.0, 3.0)] == pytest.approx([1.0, 5 / 3, 17 / 7], rel=1e-12)
    smoother = SmoothedLoss(beta=0.98)
    assert smoother.update(2.5) == pytest.approx(2.5)  # the first value is the loss itself, not 0.02 x it
    assert smoother.update(2.5) == pytest.approx(2.5)  # a constant loss stays constant
    assert smoother.update(0.5) == pytest.approx((0.98 * 0.0396 * 2.5 + 0.02 * 0.5) / (1 - 0.98**3))


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = exponential_lrs(1e-6, 1.0, 61)  # 10 points per decade
    x = np.log10(lrs)
    # Falls fastest at lr 1e-3 (slope -2 per decade), bottoms out near lr 1e-1, then rises with a sharp
    # dip on the way up (slope -4.5 per decade) that stays above the minimum and must not count.
    smoothed = 2 - np.tanh(2 * (x + 3)) + np.where(x > -1, 8 * (x + 1) ** 2, 0)
    low = int(np.argmin(smoothed))
    assert 49 <= low <= 51
    smoothed[low + 6] -= 2.5
    assert smoothed[low + 6] > smoothed[low] and np.gradient(smoothed, x).min() < -4
    found = suggest(lrs, smoothed)
    assert found["suggested_lr"] == pytest.approx(1e-3, rel=1e-6)
    assert found["min_lr"] == lrs[low] and found["min_lr_div10"] == pytest.approx(lrs[low] / 10)
    assert found["best_loss"] == smoothed[low]
    smoothed[0] = 0.5  # a lucky first batch (the first 10% of the points are too little averaged to count)
    assert suggest(lrs, smoothed) == found
    assert suggest(lrs, np.linspace(1, 2, 61))["suggested_lr"] is None  # never falls: no suggestion
    assert suggest(lrs[:3], [1.0, float("nan"), float("nan")])["suggested_lr"] is None


# ---- the sweep on the cnn task -----------------------------------------------------------------------


def smoke_setup(*overrides: str):
    """(accelerator, task, model, optimizer, loader) of the cnn smoke config, prepared as the loop does."""
    cfg = load_config(SMOKE_CNN, ["log.progress=none", "output_dir=" + os.devnull, *overrides])
    task = get_task(cfg.task, cfg)
    accelerator = Accelerator()
    train_set, _ = task.build_datasets(cfg)
    loader = DataLoader(train_set, batch_size=cfg.trainer.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = task.build_model(cfg)
    optimizer = build_optimizer(cfg.optim, model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, task, model, optimizer, loader


def assert_identical(a, b, where="state"):
    """Nested dicts/lists/tuples of tensors and numbers, equal bit for bit (dtype and shape too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw", "lion", "muon"])
def test_range_test_restores_weights_buffers_and_optimizer_state_exactly(optimizer_name):
    accelerator, task, model, optimizer, loader = smoke_setup(f"optim.name={optimizer_name}", "model.dropout=0.2")
    optimizer.param_groups[1]["lr"] = 0.5 * optimizer.param_groups[0]["lr"]  # unequal groups keep their ratio
    for batch, _ in zip(loader, range(3)):  # real training first: momentum / Adam moments, BN statistics
        accelerator.backward(task.loss(task.forward(model, batch), batch))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()  # the mode is put back too
    weights = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    assert any(name.endswith("running_mean") for name in weights) and optimizer_state["state"]

    seen = []  # (lr of each group, largest weight change so far) at every update of the sweep
    first = next(model.parameters())
    start = first.detach().clone()
    optimizer.optimizer.register_step_post_hook(
        lambda opt, args, kwargs: seen.append(([g["lr"] for g in opt.param_groups], float((first.detach() - start).abs().max()))))
    record = range_test(accelerator, task, model, optimizer, loader, exponential_lrs(1e-4, 10.0, 30))

    assert len(seen) == len(record["lr"]) >= 10  # the sweep really trained ...
    assert max(change for _, change in seen) > 1e-3  # ... and moved the weights
    assert [lrs[0] for lrs, _ in seen] == record["lr"]
    assert all(lrs[1] == pytest.approx(0.5 * lrs[0]) for lrs, _ in seen)
    assert_identical(model.state_dict(), weights, "model")
    assert_identical(optimizer.state_dict(), optimizer_state, "optimizer")
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_sweep_stops_once_the_smoothed_loss_exceeds_4x_its_best():
    diverging = ("optim.name=sgd", "model.norm=none")
    lrs = exponential_lrs(1e-5, 1e4, 60)
    record = range_test(*smoke_setup(*diverging), lrs)
    smoothed = record["smoothed"]
    assert record["stopped"] == "diverged" and len(smoothed) < len(lrs)
    assert math.isfinite(smoothed[-1]) and smoothed[-1] > 4 * min(smoothed[:-1])
    assert all(s <= 4 * min(smoothed[:i + 1]) for i, s in enumerate(smoothed[:-1]))  # not a step earlier
    assert record["lr"] == pytest.approx(list(lrs[:len(smoothed)]))
    # The 4x rule is what stopped it: with a looser one the same sweep goes on further.
    looser = range_test(*smoke_setup(*diverging), lrs, diverge=50.0)
    assert len(looser["lr"]) > len(smoothed)
    assert looser["smoothed"][:len(smoothed)] == pytest.approx(smoothed)


class NanAfter(Task):
    """A linear regression whose loss turns NaN at its 6th evaluation."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, outputs, batch):
        self.calls += 1
        loss = (outputs - batch[1]).square().mean()
        return loss * float("nan") if self.calls >= 6 else loss


def test_sweep_stops_at_a_non_finite_loss_and_does_not_apply_it():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    record = range_test(Accelerator(), NanAfter(), model, optimizer, loader, exponential_lrs(1e-3, 1.0, 20))
    assert record["stopped"] == "non-finite" and len(record["loss"]) == 6  # the loader (4 batches) was cycled
    assert all(math.isfinite(v) for v in record["smoothed"][:5]) and math.isnan(record["loss"][-1])
    assert_identical(model.state_dict(), before)


@register_task("nan_at_sixth_loss")
class NanAtSixthLoss(Task):
    """A linear regression whose 6th loss (the 6th micro-batch a run or sweep trains on) is NaN, and
    only that one."""

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.calls = 0

    def build_datasets(self, cfg):
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        dataset = TensorDataset(x, x.sum(1, keepdim=True))
        return dataset, dataset

    def build_model(self, cfg, *, from_checkpoint=False):
        return nn.Linear(4, 1)

    def loss(self, outputs, batch):
        self.calls += 1
        loss = (outputs - batch[1]).square().mean()
        return loss * float("nan") if self.calls == 6 else loss


def test_sweep_follows_trainer_on_nonfinite_as_training_does(tmp_path):
    lrs = exponential_lrs(1e-4, 1e-2, 12)

    def sweep(*trainer):
        cfg = validate({"task": "nan_at_sixth_loss", "output_dir": str(tmp_path), "log": {"wandb": "disabled", "progress": "none"},
                        "optim": {"name": "sgd", "lr": 0.1}, "trainer": {"batch_size": 16, **dict(trainer)}})
        return lr_find(cfg, start_lr=1e-4, end_lr=1e-2, steps=12)

    # skip: the NaN micro-batch is left out and counted, and the sweep goes on to its end
    skipped = sweep(("on_nonfinite", "skip"))
    assert skipped["stopped"] == "end" and skipped["skipped_batches"] == 1
    assert skipped["lr"] == pytest.approx(list(lrs[:5]) + list(lrs[6:]))  # the 6th update had nothing left to record
    assert all(math.isfinite(v) for v in skipped["loss"])
    # with grad accumulation the update keeps its finite micro-batch: every lr is recorded
    accumulated = sweep(("on_nonfinite", "skip"), ("grad_accum_steps", 2))
    assert accumulated["skipped_batches"] == 1 and accumulated["lr"] == pytest.approx(list(lrs))
    # stop (the default): the sweep ends at that update, recorded as non-finite
    stopped = sweep()
    assert stopped["stopped"] == "non-finite" and len(stopped["loss"]) == 6 and math.isnan(stopped["loss"][-1])
    assert stopped["skipped_batches"] == 0


def final_train_loss(tmp_path, lr: float) -> float:
    """The training loss over the last 8 of 24 updates at a constant `lr` from the smoke config's start."""
    run_dir = tmp_path / f"train_{lr:.3g}"
    train(load_config(SMOKE_CNN, [f"output_dir={run_dir}", f"optim.lr={lr}", "sched.name=constant", "trainer.max_steps=24",
                                  "log.every_steps=8", "log.wandb=disabled", "log.plot=false", "log.progress=none"]))
    return [row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row][-1]


def test_suggested_lr_trains_faster_than_a_much_smaller_or_larger_one(tmp_path):
    cfg = load_config(SMOKE_CNN, [f"output_dir={tmp_path / 'find'}", "log.wandb=disabled", "log.progress=none"])
    result = lr_find(cfg)  # adamw, smoke_cnn on generated gratings, 100 steps from 1e-7 to 10
    suggested = result["suggested_lr"]
    assert suggested in result["lr"] and 1e-7 <= suggested <= 10
    assert result["min_lr_div10"] == pytest.approx(result["lr"][10 + int(np.argmin(result["smoothed"][10:]))] / 10)
    at = {lr: final_train_loss(tmp_path, lr) for lr in (suggested, suggested / 100, suggested * 100)}
    assert at[suggested] < 0.5 * at[suggested / 100], at  # barely learns at lr / 100
    assert at[suggested] < 0.5 * at[suggested * 100], at  # unstable at lr x 100
    assert sorted(p.name for p in (tmp_path / "find").iterdir()) == ["lr_find.csv", "lr_find.png"]


# ---- the command -------------------------------------------------------------------------------------


def run_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnn.lr_find", *map(str, args)], cwd=ROOT,
                          env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)


def test_command_writes_png_and_csv_prints_the_suggestion_and_exits_0(tmp_path):
    result = run_command(SMOKE_CNN, f"output_dir={tmp_path}", "--steps", "40", "--end-lr=100", "log.wandb=disabled")
    assert result.returncode == 0, result.stderr
    assert "suggested lr" in result.stdout and "done: suggested_lr=" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.csv", "lr_find.png"]  # not a training run
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    assert 5 <= len(rows) <= 40 and list(rows[0]) == ["lr", "loss", "smoothed"]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-7) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert float(rows[0]["smoothed"]) == pytest.approx(float(rows[0]["loss"]))
    done = dict(item.split("=") for item in result.stdout.split("done: ")[1].strip().split(", "))
    assert lrs[0] <= float(done["suggested_lr"]) <= lrs[-1] and int(done["steps"]) == len(rows)


def test_user_mistakes_exit_2_with_one_line_and_no_traceback(tmp_path, capsys):
    assert cnn_lr_find.main([str(SMOKE_CNN), f"output_dir={tmp_path}", "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "Traceback" not in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    for argv, message in [([str(SMOKE_CNN), "--steps=abc"], "--steps"),
                          ([str(SMOKE_CNN), "--end-lr", "1e-9"], "--end-lr must be larger"),
                          ([str(SMOKE_CNN), "--beta=1"], "--beta"),
                          (["optim.lr=0.1"], "give a config file first")]:
        assert cnn_lr_find.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
