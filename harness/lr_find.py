"""Learning-rate range test ("LR finder", Smith 2017; the fastai recipe) for any task.

    python -m harness.lr_find CONFIG [key=value ...]
        [--start-lr 1e-7] [--end-lr 10] [--steps 100] [--beta 0.98] [--diverge 4]

Everything is built from the config exactly as `train.py` builds it (harness.loop's
`build_training`: Accelerator with trainer.mixed_precision and grad accumulation, the training
DataLoader, the model, the optimizer from the optim section with its weight decay, momentum and
parameter groups, SAM), starting from the initial weights (init_from's, when set; a checkpoint in
output_dir is neither read nor touched), and each update is the loop's own (`UpdateStep`: clipping, SAM, batch replays,
trainer.on_nonfinite). Then, one optimizer update per step, the learning rate rises exponentially
from --start-lr to --end-lr over --steps updates (the loader is cycled when it is shorter), and the
training loss of each update is recorded. The loss is smoothed by an exponential moving average with
bias correction (beta); the sweep stops early once the smoothed loss exceeds --diverge (4) times its
best value, or is not finite. A non-finite loss under trainer.on_nonfinite=stop (the default) ends
the sweep there, without applying that update: a range test expects to blow up at some lr, so this
is its end, not an error. Under trainer.on_nonfinite=skip such micro-batches are left out as in
training and counted; an update left without any is not recorded. Afterwards the weights (BatchNorm
buffers included), the optimizer state, the grad scaler and the RNG states are put back exactly as
they were.

Suggested learning rate: the one at the steepest descent of the smoothed loss against log(lr); the
lr of the smallest smoothed loss divided by 10 is reported too. Both are printed; the curve goes to
`<output_dir>/lr_find.png` and the numbers to `<output_dir>/lr_find.csv` (lr, loss, smoothed).
The lr reported is the one of the optimizer's first parameter group (what the loop logs as
train/lr, i.e. optim.lr); other groups keep their ratio to it.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import random
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from harness import checkpoint as ckpt
from harness.cli import run_cli
from harness.errors import UserError, print_user_error
from harness.loop import NonFiniteLoss, UpdateStep, build_training, make_accelerator, prepared, replayed, start_epoch
from harness.plots import plt  # pyplot with the files-only backend, chosen once there
from harness.sam import SharpnessAware
from harness.task import get_task

START_LR, END_LR, STEPS, BETA, DIVERGE = 1e-7, 10.0, 100, 0.98, 4.0


class SmoothedLoss:
    """Exponential moving average with bias correction: avg_t = beta avg_{t-1} + (1 - beta) loss_t,
    reported as avg_t / (1 - beta^t). Without the correction the average starts at 0 and the first
    ~1/(1 - beta) values would be too low (the same correction as Adam's moments)."""

    def __init__(self, beta: float = BETA):
        self.beta, self.avg, self.count = beta, 0.0, 0

    def update(self, loss: float) -> float:
        self.count += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        return self.avg / (1 - self.beta ** self.count)


def exponential_lrs(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """`steps` learning rates from start_lr to end_lr, evenly spaced in log(lr)."""
    return np.geomspace(start_lr, end_lr, steps)


def check_options(start_lr: float, end_lr: float, steps: int, beta: float, diverge: float) -> None:
    if not start_lr > 0:
        raise UserError(f"--start-lr must be > 0, got {start_lr}")
    if not end_lr > start_lr:
        raise UserError(f"--end-lr must be larger than --start-lr ({start_lr}), got {end_lr}")
    if steps < 3:  # a slope needs a few points
        raise UserError(f"--steps must be at least 3, got {steps}")
    if not 0 <= beta < 1:
        raise UserError(f"--beta must be in [0, 1), got {beta}")
    if not diverge > 1:
        raise UserError(f"--diverge must be > 1 (a multiple of the best smoothed loss), got {diverge}")


# ---- the sweep --------------------------------------------------------------------------------------


@contextmanager
def restored(model: torch.nn.Module, optimizer, accelerator: Accelerator | None = None):
    """Inside, train as you like; on exit the model's state dict (parameters and buffers such as
    BatchNorm running statistics), its train/eval mode, the optimizer's state and hyperparameters (lr
    included), the grad scaler, the accelerator's step counter and the RNG states are exactly what
    they were on entry. Gradients are cleared (set to None), as after any optimizer update."""
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scaler = getattr(accelerator, "scaler", None)
    scaler_state = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
    accelerator_step = getattr(accelerator, "step", None)
    # Dropout and augmentation draw from these: a training run started after the sweep in the same
    # process must see the same random numbers as one started without it.
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
           np.random.get_state(), random.getstate())
    was_training = model.training
    try:
        yield
    finally:
        model.load_state_dict(weights)  # copies into the same tensors: the optimizer still holds them
        optimizer.load_state_dict(optimizer_state)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        if accelerator_step is not None:
            accelerator.step = accelerator_step
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        np.random.set_state(rng[2])
        random.setstate(rng[3])
        model.train(was_training)


def cycled(loader, task):
    """The loader's batches, epoch after epoch, each epoch announced as the training loop does."""
    epoch = 0
    while True:
        start_epoch(task, loader, epoch)
        yield from loader
        epoch += 1


def one_update(step: UpdateStep, batches) -> tuple[torch.Tensor | None, int]:
    """One optimizer update of the training loop (`step`, one micro-batch per call, until one
    completes the update): (the mean loss of its micro-batches that were not skipped, None when all
    were; how many were skipped). Raises NonFiniteLoss under on_nonfinite=stop, before applying it."""
    losses, skipped = [], 0
    while True:
        batch, _ = next(batches)
        done = step(batch)
        if done.loss is None:
            skipped += 1
        else:
            losses.append(done.loss)
        if done.updated:
            return (torch.stack(losses).mean() if losses else None), skipped


def range_test(accelerator: Accelerator, task, model: torch.nn.Module, optimizer, loader, lrs, *, beta: float = BETA,
               diverge: float = DIVERGE, grad_clip: float | None = None, sam: SharpnessAware | None = None,
               batch_replays: int = 1, channels_last: bool = False, on_nonfinite: str = "stop", progress: bool = False) -> dict:
    """One optimizer update (`one_update`) at each learning rate of `lrs` (the first parameter
    group's; the other groups keep their ratio to it). Stops early when the smoothed loss is not
    finite or exceeds `diverge` times its best (the rule assumes a positive loss, so it applies once
    the best is > 0), and, with on_nonfinite="stop", at a non-finite loss (recorded as such; that
    update is not applied). Model, optimizer and RNG states are restored afterwards (`restored`).

    Returns {"lr": [...], "loss": [...], "smoothed": [...], "stopped": "end" | "diverged" | "non-finite",
    "skipped_batches": n}, one entry per update recorded; a loss is the mean over the update's
    micro-batches (those not skipped) and processes."""
    base = optimizer.param_groups[0]["lr"]
    ratios = [group["lr"] / base if base else 1.0 for group in optimizer.param_groups]
    record = {"lr": [], "loss": [], "smoothed": [], "stopped": "end", "skipped_batches": 0}
    smoother, best = SmoothedLoss(beta), math.inf
    step = UpdateStep(accelerator, task, model, optimizer, sam, grad_clip, channels_last, on_nonfinite)
    batches = replayed(prepared(task, cycled(loader, task), accelerator.device), batch_replays)
    bar = tqdm(total=len(lrs), desc="lr find", unit="step", dynamic_ncols=True, disable=not progress)
    try:
        with restored(model, optimizer, accelerator), bar:
            model.train()
            for lr in lrs:
                for group, ratio in zip(optimizer.param_groups, ratios):
                    group["lr"] = float(lr) * ratio
                try:
                    loss, skipped = one_update(step, batches)
                except NonFiniteLoss:  # every process raises it: the sweep ends at this lr, recorded as NaN
                    loss, skipped = torch.tensor(math.nan, device=accelerator.device), 0
                record["skipped_batches"] += skipped
                bar.update()
                if loss is None:  # every micro-batch of the update skipped: no loss at this lr
                    continue
                if accelerator.num_processes > 1:
                    loss = accelerator.reduce(loss, reduction="mean")
                smoothed = smoother.update(float(loss))
                record["lr"].append(float(optimizer.param_groups[0]["lr"]))
                record["loss"].append(float(loss))
                record["smoothed"].append(smoothed)
                bar.set_postfix({"lr": f"{lr:.2e}", "loss": f"{smoothed:.4g}"}, refresh=False)
                if not math.isfinite(smoothed):
                    record["stopped"] = "non-finite"
                    break
                best = min(best, smoothed)
                if best > 0 and smoothed > diverge * best:
                    record["stopped"] = "diverged"
                    break
    finally:
        batches.close()
        # Accelerate's prepared loader unregisters itself from the (process-wide) gradient state only
        # when an epoch runs to its end; the sweep stops mid-epoch, and training may follow in-process.
        if hasattr(loader, "end"):
            loader.end()
    return record


# ---- the suggestion, the plot, the table ------------------------------------------------------------


def suggest(lrs, smoothed, skip_start: int | None = None) -> dict:
    """{"suggested_lr": lr at the steepest descent of the smoothed loss against log10(lr), or None
    when it does not descend; "min_lr": lr of the smallest smoothed loss; "min_lr_div10": that / 10;
    "best_loss": the smallest smoothed loss}.

    The first `skip_start` points (default: the first 10%) count for neither: they average only a few
    batches (the very first is one batch's loss), and a lucky first batch would pose as the minimum.
    The slope is taken up to the minimum only: past it the loss rises, and a noisy dip on the way up
    is not a learning rate to train at."""
    lrs, smoothed = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    skip = len(lrs) // 10 if skip_start is None else skip_start
    if len(lrs) - skip < 3:  # too short a sweep to spare any point
        skip = 0
    candidates = np.where(np.isfinite(smoothed), smoothed, np.inf)
    candidates[:skip] = np.inf
    if not np.isfinite(candidates).any():
        return {"suggested_lr": None, "min_lr": None, "min_lr_div10": None, "best_loss": None}
    lowest = int(np.argmin(candidates))
    result = {"min_lr": float(lrs[lowest]), "min_lr_div10": float(lrs[lowest]) / 10, "best_loss": float(smoothed[lowest])}
    if lowest - skip < 2:  # a slope needs 3 points
        return result | {"suggested_lr": None}
    slope = np.gradient(smoothed[skip:lowest + 1], np.log10(lrs[skip:lowest + 1]))
    steepest = int(np.argmin(slope))
    return result | {"suggested_lr": float(lrs[skip + steepest]) if slope[steepest] < 0 else None}


def write_csv(record: dict, path: Path) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["lr", "loss", "smoothed"])
        writer.writerows(zip(record["lr"], record["loss"], record["smoothed"]))


def plot(record: dict, found: dict, path: Path, title: str, diverge: float = DIVERGE) -> None:
    lrs, losses, smoothed = (np.asarray(record[k], dtype=float) for k in ("lr", "loss", "smoothed"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    if found["suggested_lr"] is not None:
        at = int(np.argmin(np.abs(np.log(lrs) - np.log(found["suggested_lr"]))))
        ax.axvline(found["suggested_lr"], color="tab:red", linestyle="--", linewidth=1)
        ax.plot([lrs[at]], [smoothed[at]], "o", color="tab:red", label=f"steepest {found['suggested_lr']:.2e} (suggested)")
    if found["min_lr_div10"] is not None:
        ax.axvline(found["min_lr_div10"], color="tab:green", linestyle=":", linewidth=1,
                   label=f"minimum / 10 {found['min_lr_div10']:.2e}")
    shown = smoothed[np.isfinite(smoothed)]
    if shown.size:  # the y range: down to the lowest loss, up to the smoothed curve's (not the raw spikes)
        low = min(shown.min(), np.nanmin(np.where(np.isfinite(losses), losses, np.nan)))
        best = found["best_loss"]
        high = min(shown.max(), diverge * best) if best is not None and best > 0 else shown.max()
        pad = 0.05 * max(high - low, 1e-12)
        ax.set_ylim(low - pad, high + pad)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (first parameter group)")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- from a config ----------------------------------------------------------------------------------


def lr_find(cfg, start_lr: float = START_LR, end_lr: float = END_LR, steps: int = STEPS, beta: float = BETA,
            diverge: float = DIVERGE) -> dict:
    """Build the training set-up of `cfg` as train.py does, run the range test, write
    `<output_dir>/lr_find.png` and `lr_find.csv`, print the suggestion; returns the record and the
    suggestion (see `range_test` and `suggest`) with the paths written."""
    check_options(start_lr, end_lr, steps, beta, diverge)
    task = get_task(cfg.task, cfg)
    tc = cfg.trainer
    run_dir = Path(cfg.output_dir)
    # As harness.loop.train makes them (no trackers: a sweep is not a run; no Task.on_train_start, so
    # nothing is added to a run in output_dir). No torch.compile even with trainer.compile: compiling
    # would take longer than the sweep itself and does not change the losses.
    accelerator = make_accelerator(cfg)
    parts = build_training(cfg, task, accelerator, compile=False,
                           init_from=ckpt.resolve_init_from(cfg.init_from) if cfg.init_from else None)

    progress = cfg.log.progress
    show_bar = accelerator.is_main_process and (progress == "bar" or (progress == "auto" and sys.stderr.isatty()))
    lrs = exponential_lrs(start_lr, end_lr, steps)
    record = range_test(accelerator, task, parts.model, parts.optimizer, parts.train_loader, lrs, beta=beta, diverge=diverge,
                        grad_clip=tc.grad_clip, sam=parts.sam, batch_replays=tc.batch_replays,
                        channels_last=tc.channels_last, on_nonfinite=tc.on_nonfinite, progress=show_bar)
    found = suggest(record["lr"], record["smoothed"])
    result = record | found | {"steps": len(record["lr"]), "png": str(run_dir / "lr_find.png"),
                               "csv": str(run_dir / "lr_find.csv")}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_csv(record, run_dir / "lr_find.csv")
        plot(record, found, run_dir / "lr_find.png", f"lr range test: {cfg.task}, {run_dir.name} "
             f"({cfg.optim.name}, batch {tc.batch_size})", diverge)
        for line in report_lines(result, start_lr, diverge):
            print(line, flush=True)
    accelerator.wait_for_everyone()
    return result


def report_lines(result: dict, start_lr: float, diverge: float) -> list[str]:
    why = {"end": "the end of the sweep", "diverged": f"smoothed loss above {diverge:g}x its best",
           "non-finite": "non-finite loss"}[result["stopped"]]
    swept = f", lr {start_lr:.1e} to {result['lr'][-1]:.2e}" if result["lr"] else ""  # empty: every update skipped
    lines = [f"lr find: {result['steps']} updates{swept} (stopped: {why})"]
    if result["skipped_batches"]:
        lines.append(f"skipped {result['skipped_batches']} micro-batches with a non-finite loss (trainer.on_nonfinite=skip)")
    if result["suggested_lr"] is None:
        lines.append("no suggestion: the smoothed loss did not fall over enough of the sweep; try more --steps or another "
                     "--start-lr / --end-lr")
    else:
        lines.append(f"suggested lr {result['suggested_lr']:.2e} (steepest descent of the smoothed loss); "
                     f"minimum-loss lr / 10: {result['min_lr_div10']:.2e}")
    if result["stopped"] == "end" and result["lr"] and result["min_lr"] == result["lr"][-1]:
        lines.append("note: the loss was still falling at the end of the sweep; a larger --end-lr shows more")
    lines.append(f"wrote {result['png']} and {result['csv']}")
    return lines


# ---- the command ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a one-line message and exit 2 like every other user mistake, not argparse's usage dump
        raise UserError(message)


def main(argv: list[str], prog: str = "python -m harness.lr_find") -> int:
    """CONFIG [key=value ...] plus the sweep's own --options (which may come anywhere)."""
    parser = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    parser.add_argument("--start-lr", type=float, default=START_LR)
    parser.add_argument("--end-lr", type=float, default=END_LR)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--beta", type=float, default=BETA)
    parser.add_argument("--diverge", type=float, default=DIVERGE)
    try:
        options, rest = parser.parse_known_args(argv)
        check_options(options.start_lr, options.end_lr, options.steps, options.beta, options.diverge)
    except UserError as err:
        return print_user_error(err)

    def command(cfg) -> dict:
        result = lr_find(cfg, options.start_lr, options.end_lr, options.steps, options.beta, options.diverge)
        short = {k: result[k] for k in ("suggested_lr", "min_lr_div10", "stopped", "steps")}
        return {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in short.items()}

    return run_cli(rest, command, __doc__.replace("python -m harness.lr_find", prog))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
