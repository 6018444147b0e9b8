"""Checkpoints that survive a crash at any moment.

Layout under `<output_dir>/checkpoints/`:
  last/                 full training state (Accelerate's save_state: model, optimizer, scaler, RNG
                        per process, scheduler, EMA, loop counters) + weights.safetensors + meta.json
  best/                 the best by `checkpoint.monitor`: weights.safetensors + meta.json
  best_step00001234/    the other top-k, same content

Every directory is written to a temporary sibling and renamed into place, and `meta.json` is written
last (with the size of every file), so a directory with `meta.json` is complete and a damaged one is
recognised. A crash between the two renames that replace `last` leaves `.old-last`, which the readers
below fall back to. The top-k is derived from what is on disk (each best's meta holds its score) and
arranged by single renames, so a crash at any point leaves a state the next save or resume finishes.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import re
import shutil
import signal
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from harness.errors import ConfigError, RunFailed, UserError
from harness.files import TEMPORARY_SUFFIX, write_text_atomic

WEIGHTS = "weights.safetensors"  # the weights inference uses: the EMA copy when EMA is on
META = "meta.json"
DATA_ERROR_REASON = "data error"  # meta.json `reason` of a `last` saved because a bad sample stopped the run
BEST_NAME = re.compile(r"^(\.old-)?best(_step\d+)?$")  # best, best_stepN, and `.old-best` from older versions
KILL_AT_ENV = "KAGGLERIG_KILL_AT"
LOW_SPACE_BYTES = 64 << 20  # a failed write with less free space than this was the disk filling up


# ---------------------------------------------------------------------------------------------------
# Fault injection: the tests SIGKILL a run at named points of the save sequence (`KAGGLERIG_KILL_AT=
# point:n` kills the process the n-th time it reaches `point`) to prove every point is resumable.

_points_reached: Counter = Counter()


def fault_point(name: str) -> None:
    wanted = os.environ.get(KILL_AT_ENV)
    if not wanted:
        return
    _points_reached[name] += 1
    point, _, count = wanted.rpartition(":")
    if point == name and _points_reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# One checkpoint directory


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


def write_meta(directory: Path, meta: dict) -> None:
    # Written last and through a temporary file: its presence marks a finished checkpoint, and the
    # sizes it records let a resume tell a truncated or missing file from a good one.
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name not in (META, META + TEMPORARY_SUFFIX)}
    write_text_atomic(directory / META, json.dumps({**meta, "files": files}, indent=1))


def read_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / META).read_text())


def damage(directory: Path) -> str | None:
    """What is wrong with a checkpoint directory (a missing or truncated file, an unreadable meta.json),
    or None when every file is there at the size meta.json recorded."""
    directory = Path(directory)
    try:
        meta = read_meta(directory)
    except FileNotFoundError:
        return f"{directory / META} is missing (the checkpoint was never finished)"
    except (OSError, ValueError) as err:
        return f"{directory / META} is unreadable ({err})"
    for name, size in meta.get("files", {}).items():  # checkpoints from before sizes were recorded: unchecked
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is damaged: {path.stat().st_size} bytes, {size} when it was written"
    return None


def save_weights(module: torch.nn.Module, directory: Path) -> None:
    save_model(module, str(directory / WEIGHTS))  # handles shared (tied) tensors


def weights_problem(directory: Path) -> str | None:
    """Why a checkpoint directory's weights cannot be read (damaged, missing), or None."""
    return damage(directory) or (None if (directory / WEIGHTS).is_file() else f"{directory / WEIGHTS} is missing")


def load_weights(module: torch.nn.Module, checkpoint: str | os.PathLike, label: str = "checkpoint") -> dict:
    """Load `weights.safetensors` of a checkpoint directory (or a run directory: its best) into
    `module`; returns the checkpoint's meta. Weights that do not fit the module (another model or
    size) are a one-line error naming the first tensors that differ; `label` names the source in it."""
    directory = resolve(checkpoint)
    problem = weights_problem(directory)
    if problem:
        raise UserError(f"{label} {str(directory)!r}: {problem}")
    try:
        load_model(module, str(directory / WEIGHTS), strict=True)
    except SafetensorError as err:
        raise UserError(f"{label} {str(directory)!r}: {directory / WEIGHTS} is unreadable ({err})") from None
    except RuntimeError as err:
        raise UserError(f"{label} {str(directory)!r}: its weights do not fit this model: {load_problems(str(err))}") from None
    return read_meta(directory)


def _names(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def load_problems(report: str) -> str:
    """load_state_dict's multi-line report (missing and unexpected names, size mismatches) in one line:
    counts and the first names of each kind."""
    parts = []
    for kind in ("Missing", "Unexpected"):
        line = re.search(rf"{kind} key\(s\) in state_dict: (.*)", report)
        if line:
            names = re.findall(r'"([^"]+)"', line.group(1))
            parts.append(f"{len(names)} {'missing from the file' if kind == 'Missing' else 'not in this model'} ({_names(names)})")
    shapes = re.findall(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from checkpoint, "
                        r"the shape in current model is torch.Size\((\[.*?\])\)", report)
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({_names([f'{k} {a} in the file, {b} here' for k, a, b in shapes], 2)})")
    return "; ".join(parts) or " ".join(report.split())[:300]


def resolve_init_from(path: str | os.PathLike) -> Path:
    """The checkpoint directory the config key `init_from` names (a run folder: its best), checked
    before anything else runs."""
    try:
        directory = resolve(path)
    except FileNotFoundError as err:
        raise ConfigError(f"key 'init_from': {err}") from None
    problem = weights_problem(directory)
    if problem:
        raise ConfigError(f"key 'init_from': {problem}")
    return directory


def load_state(accelerator, directory: Path) -> None:
    """Accelerate's load_state, with a damaged checkpoint or one that does not fit the model (a
    resume_changes=allow resume of another model) as a one-line error naming it."""
    try:
        accelerator.load_state(str(directory))
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        raise UserError(f"cannot resume from {str(directory)!r}: {' '.join(lines[:2])[:300]}") from None


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory, meta.json first: a crash halfway leaves an incomplete directory,
    never one that looks complete with files missing."""
    if not path.exists():
        return
    (path / META).unlink(missing_ok=True)
    shutil.rmtree(path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory into place (two renames; see the module docstring)."""
    old = final.with_name(".old-" + final.name)
    remove_dir(old)  # only a leftover here: restore_last() has put a sole surviving `.old-` back
    if final.exists():
        os.replace(final, old)
        fault_point(f"{final.name}:swapping")
    os.replace(tmp, final)
    fault_point(f"{final.name}:placed")
    remove_dir(old)


def readable(final: Path) -> Path | None:
    """`final` if complete, else the `.old-` copy a crash mid-replace left behind, else None."""
    for candidate in (final, final.with_name(".old-" + final.name)):
        if is_complete(candidate):
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------
# The top-k best checkpoints


def _best_entries(ckpt_dir: Path) -> list[tuple[Path, dict]]:
    """Every complete best checkpoint on disk, one per step (a redone step's older twin is skipped)."""
    by_step = {}
    for path in sorted(Path(ckpt_dir).glob("*best*"), key=lambda p: p.name.startswith(".old-")):
        if path.is_dir() and BEST_NAME.match(path.name) and is_complete(path):
            meta = read_meta(path)
            by_step.setdefault(meta["step"], (path, meta))
    return sorted(by_step.values(), key=lambda item: (_rank_key(item[1]), item[1]["step"]))  # ties: the earlier


def best_dirs(ckpt_dir: Path) -> list[Path]:
    """Complete best checkpoints, best first (the order comes from each meta's score)."""
    return [path for path, _ in _best_entries(ckpt_dir)]


def _rank_key(meta: dict) -> float:
    value = meta["monitor_value"]
    return value if meta["monitor_mode"] == "min" else -value


def best_name(step: int) -> str:
    return f"best_step{step:08d}"


def arrange_best(ckpt_dir: Path, keep_top_k: int | None = None) -> None:
    """Bring the best checkpoints on disk into their canonical form: the top one named `best`, the
    others `best_stepN`, none beyond the top k, no incomplete leftovers. Idempotent, one rename or
    deletion at a time, so it also finishes what a crash interrupted."""
    ckpt_dir = Path(ckpt_dir)
    entries = _best_entries(ckpt_dir)
    kept = entries if keep_top_k is None else entries[:keep_top_k]
    for path, _ in entries[len(kept):]:
        remove_dir(path)
        fault_point("best:pruned")
    kept_paths = {path for path, _ in kept}
    for path in ckpt_dir.glob("*best*"):  # incomplete or superseded twins
        if path.is_dir() and BEST_NAME.match(path.name) and path not in kept_paths:
            remove_dir(path)
    for rank, (path, meta) in sorted(enumerate(kept), key=lambda item: item[0] == 0):  # the top one last
        target = ckpt_dir / ("best" if rank == 0 else best_name(meta["step"]))
        if path != target:
            os.replace(path, target)  # free: `best` was moved to its step name just before, if it was another's
            fault_point("best:arranging")


def restore_last(ckpt_dir: Path) -> None:
    """A crash between the two renames of a `last` swap leaves only `.old-last`: put it back, so the
    next swap (which first clears `.old-last`) never deletes the only good state."""
    last, old = Path(ckpt_dir) / "last", Path(ckpt_dir) / ".old-last"
    if not is_complete(last) and is_complete(old):
        remove_dir(last)
        os.replace(old, last)


def recover(ckpt_dir: Path, step: int) -> list[str]:
    """Before resuming the run of `ckpt_dir` at `step`: finish an interrupted save, and drop the best
    checkpoints written after `step` (a crash between a best save and the `last` save of the same
    step): the resumed run redoes them. Returns the names dropped."""
    ckpt_dir = Path(ckpt_dir)
    restore_last(ckpt_dir)
    leftovers = [".tmp-last", ".tmp-best"] + ([".old-last"] if damage(ckpt_dir / "last") is None else [])
    for leftover in leftovers:
        remove_dir(ckpt_dir / leftover)
    dropped = []
    for path, meta in _best_entries(ckpt_dir):
        if meta["step"] > step:
            remove_dir(path)
            dropped.append(path.name)
    arrange_best(ckpt_dir)
    return dropped


def resumable_last(ckpt_dir: Path) -> tuple[Path | None, str | None]:
    """The `last` state to resume from, and a note when `last` is damaged and the previous copy a
    crash left (`.old-last`) takes its place (the damaged one is kept as `.damaged-last`). A damaged
    state with nothing to fall back to is an error naming the file."""
    restore_last(ckpt_dir)
    last, old = Path(ckpt_dir) / "last", Path(ckpt_dir) / ".old-last"
    if not is_complete(last):
        return None, None
    problem = damage(last)
    if problem is None:
        return last, None
    if is_complete(old) and damage(old) is None:
        damaged = last.with_name(".damaged-last")
        shutil.rmtree(damaged, ignore_errors=True)
        os.replace(last, damaged)
        os.replace(old, last)
        return last, f"note: {problem}; resuming from the previous state instead (the damaged one is kept as {damaged})"
    raise UserError(f"cannot resume: {problem}; restore it, or start over with resume=never "
                    "(the old run is moved aside)")


def resolve(path: str | os.PathLike) -> Path:
    """A user-given checkpoint: a checkpoint directory, or a run directory (-> its best, else last)."""
    path = Path(path)
    if readable(path):
        return readable(path)
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    best = ckpt_dir / "best"
    if best.is_dir() and readable(best) is None:  # never fall back to a worse top-k entry or `last` unasked
        raise FileNotFoundError(f"{str(best)!r} is incomplete (no {META}: damaged, or its save was cut short); "
                                f"give another checkpoint directory, e.g. {str(ckpt_dir / 'last')!r}")
    ranked = best_dirs(ckpt_dir)
    if ranked:
        return ranked[0]
    last = readable(ckpt_dir / "last")
    if last:
        return last
    raise FileNotFoundError(f"no complete checkpoint (a directory with {META}) at {str(path)!r}")


def monitor_error(monitor: str, available) -> ConfigError:
    return ConfigError(f"key 'checkpoint.monitor': {monitor!r} is not an evaluation metric; available: {', '.join(sorted(available))}")


def disk_full(err: BaseException, where: Path) -> bool:
    """Whether a failed write was the disk filling up. torch.save reports it as a RuntimeError with
    no errno, so the free space decides when no ENOSPC is in the exception chain."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    try:
        return shutil.disk_usage(where).free < LOW_SPACE_BYTES
    except OSError:
        return False


class Checkpointer:
    """Writes `last` and the top-k `best` for one run; every process calls the save methods."""

    def __init__(self, accelerator, run_dir: Path, monitor: str, mode: str, keep_top_k: int):
        self.accelerator = accelerator
        self.dir = Path(run_dir) / "checkpoints"
        self.monitor, self.mode, self.keep_top_k = monitor, mode, keep_top_k

    def check_monitor(self, metric_names: list[str] | None, ema: bool) -> None:
        """Stop before the first step when `checkpoint.monitor` is not among the metrics the task
        declares (None: not declared, checked at the first evaluation). The names are as the loop
        logs them: val/<name>, and val_raw/<name> with EMA."""
        if metric_names is None:
            return
        available = [f"val/{name}" for name in metric_names] + ([f"val_raw/{name}" for name in metric_names] if ema else [])
        if self.monitor not in available:
            raise monitor_error(self.monitor, available)

    def save_last(self, weights_module: torch.nn.Module, meta: dict) -> Path:
        acc = self.accelerator
        final = self.dir / "last"
        tmp = self.dir / ".tmp-last"
        with disk_full_is_one_line(tmp, self.dir / "last"):
            if acc.is_main_process:
                remove_dir(tmp)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))  # every process writes its own RNG state into the same directory
            acc.wait_for_everyone()
            if acc.is_main_process:
                fault_point("last:state")
                save_weights(weights_module, tmp)
                write_meta(tmp, meta)
                fault_point("last:written")
                replace_dir(tmp, final)
        acc.wait_for_everyone()
        return final

    def improves(self, value: float) -> bool:
        """Would `value` enter the top-k?"""
        if self.keep_top_k == 0 or not math.isfinite(value):
            return False
        kept = [read_meta(path)["monitor_value"] for path in best_dirs(self.dir)]
        if len(kept) < self.keep_top_k:
            return True
        worst = max(kept) if self.mode == "min" else min(kept)
        return value < worst if self.mode == "min" else value > worst

    def save_best(self, weights_module: torch.nn.Module, value: float, meta: dict) -> bool:
        """Keep this evaluation's weights if they enter the top-k; returns whether they did (on the
        main process; False elsewhere)."""
        # Only the main process reads and writes the directory; the others just wait for it.
        keep = self.accelerator.is_main_process and self.improves(value)
        if keep:
            meta = {**meta, "monitor": self.monitor, "monitor_value": value, "monitor_mode": self.mode}
            tmp = self.dir / ".tmp-best"
            with disk_full_is_one_line(tmp, self.dir / "last"):
                remove_dir(tmp)
                tmp.mkdir(parents=True)
                save_weights(weights_module, tmp)
                write_meta(tmp, meta)
            fault_point("best:written")
            for path, kept in _best_entries(self.dir):
                if kept["step"] == meta["step"]:  # the same step saved again (a resumed run redoing it)
                    remove_dir(path)
            target = self.dir / best_name(meta["step"])
            remove_dir(target)
            os.replace(tmp, target)
            fault_point("best:placed")
            arrange_best(self.dir, self.keep_top_k)
            fault_point("best:done")
        self.accelerator.wait_for_everyone()
        return keep

    def best(self) -> dict | None:
        """The meta of the best checkpoint kept, if any."""
        ranked = best_dirs(self.dir)
        return read_meta(ranked[0]) if ranked else None


@contextlib.contextmanager
def disk_full_is_one_line(tmp: Path, previous: Path):
    """Around a checkpoint write: a full disk stops the run with one line (the temporary directory is
    removed; the previous checkpoint is untouched, as it always is) instead of a page of tracebacks."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        if not disk_full(err, tmp.parent):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {previous} is kept" if is_complete(previous) else "no earlier checkpoint exists"
        raise RunFailed(f"no space left on the device while writing {tmp} ({str(err).strip().splitlines()[0][:200]}): "
                        f"{kept}; free some space and run the same command again to resume") from None
