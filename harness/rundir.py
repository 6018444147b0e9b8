"""The run folder (`output_dir`) a training run owns.

- Checked before any work: not empty, not a file, not under /proc or /sys, writable.
- Locked while a run uses it (`<output_dir>/.lock`, holding the pid): a second run on the same folder
  stops at once naming the holder; the lock dies with its process, so a killed run's folder is simply
  taken over, and `python -m harness.runs` tells a live run from a crashed one by it.
- One run per folder: a run starting from step 0 over an earlier run (resume=never, or nothing to
  resume) first moves that run aside into `<output_dir>/.previous-<time>/`; a resume drops the
  records the checkpoint does not contain (metrics after its step, best checkpoints written later),
  which the resumed run writes again; it refuses a checkpoint whose config differs in a key that
  shapes the run unless `resume_changes=allow`, and prints every change.
- Every start that trains records its config in `config_history/NNN.yaml`; `config.yaml` is the
  config of the latest start that trained.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from fnmatch import fnmatch
from pathlib import Path

import yaml

from harness import checkpoint as ckpt
from harness.errors import ConfigError, RunFailed, UserError
from harness.files import write_text_atomic
from harness.tracking import parse_record

LOCK = ".lock"
PREVIOUS = ".previous-"
HISTORY = "config_history"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")  # a folder holding one of these holds a run
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"))
LOCK_TRIES = 10  # 0.1 s apart: `python -m harness.runs` holds the lock for an instant when it probes it
# Keys a resume may change without making it another run (length, lr, evaluation, saving, logging,
# speed); a change to any other key (seed, model, data, optimizer, schedule, batch) is refused unless
# resume_changes=allow. Every change is printed.
RESUMABLE_CHANGES = (
    "output_dir", "resume", "resume_changes", "init_from", "log.*", "checkpoint.keep_top_k",
    "trainer.epochs", "trainer.max_steps", "trainer.max_minutes", "trainer.eval_every_*", "trainer.save_every_steps",
    "trainer.eval_batch_size", "trainer.num_workers", "trainer.compile", "trainer.channels_last",
    "trainer.deterministic", "trainer.on_nonfinite", "trainer.grad_clip",
    "optim.lr", "optim.weight_decay", "ema.decay", "ema.warmup",
)
_MISSING = object()
# Runs saved before optimizers came from timm's factory (no optim.layer_decay key) wrote the hand-built adamw
# and sgd's defaults where the schema now writes null, "the optimizer's own", which for adamw and sgd is
# the same (torch's AdamW betas, timm's Nesterov sgd): a resume across the change is not a change.
PRE_FACTORY_DEFAULTS = {"optim.betas": [0.9, 0.999], "optim.nesterov": True}
# The same release made data.fold nullable ("the task's own split"); gwi runs saved before it wrote
# fold 0, which for every gwi source meant what null means now (files: validate on part 0; synthetic and
# simulated: no folds).
PRE_KFOLD_DEFAULTS = {"data.fold": 0}


def saved_config(config: dict) -> dict:
    """A config as a checkpoint's meta.json holds it, in this schema's terms: a gwi run saved before
    the k-fold release (its schema had no optim.layer_decay) that wrote data.fold 0 meant null
    (PRE_KFOLD_DEFAULTS). Resume and inference both read saved configs through this."""
    if "layer_decay" in config.get("optim", {}) or config.get("task") != "gwi":
        return config
    data = dict(config.get("data", {}))
    for key, value in PRE_KFOLD_DEFAULTS.items():
        name = key.removeprefix("data.")
        if data.get(name) == value:
            data[name] = None
    return {**config, "data": data}


def check_output_dir(output_dir: str) -> Path:
    """`output_dir` as a folder this run can write, created if needed; else a one-line error."""
    path = Path(output_dir)
    absolute = Path(os.path.abspath(path))
    for pseudo in PSEUDO_FILESYSTEMS:
        for candidate in {absolute, path.resolve()}:
            if candidate == pseudo or pseudo in candidate.parents:
                raise ConfigError(f"key 'output_dir': {output_dir!r} is under {pseudo}, a view of the kernel, not a folder for files")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"key 'output_dir': {output_dir!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"key 'output_dir': cannot create {output_dir!r} ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"key 'output_dir': {output_dir!r} is not writable")
    return path


class RunLock:
    """An exclusive POSIX record lock (fcntl.lockf) on `<run_dir>/.lock`. Chosen over flock (and the
    filelock package, which uses flock) because a record lock belongs to the process alone: DataLoader
    workers forked from it do not inherit it, so it is gone the moment a killed run dies. The file
    keeps the holder's pid, host and start time for the message (and is left in place: deleting a lock
    file races with the next run opening it)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.file = None

    def acquire(self) -> None:
        # Closing any descriptor of the file drops this process's record locks on it: a lock this
        # process still holds from an earlier run in the same folder (in-process use) is closed first.
        previous = _HELD.pop(str(self.path.resolve()), None)
        if previous is not None:
            previous.close()
        try:
            file = open(self.path, "a+")
        except OSError as err:
            raise ConfigError(f"key 'output_dir': cannot write in {str(self.path.parent)!r} ({err.strerror})") from None
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt == LOCK_TRIES - 1:
                    holder = read_holder(self.path)
                    file.close()
                    raise UserError(f"output_dir {str(self.path.parent)!r} is in use by another run ({describe(holder)}); "
                                    "wait for it to end, stop it, or choose another output_dir")
                time.sleep(0.1)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        file.flush()
        self.file = _HELD[str(self.path.resolve())] = file

    def release(self) -> None:
        if self.file is not None:
            if _HELD.get(str(self.path.resolve())) is self.file:
                del _HELD[str(self.path.resolve())]
            self.file.close()  # closing releases the lock
            self.file = None


_HELD: dict = {}  # lock path -> the open lock file of this process


def read_holder(lock_path: Path) -> dict:
    try:
        return json.loads(Path(lock_path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "pid unknown"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def lock_holder(run_dir: Path) -> dict | None:
    """The live run holding `run_dir`'s lock (its pid, host, start), or None when no process holds it.
    A folder without a lock file (a run from before locks existed) also gives None."""
    path = Path(run_dir) / LOCK
    try:
        file = open(path)
    except OSError:
        return None
    with file:
        try:
            fcntl.lockf(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return read_holder(path) or {"pid": None}
        fcntl.lockf(file, fcntl.LOCK_UN)
    return None


def has_lock_file(run_dir: Path) -> bool:
    return (Path(run_dir) / LOCK).is_file()


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys: {"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict, new: dict, defaults: dict) -> dict[str, tuple]:
    """Dotted key -> (old value, new value) for every key that differs between two configs. A key the
    old config lacks (added to the schema since) counts only when it is not at its default; a key the
    new schema lacks no longer matters."""
    old, new = flatten(saved_config(old)), flatten(new)
    if "optim.layer_decay" not in old and old.get("optim.name") in ("adamw", "sgd"):
        old |= {key: None for key, value in PRE_FACTORY_DEFAULTS.items() if old.get(key) == value and new.get(key) is None}
    changes = {}
    for key in new:
        before = old.get(key, _MISSING)
        if before is _MISSING:
            if new[key] != defaults.get(key, _MISSING):
                changes[key] = ("(absent)", new[key])
        elif before != new[key]:
            changes[key] = (before, new[key])
    return changes


def run_changing(changes: dict) -> list[str]:
    return [key for key in changes if not any(fnmatch(key, pattern) for pattern in RESUMABLE_CHANGES)]


def holds_a_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_MARKERS)


def move_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's files into `<run_dir>/.previous-<time>/` (the lock and earlier
    `.previous-` folders stay); None when the folder holds no run (other files are left alone)."""
    run_dir = Path(run_dir)
    if not holds_a_run(run_dir):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_dir / f"{PREVIOUS}{stamp}", 1
    while target.exists():
        n += 1
        target = run_dir / f"{PREVIOUS}{stamp}-{n}"
    target.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK and not entry.name.startswith(PREVIOUS):
            os.replace(entry, target / entry.name)
    return target


def drop_records_after(run_dir: Path, step: int) -> dict[str, int]:
    """Rewrite each step-indexed log of the run (`*.jsonl` in the folder: metrics.jsonl, a task's own)
    without the records after `step` (and any line a crash cut short): the resumed run logs them
    again. Returns file name -> records dropped."""
    dropped = {}
    for path in sorted(Path(run_dir).glob("*.jsonl")):
        kept, lost = [], 0
        for line in path.read_text().splitlines():
            record = parse_record(line)  # None: a torn line (or other damage), which every reader skips
            if record is None or (isinstance(record.get("step"), int) and record["step"] > step):
                lost += 1
            else:
                kept.append(line)
        if lost:
            write_text_atomic(path, "".join(line + "\n" for line in kept))
            dropped[path.name] = lost
    return dropped


class RunFolder:
    """The output_dir of one training run: `open` it (every process; the main one does the work and
    the others follow its verdict), read `resume_from`, `record_start` once the run knows it trains,
    `close` at the end."""

    def __init__(self, run_dir: Path, say=print):
        self.dir = Path(run_dir)
        self.say = say
        self.lock: RunLock | None = None
        self.resume_from: Path | None = None
        self.init_from: Path | None = None  # init_from's checkpoint, when this run starts from step 0
        self.resumed_step = 0
        self.resumed_reason = None  # why the checkpoint resumed from was written (epoch, finished, SIGTERM, ...)
        self.changes: dict[str, tuple] = {}

    @classmethod
    def open(cls, accelerator, cfg) -> "RunFolder":
        folder = cls(Path(cfg.output_dir), accelerator.print)
        verdict = [None, None, None, None]  # error kind, message, the checkpoint to resume from, init_from's
        failure = None
        if accelerator.is_main_process:
            try:
                folder._prepare(cfg)
                verdict[2] = str(folder.resume_from) if folder.resume_from else None
                verdict[3] = str(folder.init_from) if folder.init_from else None
            except Exception as err:
                failure = err
                kind = "config" if isinstance(err, ConfigError) else "user" if isinstance(err, UserError) else "failed"
                verdict[:2] = kind, str(err)
                folder.close()
        if accelerator.num_processes > 1:  # every process stops, or none: no collective is left waiting
            # Imported here: `python -m harness.runs` imports this module for the lock and stays light.
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(verdict)
        if failure is not None:
            raise failure
        if verdict[1] is not None:
            raise {"config": ConfigError, "user": UserError}.get(verdict[0], RunFailed)(verdict[1])
        folder.resume_from = Path(verdict[2]) if verdict[2] else None
        folder.init_from = Path(verdict[3]) if verdict[3] else None
        if folder.resume_from is not None:
            folder.resumed_reason = ckpt.read_meta(folder.resume_from).get("reason")
        return folder

    def _prepare(self, cfg) -> None:
        say = self.say
        check_output_dir(cfg.output_dir)
        self.lock = RunLock(self.dir)
        self.lock.acquire()
        ckpt_dir = self.dir / "checkpoints"
        source = None
        if cfg.resume == "auto":
            source, note = ckpt.resumable_last(ckpt_dir)
            if note:
                say(note)
        elif cfg.resume != "never":
            source = Path(cfg.resume)
            if not ckpt.is_complete(source):
                raise ConfigError(f"key 'resume': {cfg.resume!r} is not a complete checkpoint directory (no {ckpt.META})")
            problem = ckpt.damage(source)
            if problem:
                raise UserError(f"key 'resume': cannot resume: {problem}")
        if source is None and cfg.init_from:  # checked before an earlier run is moved aside
            self.init_from = ckpt.resolve_init_from(cfg.init_from)
        elif cfg.init_from:
            say(f"init_from {cfg.init_from} not used: the run resumes from {source}")
        own = source is not None and source.resolve().parent == ckpt_dir.resolve()
        if source is not None:
            meta = ckpt.read_meta(source)
            self.resumed_step = meta["step"]
            self._check_changes(cfg, meta, source, say)
        if not own:
            moved = move_aside(self.dir)
            if moved is not None:
                why = "resume=never" if cfg.resume == "never" else f"resuming {source}" if source else "nothing to resume"
                say(f"{why}: the earlier run in {self.dir} was moved aside to {moved}/; this run starts in an empty folder")
        else:
            dropped = ckpt.recover(ckpt_dir, self.resumed_step)
            dropped += [f"{n} records of {name}" for name, n in drop_records_after(self.dir, self.resumed_step).items()]
            if dropped:
                say(f"resume at step {self.resumed_step}: dropped what was written after it ({', '.join(dropped)}); it is redone")
        self.resume_from = source

    def _check_changes(self, cfg, meta: dict, source: Path, say) -> None:
        if "config" not in meta:
            return
        defaults = flatten(type(cfg)().model_dump(mode="json"))
        self.changes = config_changes(meta["config"], cfg.model_dump(mode="json"), defaults)
        self.changes = {k: v for k, v in self.changes.items() if k not in ("output_dir", "resume")}
        refused = run_changing(self.changes)
        if refused and cfg.resume_changes == "refuse":
            key, (before, after) = refused[0], self.changes[refused[0]]
            also = f" (also changed: {', '.join(refused[1:])})" if refused[1:] else ""
            raise ConfigError(f"key {key!r}: {source} was trained with {before!r}, this config has {after!r}{also}; "
                              "resuming would make one run of two configs: keep the value, choose another output_dir, "
                              "start over with resume=never (the old run is moved aside), or set resume_changes=allow")
        if self.changes:
            say(f"resume: config changed since step {meta['step']}: " + "; ".join(
                f"{key} {before!r} -> {after!r}" for key, (before, after) in self.changes.items()))

    def record_start(self, cfg, trains: bool, is_main: bool) -> None:
        """Keep this start's config in config_history/NNN.yaml and as config.yaml, when it trains (a
        finished run started again with nothing to do leaves both as they were)."""
        if not is_main:
            return
        if not trains:
            self.say(f"nothing to train: the checkpoint at step {self.resumed_step} has done all this config asks for; "
                     "config.yaml is left as it was (raise trainer.epochs to train on)")
            return
        history = self.dir / HISTORY
        history.mkdir(exist_ok=True)
        number = 1 + max([int(p.stem) for p in history.glob("*.yaml") if p.stem.isdigit()] + [0])
        origin = f"resumed from {self.resume_from} at step {self.resumed_step}" if self.resume_from else "started from step 0"
        header = [f"# start {number}, {time.strftime('%Y-%m-%d %H:%M:%S')}: {origin}"]
        header += [f"# changed: {key} {before!r} -> {after!r}" for key, (before, after) in self.changes.items()]
        body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        write_text_atomic(history / f"{number:03d}.yaml", "\n".join(header) + "\n" + body)
        write_text_atomic(self.dir / "config.yaml", body)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
