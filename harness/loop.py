"""The training loop every task shares. It knows nothing about seismic or digits: it talks to a `Task`.

Read top to bottom: set-up (Accelerator, data, model, optimizer, schedule, EMA, resume, W&B), then
the loop (forward, loss, backward, clip, step, schedule, EMA, log, evaluate, checkpoint), then the
exits (end, SIGTERM/SIGINT, time budget, NaN).
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
from pathlib import Path

import accelerate.optimizer
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader

from harness.artifacts import CheckpointUploader
from harness.checkpoint import Checkpointer
from harness.config import BaseRunConfig, save_yaml
from harness.errors import RunFailed, ConfigError, UserError, user_message
from harness.optim import build_ema, build_optimizer, build_scheduler
from harness.sam import SharpnessAware
from harness.plots import plot_metrics
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


def train(cfg: BaseRunConfig) -> dict:
    """Train `cfg.task` as configured; returns a summary (last step, best metric, why it stopped)."""
    task = get_task(cfg.task, cfg)
    tc = cfg.trainer
    run_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, log_with="wandb" if configured_wandb_mode(cfg.log.wandb) != "disabled" else None)
    if tc.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        accelerator.print("note: fp16 autocast has no effect on CPU; use trainer.mixed_precision=bf16 there")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")

    # ---- data and model -------------------------------------------------------------------------
    train_set, val_set = task.build_datasets(cfg)
    train_loader, val_loader = make_loaders(cfg, task, train_set, val_set)
    model = task.build_model(cfg)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    sam = make_sam(cfg, model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    raw_model = accelerator.unwrap_model(model)
    if tc.compile:
        model = torch.compile(model)

    updates_per_epoch = math.ceil(len(train_loader) / tc.grad_accum_steps)
    total_steps = tc.max_steps or tc.epochs * updates_per_epoch
    scheduler = build_scheduler(cfg.sched, optimizer, total_steps, cfg.checkpoint.mode)
    ema = build_ema(cfg.ema, raw_model)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state, *([ema] if ema is not None else []))
    checkpointer = Checkpointer(accelerator, run_dir, cfg.checkpoint.monitor, cfg.checkpoint.mode, cfg.checkpoint.keep_top_k)
    weights_for_inference = ema.module if ema is not None else raw_model

    # ---- resume ---------------------------------------------------------------------------------
    resume_from = None
    if cfg.resume == "auto":
        resume_from = checkpointer.resume_dir()
    elif cfg.resume != "never":
        resume_from = Path(cfg.resume)
        if not (resume_from / "meta.json").is_file():
            raise ConfigError(f"key 'resume': {cfg.resume!r} is not a complete checkpoint directory (no meta.json)")
    resumed_step = None
    if resume_from is not None:
        state.total_steps = total_steps
        accelerator.load_state(str(resume_from))
        resumed_step = state.step
        if state.total_steps != total_steps:
            if cfg.sched.name == "onecycle":
                raise ConfigError(f"key 'trainer.epochs'/'trainer.max_steps': {resume_from} was trained with a one-cycle "
                                  f"schedule of {state.total_steps} updates, this config asks for {total_steps}; a one-cycle "
                                  "schedule cannot be stretched: keep the length or start a new output_dir")
            accelerator.print(f"note: the schedule grows from {state.total_steps} to {total_steps} updates")
        accelerator.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
    state.total_steps = total_steps

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

    def stop_evaluation() -> bool:  # asked before every evaluation batch; every process gets the same answer
        return any_process(accelerator, stop_wanted())[0]

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
            summary["stopped"] = stop_requested[0] if stop_requested else "max_minutes"
            return None
        state.eval_pending = False
        state.last_eval_step = state.step
        monitor = cfg.checkpoint.monitor
        if monitor not in values:
            raise ConfigError(f"key 'checkpoint.monitor': {monitor!r} is not an evaluation metric; available: {', '.join(sorted(values))}")
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

    def keep_work_before(err: UserError) -> str:
        """Save `last` as of the last completed update (a partly accumulated update is dropped and
        its batches are read again on resume); say what was saved."""
        if accelerator.num_processes > 1:  # the other processes are not at this point: no collective save
            return f"`last` is not saved (several processes); the last checkpoint in {run_dir / 'checkpoints'} stays"
        state.batches_in_epoch = update_boundary
        if state.step > 0 and state.step != saved["step"]:
            save_last("data error")
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
        while summary["stopped"] == "finished" and state.step < total_steps and (tc.max_steps or state.epoch < tc.epochs):
            train_loader.set_epoch(state.epoch)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(state.epoch)
            batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch) if state.batches_in_epoch else train_loader
            model.train()
            for batch, last_replay in replayed(batches, tc.batch_replays):
                if tc.channels_last:
                    batch = to_channels_last(batch)
                with accelerator.accumulate(model):
                    outputs = task.forward(model, batch)
                    loss = task.loss(outputs, batch)
                    # One small all-reduce tells every process whether any saw a non-finite loss or a
                    # stop request, so all of them take the same branch (no collective is left hanging).
                    bad_loss, stop_now = any_process(accelerator, not torch.isfinite(loss.detach()).item(), stop_wanted())
                    if bad_loss and tc.on_nonfinite == "stop":
                        raise RunFailed(f"non-finite loss ({loss.item()}) at step {state.step}, epoch {state.epoch}: "
                                        f"the run stops; the last good checkpoint is kept in {run_dir / 'checkpoints'}. "
                                        "Lower optim.lr, enable trainer.grad_clip, or set trainer.on_nonfinite=skip.")
                    if not bad_loss:
                        accelerator.backward(loss)
                        if sam is not None:  # the update uses the gradient at the worst weights within sam_rho
                            with sam.perturbed(model):
                                optimizer.zero_grad(set_to_none=True)
                                accelerator.backward(task.loss(task.forward(model, batch), batch))
                    window["skipped_batches"] += float(bad_loss)
                    window["loss"] += 0.0 if bad_loss else loss.detach().float()
                    window["samples"] += task.batch_size(batch) * accelerator.num_processes
                    window["batches"] += 1
                    if accelerator.sync_gradients:
                        if tc.grad_clip is not None:
                            window["grad_norm"] += accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip).float()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += int(last_replay)
                if not accelerator.sync_gradients:
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
        if state.step != resumed_step or state.eval_pending != resumed_with_eval_pending:  # a finished run started
            save_last(summary["stopped"])                                                   # again has nothing to save
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
        raise RunFailed(f"{user_message(err)}; {keep_work_before(err)}") from None
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        tracker.close()

    summary["step"] = state.step
    if accelerator.is_main_process and cfg.log.plot:
        plot_metrics(run_dir)
    best = checkpointer.best() if accelerator.is_main_process else None
    if best is not None:
        summary["best"] = {"step": best["step"], best["monitor"]: best["monitor_value"]}
        tracker.summary({f"best/{best['monitor']}": best["monitor_value"], "best/step": best["step"]})
    accelerator.end_training()
    return summary


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


def make_loaders(cfg, task, train_set, val_set) -> tuple[DataLoader, DataLoader]:
    tc = cfg.trainer
    loader_args = dict(num_workers=tc.num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
                       collate_fn=getattr(task, "collate_fn", None), worker_init_fn=ignore_stop_signals)
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
def evaluate(accelerator, task, model, loader, channels_last: bool = False, should_stop=None) -> dict[str, float]:
    """Average each per-sample metric over the whole validation set, gathered across processes with
    the padding duplicates removed (gather_for_metrics), NaN entries ignored. `should_stop()`, asked
    before every batch, ends a long evaluation early by raising EvaluationStopped."""
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
        per_sample = accelerator.gather_for_metrics(task.metrics(outputs, batch))
        for name, values in per_sample.items():
            values = values.detach().float().reshape(-1)
            present = ~torch.isnan(values)
            sums[name] = sums[name] + values[present].sum()
            counts[name] = counts[name] + present.sum()
    model.train(was_training)
    return {name: float(sums[name] / counts[name]) if float(counts[name]) else float("nan") for name in sums}


def to_channels_last(batch):
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_channels_last(b) for b in batch)
    if isinstance(batch, dict):
        return {k: to_channels_last(v) for k, v in batch.items()}
    return batch
