"""Checkpoints that survive a crash at any moment.

Layout under `<output_dir>/checkpoints/`:
  last/                 full training state (Accelerate's save_state: model, optimizer, scaler, RNG
                        per process, scheduler, EMA, loop counters) + weights.safetensors + meta.json
  best/                 the best by `checkpoint.monitor`: weights.safetensors + meta.json
  best_step00001234/    the other top-k, same content

Every directory is written to a temporary sibling and renamed into place, and `meta.json` is written
last, so a directory with `meta.json` is complete. A crash between the two renames that replace an
existing directory leaves `.old-<name>`, which the readers below fall back to.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

WEIGHTS = "weights.safetensors"  # the weights inference uses: the EMA copy when EMA is on
META = "meta.json"


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


def write_meta(directory: Path, meta: dict) -> None:
    # Written last and through a temporary file: its presence marks a finished checkpoint.
    tmp = directory / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, directory / META)


def read_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / META).read_text())


def save_weights(module: torch.nn.Module, directory: Path) -> None:
    save_model(module, str(directory / WEIGHTS))  # handles shared (tied) tensors


def load_weights(module: torch.nn.Module, checkpoint: str | os.PathLike) -> dict:
    """Load `weights.safetensors` of a checkpoint directory (or a run directory: its best) into
    `module`; returns the checkpoint's meta."""
    directory = resolve(checkpoint)
    missing, unexpected = load_model(module, str(directory / WEIGHTS), strict=True)
    return read_meta(directory)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory into place (two renames; see the module docstring)."""
    old = final.with_name(".old-" + final.name)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def readable(final: Path) -> Path | None:
    """`final` if complete, else the `.old-` copy a crash mid-replace left behind, else None."""
    for candidate in (final, final.with_name(".old-" + final.name)):
        if is_complete(candidate):
            return candidate
    return None


def best_dirs(ckpt_dir: Path) -> list[Path]:
    """Complete best checkpoints, best first (the order comes from each meta's score)."""
    found = {}
    for path in Path(ckpt_dir).glob("*best*"):
        if path.is_dir() and not path.name.startswith(".tmp") and is_complete(path):
            meta = read_meta(path)
            found.setdefault(meta["step"], (path, meta))  # an `.old-` twin of the same step is redundant
    ranked = sorted(found.values(), key=lambda item: _rank_key(item[1]))
    return [path for path, _ in ranked]


def _rank_key(meta: dict) -> float:
    value = meta["monitor_value"]
    return value if meta["monitor_mode"] == "min" else -value


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


class Checkpointer:
    """Writes `last` and the top-k `best` for one run; every process calls the save methods."""

    def __init__(self, accelerator, run_dir: Path, monitor: str, mode: str, keep_top_k: int):
        self.accelerator = accelerator
        self.dir = Path(run_dir) / "checkpoints"
        self.monitor, self.mode, self.keep_top_k = monitor, mode, keep_top_k

    def save_last(self, weights_module: torch.nn.Module, meta: dict) -> Path:
        acc = self.accelerator
        final = self.dir / "last"
        tmp = self.dir / ".tmp-last"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every process writes its own RNG state into the same directory
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_weights(weights_module, tmp)
            write_meta(tmp, meta)
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
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_weights(weights_module, tmp)
            write_meta(tmp, meta)
            ranked = best_dirs(self.dir)
            new_is_top = not ranked or _rank_key(meta) < _rank_key(read_meta(ranked[0]))
            if new_is_top:
                current = self.dir / "best"
                if is_complete(current):  # the dethroned best keeps its place in the top-k under its step
                    os.replace(current, self.dir / f"best_step{read_meta(current)['step']:08d}")
                replace_dir(tmp, current)
            else:
                replace_dir(tmp, self.dir / f"best_step{meta['step']:08d}")
            for stale in best_dirs(self.dir)[self.keep_top_k :]:
                shutil.rmtree(stale)
        self.accelerator.wait_for_everyone()
        return keep

    def best(self) -> dict | None:
        """The meta of the best checkpoint kept, if any."""
        ranked = best_dirs(self.dir)
        return read_meta(ranked[0]) if ranked else None

    def resume_dir(self) -> Path | None:
        return readable(self.dir / "last")
