"""The training loop every task shares. It knows nothing about seismic or digits: it talks to a `Task`.

Read top to bottom: set-up (Accelerator, data, model, optimizer, schedule, EMA, resume, W&B), then
the loop (the update step, schedule, EMA, log, evaluate, checkpoint), then the exits (end,
SIGTERM/SIGINT, time budget, NaN). The set-up of data and model (`build_training`) and the update
step (`UpdateStep`: forward, loss, backward, SAM, clip, optimizer step) are below `train`, shared
with the LR finder.
"""
from __future__ import annotations

import functools
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import accelerate.optimizer
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader

from harness.artifacts import CheckpointUploader
from harness import checkpoint as ckpt
from harness.checkpoint import Checkpointer
from harness.config import BaseRunConfig
from harness.errors import RunFailed, ConfigError, UserError, user_message
from harness.optim import build_ema, build_optimizer, build_scheduler
from harness.sam import SharpnessAware
from harness.plots import plot_metrics
from harness.rundir import RunFolder
from harness.task import get_task
from harness.tracking import Tracker, configured_wandb_mode, start_wandb


# Accelerate's optimizer wrapper asks importlib whether `lomo_optim` is installed twice per step (0.3 ms
# on a CPU, several % of a small model's step); the answer cannot change within a process.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


class TrainState:
    """Loop counters, checkpointed with the rest of the state (Accelerate's register_for_checkpointing)."""

    def __init__(self):
        self.epoch = 0  # current epoch
        self.step = 0  # optimizer updates done
        self.batches_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.last_eval_step = -1  # so a resumed run does not evaluate the same weights twice
        self.total_steps = 0  # the schedule's length when the checkpoint was written
        self.wandb_run_id = None
        self.eval_pending = False  # a stop interrupted an evaluation of these weights: the next run redoes it

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def train(cfg: BaseRunConfig, *, more_runs_follow: bool = False) -> dict:
    """Train `cfg.task` as configured; returns a summary (last step, best metric, why it stopped).
    `more_runs_follow`: this process trains again next (harness.crossval's folds), so the process
    group of a multi-process launch stays up at the end (Accelerate's end_training destroys it)."""
    task = get_task(cfg.task, cfg)
    tc = cfg.trainer
    run_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, log_with="wandb" if configured_wandb_mode(cfg.log.wandb) != "disabled" else None)
    if tc.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        accelerator.print("note: fp16 autocast has no effect on CPU; use trainer.mixed_precision=bf16 there")
    # Checked and locked before any work; an earlier run is moved aside or trimmed to the checkpoint.
    run_folder = RunFolder.open(accelerator, cfg)

    # ---- data and model -------------------------------------------------------------------------
    parts = build_training(cfg, task, accelerator, compile=tc.compile, init_from=run_folder.init_from)
    train_loader, val_loader = parts.train_loader, parts.val_loader
    model, raw_model, optimizer = parts.model, parts.raw_model, parts.optimizer
    update_step = UpdateStep(accelerator, task, model, optimizer, parts.sam, tc.grad_clip, tc.channels_last, tc.on_nonfinite)

    updates_per_epoch = math.ceil(len(train_loader) / tc.grad_accum_steps)
    total_steps = tc.max_steps or tc.epochs * updates_per_epoch
    scheduler = build_scheduler(cfg.sched, optimizer, total_steps, cfg.checkpoint.mode)
    ema = build_ema(cfg.ema, raw_model)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state, *([ema] if ema is not None else []))
    checkpointer = Checkpointer(accelerator, run_dir, cfg.checkpoint.monitor, cfg.checkpoint.mode, cfg.checkpoint.keep_top_k)
    checkpointer.check_monitor(task.metric_names(), ema is not None)
    weights_for_inference = ema.module if ema is not None else raw_model

    # ---- resume ---------------------------------------------------------------------------------
    resume_from = run_folder.resume_from
    resumed_step = None
    if resume_from is not None:
        state.total_steps = total_steps
        ckpt.load_state(accelerator, resume_from)
        resumed_step = state.step
        if state.total_steps != total_steps:
            if cfg.sched.name == "onecycle":
                raise ConfigError(f"key 'trainer.epochs'/'trainer.max_steps': {resume_from} was trained with a one-cycle "
                                  f"schedule of {state.total_steps} updates, this config asks for {total_steps}; a one-cycle "
                                  "schedule cannot be stretched: keep the length or start a new output_dir")
            accelerator.print(f"note: the schedule grows from {state.total_steps} to {total_steps} updates")
        accelerator.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
    state.total_steps = total_steps
    run_folder.record_start(cfg, more_to_train(state, total_steps, tc), accelerator.is_main_process)
    task.on_train_start(raw_model, run_dir, state.step)

    state.wandb_run_id = start_wandb(accelerator, cfg, run_dir, state.wandb_run_id) or state.wandb_run_id
    tracker = Tracker(accelerator, run_dir, total_steps, state.step, cfg.log.progress, cfg.log.every_steps)
    uploader = CheckpointUploader(accelerator, cfg.log.upload_checkpoints)

    # ---- stopping: signals, time budget, non-finite loss --------------------------------------------
    stop_requested = []

    def on_signal(signum, frame):
        if stop_requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        stop_requested.append(signal.Signals(signum).name)

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    deadline = time.monotonic() + tc.max_minutes * 60 if tc.max_minutes else None

    def stop_wanted() -> bool:
        return bool(stop_requested) or (deadline is not None and time.monotonic() > deadline)

    def stop_evaluation() -> bool:
        """Asked before every evaluation batch (every process gets the same answer). Only a signal
        cuts an evaluation short: it means the machine is going away. The time budget is checked
        between updates, so an evaluation it finds started is completed (max_minutes leaves a margin)."""
        return any_process(accelerator, bool(stop_requested))[0]

    def evaluate_and_keep_best() -> dict | None:
        """The evaluation's values, or None when a stop request interrupted it (then nothing is kept,
        and `last` records that these weights still need their evaluation)."""
        values = {}
        state.eval_pending = True
        try:
            if ema is not None:
                values |= {f"val_raw/{k}": v for k, v in evaluate(accelerator, task, model, val_loader, tc.channels_last,
                                                                    stop_evaluation).items()}
            values |= {f"val/{k}": v for k, v in evaluate(accelerator, task, weights_for_inference, val_loader,
                                                          tc.channels_last, stop_evaluation).items()}
        except EvaluationStopped:
            summary["stopped"] = stop_requested[0]
            return None
        state.eval_pending = False
        state.last_eval_step = state.step
        monitor = cfg.checkpoint.monitor
        if monitor not in values:
            raise ckpt.monitor_error(monitor, values)
        if cfg.sched.name == "plateau":
            scheduler.step(values[monitor])
        meta = dict(step=state.step, epoch=state.epoch, task=cfg.task, metrics=values, config=cfg.model_dump(mode="json"))
        if checkpointer.save_best(weights_for_inference, values[monitor], meta):
            uploader.best_saved(checkpointer.dir, state.step)
        tracker.log(values, state.step, epoch_progress())
        tracker.message(f"eval step {state.step}: " + " ".join(f"{k} {v:.5g}" for k, v in values.items()))
        return values

    saved = {"step": resumed_step}  # the step `last` on disk holds
    resumed_with_eval_pending = state.eval_pending

    def save_last(reason: str) -> None:
        meta = dict(step=state.step, epoch=state.epoch, task=cfg.task, reason=reason, config=cfg.model_dump(mode="json"))
        uploader.last_saved(checkpointer.save_last(weights_for_inference, meta), state.step)
        saved["step"] = state.step

    def keep_work_before() -> str:
        """Save `last` as of the last completed update (a partly accumulated update is dropped and
        its batches are read again on resume); say what was saved."""
        if accelerator.num_processes > 1:  # the other processes are not at this point: no collective save
            return f"`last` is not saved (several processes); the last checkpoint in {run_dir / 'checkpoints'} stays"
        state.batches_in_epoch = update_boundary
        if state.step > 0 and state.step != saved["step"]:
            save_last(ckpt.DATA_ERROR_REASON)
        fix = "fix or remove the file, then run the same command again"
        if saved["step"] is None:
            return f"the run stopped before its first update, nothing was saved: {fix}"
        return f"the run stopped; saved {run_dir / 'checkpoints' / 'last'} at step {state.step}, the state before that batch: {fix} to resume"

    def epoch_progress() -> float:
        return state.epoch + state.batches_in_epoch / len(train_loader)

    # ---- the loop ---------------------------------------------------------------------------------
    summary = {"stopped": "finished"}
    window = defaultdict(float)  # train values summed since the last log line
    window_start = time.perf_counter()
    update_boundary = state.batches_in_epoch  # batches_in_epoch after the last optimizer update
    training_done = False
    try:
        if state.eval_pending:  # the previous run was stopped during this evaluation
            evaluate_and_keep_best()
        while summary["stopped"] == "finished" and more_to_train(state, total_steps, tc):
            start_epoch(task, train_loader, state.epoch)
            task.on_epoch_start(weights_for_inference, train_loader.dataset, state.epoch, state.batches_in_epoch)
            batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch) if state.batches_in_epoch else train_loader
            model.train()
            for batch, last_replay in replayed(prepared(task, batches, accelerator.device), tc.batch_replays):
                # The stop request travels with the step's non-finite check: one all-reduce for both.
                try:
                    done = update_step(batch, stop_wanted())
                except NonFiniteLoss as err:
                    raise RunFailed(f"{err} at step {state.step}, epoch {state.epoch}: "
                                    f"the run stops; the last good checkpoint is kept in {run_dir / 'checkpoints'}. "
                                    "Lower optim.lr, enable trainer.grad_clip, or set trainer.on_nonfinite=skip.") from None
                (stop_now,) = done.flags
                window["skipped_batches"] += float(done.loss is None)
                window["loss"] += 0.0 if done.loss is None else done.loss
                window["samples"] += task.batch_size(batch) * accelerator.num_processes
                window["batches"] += 1
                if done.grad_norm is not None:
                    window["grad_norm"] += done.grad_norm.float()
                state.batches_in_epoch += int(last_replay)
                if not done.updated:
                    continue

                # ---- one optimizer update is done ----
                window["lr"] = optimizer.param_groups[0]["lr"]  # the rate this update used
                if not optimizer.step_was_skipped and cfg.sched.name != "plateau":
                    scheduler.step()
                state.step += 1
                update_boundary = state.batches_in_epoch
                if ema is not None:
                    ema.update(raw_model, step=state.step)
                window["updates"] += 1
                if state.step % cfg.log.every_steps == 0 or state.step == total_steps:
                    values = summarize_window(window, time.perf_counter() - window_start)
                    tracker.log(values, state.step, epoch_progress())
                    tracker.advance(state.step, {"loss": values["train/loss"], "lr": values["train/lr"],
                                                 "samples/s": round(values["train/samples_per_s"])})
                    window.clear()
                    window_start = time.perf_counter()
                else:
                    tracker.advance(state.step, {})
                extra = task.after_update(model, state.step)
                if extra:
                    tracker.log(extra, state.step, epoch_progress())
                if tc.eval_every_steps and state.step % tc.eval_every_steps == 0:
                    if evaluate_and_keep_best() is None:
                        break
                    model.train()
                if tc.save_every_steps and state.step % tc.save_every_steps == 0:
                    save_last("periodic")
                if stop_now and last_replay:  # a replayed batch is finished first, so a resume starts on a new one
                    summary["stopped"] = stop_requested[0] if stop_requested else "max_minutes"
                    break
                if state.step >= total_steps:
                    break
            if summary["stopped"] != "finished":
                break
            if state.batches_in_epoch >= len(train_loader):  # the epoch ran to its end
                state.epoch += 1
                state.batches_in_epoch = update_boundary = 0
                if tc.eval_every_epochs and state.epoch % tc.eval_every_epochs == 0 and state.last_eval_step != state.step:
                    if evaluate_and_keep_best() is None:
                        break
                save_last("epoch")
        if summary["stopped"] == "finished" and state.last_eval_step != state.step:
            evaluate_and_keep_best()
        # A finished run started again has nothing new to save, unless a kill cut its final save short
        # or a stop interrupted its evaluation.
        if (state.step != resumed_step or run_folder.resumed_reason != summary["stopped"]
                or state.eval_pending != resumed_with_eval_pending):
            save_last(summary["stopped"])
        training_done = True
        if summary["stopped"] == "finished":
            summary |= task.after_training(run_dir, accelerator)
        else:
            if stop_requested and os.environ.get("WANDB_SWEEP_ID"):
                tracker.mark_preempting()
            tracker.message(f"stopped by {summary['stopped']} at step {state.step}: saved {run_dir / 'checkpoints' / 'last'}; "
                            "run the same command again to resume")
    except UserError as err:
        if isinstance(err, ConfigError) or training_done:
            raise
        # Bad data met mid-run (a NaN sample, a damaged file): keep the work done up to the last
        # completed update, then fail naming the file (exit 1: the run stopped, the input needs fixing).
        raise RunFailed(f"{user_message(err)}; {keep_work_before()}") from None
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        tracker.close()
        run_folder.close()

    summary["step"] = state.step
    if accelerator.is_main_process and cfg.log.plot:
        plot_metrics(run_dir)
    best = checkpointer.best() if accelerator.is_main_process else None
    if best is not None:
        summary["best"] = {"step": best["step"], best["monitor"]: best["monitor_value"]}
        tracker.summary({f"best/{best['monitor']}": best["monitor_value"], "best/step": best["step"]})
    if more_runs_follow:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()  # the trackers, then the process group
    return summary


def more_to_train(state: TrainState, total_steps: int, tc) -> bool:
    return state.step < total_steps and bool(tc.max_steps or state.epoch < tc.epochs)


def make_accelerator(cfg, log_with=None) -> Accelerator:
    """The Accelerator and seeding of a run (shared with the LR finder, which must train alike)."""
    tc = cfg.trainer
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(cfg.output_dir)),
        # The seedable sampler makes epoch e's order a function of (seed, e), the same on every
        # process and after a resume; skipped batches are then skipped in the sampler, unread.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        step_scheduler_with_optimizer=False,  # we step it ourselves, once per real optimizer update
    )
    set_seed(cfg.seed, deterministic=tc.deterministic)
    return accelerator


@dataclass
class Training:
    """What a run trains, built alike for the loop and the LR finder (`build_training`)."""

    train_loader: DataLoader  # prepared by the Accelerator, as is val_loader
    val_loader: DataLoader
    model: nn.Module  # prepared (DDP-wrapped across processes) and compiled with trainer.compile
    raw_model: nn.Module  # the same weights unwrapped: what EMA copies and checkpoints save
    optimizer: torch.optim.Optimizer
    sam: SharpnessAware | None


def build_training(cfg, task, accelerator: Accelerator, compile: bool, init_from: Path | None = None) -> Training:
    """The task's data and model (its weights from the checkpoint `init_from`, when given), the
    loaders, channels_last, the optimizer and SAM, prepared by `accelerator` (see `make_accelerator`)."""
    tc = cfg.trainer
    train_set, val_set = task.build_datasets(cfg)
    train_loader, val_loader = make_loaders(cfg, task, train_set, val_set)
    # With init_from the weights come from a checkpoint next, as in inference: what only initialises
    # them (a pretrained file) is skipped. A model may adapt tensors on load (a ViT its position embedding).
    model = task.build_model(cfg, from_checkpoint=init_from is not None)
    if init_from is not None:
        meta = ckpt.load_weights(model, init_from, label="init_from")
        accelerator.print(f"init_from: weights of {init_from} (step {meta.get('step')}); optimizer, schedule and step start anew")
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    sam = make_sam(cfg, model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    raw_model = accelerator.unwrap_model(model)
    if compile:
        model = torch.compile(model)
    return Training(train_loader, val_loader, model, raw_model, optimizer, sam)


def make_loaders(cfg, task, train_set, val_set) -> tuple[DataLoader, DataLoader]:
    tc = cfg.trainer
    loader_args = dict(num_workers=tc.num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
                       collate_fn=task.collate_fn, worker_init_fn=ignore_stop_signals)
    train_loader = DataLoader(train_set, batch_size=tc.batch_size, shuffle=True, drop_last=True,
                              # Its own generator: creating an iterator must not draw from the global
                              # RNG, or a resumed run's dropout would diverge from a straight one.
                              generator=torch.Generator().manual_seed(cfg.seed), **loader_args)
    val_loader = DataLoader(val_set, batch_size=tc.eval_batch_size or tc.batch_size, shuffle=False, **loader_args)
    if len(train_loader) == 0:
        raise ConfigError(f"key 'trainer.batch_size': {tc.batch_size} is larger than the training set ({len(train_set)} samples)")
    return train_loader, val_loader


def make_sam(cfg, model) -> SharpnessAware | None:
    if cfg.optim.sam_rho is None:
        return None
    if cfg.trainer.grad_accum_steps > 1:
        raise ConfigError("key 'optim.sam_rho': SAM perturbs the weights with the gradient of the whole update, "
                          "which grad accumulation splits over micro-batches; use trainer.grad_accum_steps=1")
    return SharpnessAware(model.parameters(), cfg.optim.sam_rho, cfg.optim.sam_adaptive, cfg.optim.sam_eta)


def start_epoch(task, loader, epoch: int) -> None:
    """Before each pass over the training data: the sampler's order and the task's augmentation
    become functions of (seed, epoch)."""
    if hasattr(loader, "set_epoch"):  # Accelerate's prepared loaders; a plain DataLoader has no epochs
        loader.set_epoch(epoch)
    task.set_epoch(loader.dataset, epoch)


class NonFiniteLoss(RunFailed):
    """A micro-batch's loss was NaN or infinite (on some process) under trainer.on_nonfinite=stop;
    each caller of `UpdateStep` says what stopping means for it."""

    def __init__(self, loss: float):
        super().__init__(f"non-finite loss ({loss})")
        self.loss = loss


@dataclass
class StepResult:
    """What `UpdateStep` did with one micro-batch."""

    loss: torch.Tensor | None  # its loss, detached float32; None when skipped as non-finite
    updated: bool  # it completed an optimizer update (the last micro-batch of a grad-accumulation cycle)
    grad_norm: torch.Tensor | None  # that update's gradient norm before clipping, with grad_clip
    flags: list[bool]  # the caller's flags, each OR'ed across processes


class UpdateStep:
    """The training step, one micro-batch per call, for the loop and the LR finder alike: forward
    and loss (under the autocast of Accelerate's prepared model), the non-finite check every process
    agrees on (`on_nonfinite`: "stop" raises NonFiniteLoss, "skip" leaves the micro-batch out and says
    so), backward (through the fp16 grad scaler if any), SAM's second pass, and on the micro-batch
    that completes a grad-accumulation cycle: clipping, the optimizer step (which the scaler skips
    after an overflow) and clearing the gradients. Batch replays come from `replayed`."""

    def __init__(self, accelerator: Accelerator, task, model: nn.Module, optimizer, sam: SharpnessAware | None = None,
                 grad_clip: float | None = None, channels_last: bool = False, on_nonfinite: str = "stop"):
        self.accelerator, self.task, self.model, self.optimizer, self.sam = accelerator, task, model, optimizer, sam
        self.grad_clip, self.channels_last, self.on_nonfinite = grad_clip, channels_last, on_nonfinite

    def __call__(self, batch, *flags: bool) -> StepResult:
        accelerator, task, model, optimizer = self.accelerator, self.task, self.model, self.optimizer
        if self.channels_last:
            batch = to_channels_last(batch)
        grad_norm = None
        with accelerator.accumulate(model):
            loss = task.loss(task.forward(model, batch), batch)
            # One small all-reduce tells every process whether any saw a non-finite loss (and the
            # caller's flags, e.g. a stop request), so all of them take the same branch: a backward
            # skipped on one process alone would leave the others waiting in DDP's all-reduce.
            bad, *flags = any_process(accelerator, not torch.isfinite(loss.detach()).item(), *flags)
            if bad and self.on_nonfinite == "stop":
                raise NonFiniteLoss(loss.item())
            if not bad:
                accelerator.backward(loss)
                if self.sam is not None:  # the update uses the gradient at the worst weights within sam_rho
                    with self.sam.perturbed(model):
                        optimizer.zero_grad(set_to_none=True)
                        accelerator.backward(task.loss(task.forward(model, batch), batch))
            if accelerator.sync_gradients:
                if self.grad_clip is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return StepResult(None if bad else loss.detach().float(), accelerator.sync_gradients, grad_norm, flags)


def prepared(task, batches, device):
    """The batches as the task prepares them for training (`Task.prepare_batch`)."""
    for batch in batches:
        yield task.prepare_batch(batch, device)


def replayed(batches, replays: int):
    """Each batch `replays` times in a row, with a flag on its last time."""
    for batch in batches:
        for replay in range(replays):
            yield batch, replay == replays - 1


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT, and SIGTERM from anyone but their parent: a Ctrl-C or a
    shutdown reaches the whole process group, and a worker that died of it would crash the main
    process before it can save `last`. Their parent's SIGTERM (the DataLoader's shutdown, or
    multiprocessing's at exit, which then waits for the worker) must still end them, or a run that
    fails with workers running would hang at exit. A signal handler cannot see the sender, so
    SIGTERM is blocked and a thread takes it with sigwaitinfo, which can. Without sigwaitinfo
    (macOS) SIGTERM keeps its default: a group stop may then kill a worker, but nothing hangs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None else os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    threading.Thread(target=_obey_parent_sigterm, args=(parent_pid,), daemon=True, name="sigterm").start()


def _obey_parent_sigterm(parent_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent_pid:
            os._exit(0)  # quietly: the parent asked (a non-zero exit makes its SIGCHLD handler raise)


def any_process(accelerator, *flags: bool) -> list[bool]:
    """OR each flag across processes (no communication at all with one process)."""
    if accelerator.num_processes == 1:
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v) for v in accelerator.reduce(tensor, reduction="sum").tolist()]


def summarize_window(window: dict, seconds: float) -> dict:
    """The train values logged every log.every_steps updates, averaged over that window."""
    done = max(window["batches"] - window["skipped_batches"], 1)
    values = {
        "train/loss": float(window["loss"]) / done,
        "train/lr": window["lr"],
        "train/samples_per_s": window["samples"] / max(seconds, 1e-9),
    }
    if "grad_norm" in window:
        values["train/grad_norm"] = float(window["grad_norm"]) / max(window["updates"], 1)
    if window["skipped_batches"]:
        values["train/skipped_batches"] = window["skipped_batches"]
    return values


class EvaluationStopped(Exception):
    """A stop request arrived during an evaluation (`evaluate`'s should_stop said so)."""


@torch.no_grad()
def evaluate(accelerator, task, model, loader, channels_last: bool = False, should_stop=None,
             per_sample: dict | None = None) -> dict[str, float]:
    """Average each per-sample metric over the whole validation set, gathered across processes with
    the padding duplicates removed (gather_for_metrics), NaN entries ignored. `should_stop()`, asked
    before every batch, ends a long evaluation early by raising EvaluationStopped. `per_sample`: a
    dict to fill with every sample's metrics and `task.predictions` (CPU tensors in dataset order,
    under "predictions"), e.g. for out-of-fold predictions."""
    was_training = model.training
    model.eval()
    sums, counts = defaultdict(lambda: 0.0), defaultdict(lambda: 0.0)
    for batch in loader:
        if should_stop is not None and should_stop():
            model.train(was_training)
            raise EvaluationStopped
        if channels_last:
            batch = to_channels_last(batch)
        with accelerator.autocast():
            outputs = task.forward(model, batch)
        gathered = accelerator.gather_for_metrics(task.metrics(outputs, batch))
        if per_sample is not None:
            predictions = accelerator.gather_for_metrics(task.predictions(outputs).detach())
            for name, values in {**gathered, "predictions": predictions}.items():
                per_sample.setdefault(name, []).append(values.detach().float().cpu())
        for name, values in gathered.items():
            values = values.detach().float().reshape(-1)
            present = ~torch.isnan(values)
            sums[name] = sums[name] + values[present].sum()
            counts[name] = counts[name] + present.sum()
    model.train(was_training)
    if per_sample is not None:
        per_sample.update({name: torch.cat(parts) for name, parts in per_sample.items()})
    return {name: float(sums[name] / counts[name]) if float(counts[name]) else float("nan") for name in sums}


def to_channels_last(batch):
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_channels_last(b) for b in batch)
    if isinstance(batch, dict):
        return {k: to_channels_last(v) for k, v in batch.items()}
    return batch
