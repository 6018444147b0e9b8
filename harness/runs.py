"""Compare the runs in an outputs folder: `python -m harness.runs [DIR] [--csv [PATH]]` (DIR default `outputs`).

A run is any folder under DIR with config.yaml and metrics.jsonl (a sweep's trials included, at any
depth). One row per run, best first: status, steps, wall time, the best value of its
`checkpoint.monitor`, and every config key whose value differs between the runs (dotted).

- best: from the best checkpoint's meta.json, else the best value of the monitor in metrics.jsonl.
- steps: the furthest step in metrics.jsonl or in checkpoints/last.
- wall: from the run's first start (the time in the name of its earliest W&B run folder or of its
  first config_history/ entry, else config.yaml's mtime) to the last write of metrics.jsonl; it includes any
  time a stopped run spent waiting to be resumed.
- status: running while a live process holds the run's lock (`.lock`); else from
  checkpoints/last/meta.json's `reason`: finished; stopped (SIGTERM, SIGINT, max_minutes: resumable);
  else crashed (ended without its final save: killed, machine lost, NaN loss; resumable from `last`).
  A run from before locks existed (no `.lock`) counts as running while metrics.jsonl was written in
  the last 15 minutes.

--csv writes the same rows as CSV (raw numbers, wall in seconds) to stdout, or to PATH and the table
to the terminal.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from harness import checkpoint as ckpt
from harness.tracking import read_metrics
from harness.rundir import HISTORY, flatten, has_lock_file, lock_holder

RUNNING_WINDOW_S = 15 * 60
STOPPED_REASONS = ("SIGTERM", "SIGINT", "max_minutes")
WANDB_RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-")
NOT_RUN_FOLDERS = {"checkpoints", "wandb"}  # wandb/ holds config.yaml files of its own


@dataclass
class Run:
    name: str
    config: dict  # dotted key -> value
    status: str
    steps: int
    wall_s: float
    monitor: str | None
    mode: str
    best: float | None = None
    best_step: int | None = None
    differing: dict = field(default_factory=dict)

    def rank(self) -> tuple:
        """Sort key: runs with a best value first, by monitor, best value first."""
        if self.best is None:
            return (1, "", 0.0)
        return (0, self.monitor, self.best if self.mode == "min" else -self.best)


def find_run_dirs(root: Path) -> list[Path]:
    found = []
    for folder, subfolders, files in os.walk(root):
        if "config.yaml" in files and "metrics.jsonl" in files:
            found.append(Path(folder))
            subfolders.clear()  # a run's own folders hold no further runs
            continue
        subfolders[:] = sorted(d for d in subfolders if d not in NOT_RUN_FOLDERS and not d.startswith("."))
    return sorted(found)


def read_run(run_dir: Path, root: Path, now: float) -> Run:
    config = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    rows = read_metrics(run_dir)
    last = ckpt.readable(run_dir / "checkpoints" / "last")
    last_meta = ckpt.read_meta(last) if last else {}
    metrics_written = (run_dir / "metrics.jsonl").stat().st_mtime
    run = Run(
        name=str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        config=config,
        status=run_status(last_meta.get("reason"), now - metrics_written, has_lock_file(run_dir), lock_holder(run_dir) is not None),
        steps=max([row.get("step", 0) for row in rows] + [last_meta.get("step", 0)]),
        wall_s=metrics_written - first_start(run_dir),
        monitor=config.get("checkpoint.monitor"),
        mode=config.get("checkpoint.mode", "min"),
    )
    best_dirs = ckpt.best_dirs(run_dir / "checkpoints")
    if best_dirs:
        meta = ckpt.read_meta(best_dirs[0])
        run.monitor, run.mode, run.best, run.best_step = meta["monitor"], meta["monitor_mode"], meta["monitor_value"], meta["step"]
    else:
        logged = [(row[run.monitor], row["step"]) for row in rows if is_number(row.get(run.monitor))]
        if logged:
            run.best, run.best_step = (min if run.mode == "min" else max)(logged, key=lambda item: item[0])
    return run


def run_status(reason: str | None, since_last_metric_s: float, locked_runs: bool = False, held: bool = False) -> str:
    if held:
        return "running"
    if reason == "finished":
        return "finished"
    if reason in STOPPED_REASONS:
        return f"stopped ({reason})"
    if reason == ckpt.DATA_ERROR_REASON:  # the run stopped on a bad sample and waits for the data to be fixed
        return f"failed ({reason})"
    if locked_runs:  # no live holder: the process is gone
        return "crashed"
    return "running" if since_last_metric_s < RUNNING_WINDOW_S else "crashed"


def first_start(run_dir: Path) -> float:
    """The earliest W&B run folder's start time (W&B names them by local time) or first recorded
    config (config_history/), else config.yaml's mtime."""
    starts = [path.stat().st_mtime for path in sorted((run_dir / HISTORY).glob("*.yaml"))[:1]]
    for folder in (run_dir / "wandb").glob("*run-*"):
        match = WANDB_RUN_FOLDER.match(folder.name)
        if match:
            starts.append(datetime.strptime(match.group(1), "%Y%m%d_%H%M%S").timestamp())
    return min(starts) if starts else (run_dir / "config.yaml").stat().st_mtime


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compare(root: Path) -> list[Run]:
    """The runs under `root`, best first, each with the config values that differ between them."""
    now = time.time()
    runs = [read_run(run_dir, root, now) for run_dir in find_run_dirs(root)]
    keys = sorted({key for run in runs for key in run.config} - {"output_dir"})  # output_dir names the run already
    missing = object()
    differing = [key for key in keys if len({repr(run.config.get(key, missing)) for run in runs}) > 1]
    for run in runs:
        run.differing = {key: run.config.get(key) for key in differing}
    return sorted(runs, key=Run.rank)


def print_table(runs: list[Run], root: Path, console: Console) -> None:
    monitors = {run.monitor for run in runs}
    one_monitor = monitors.pop() if len(monitors) == 1 else None
    plural = "" if len(runs) == 1 else "s"
    table = Table(title=f"{len(runs)} run{plural} in {root}", title_justify="left")
    for header in ("run", "status", "steps", "wall", f"best {one_monitor}" if one_monitor else "best", "at step"):
        table.add_column(header, justify="right" if header in ("steps", "wall", "at step") else "left")
    for key in runs[0].differing:
        table.add_column(key)
    for run in runs:
        best = "-" if run.best is None else f"{run.best:.5g}" if one_monitor else f"{run.monitor} {run.best:.5g}"
        table.add_row(run.name, run.status, str(run.steps), duration(run.wall_s), best,
                      "-" if run.best_step is None else str(run.best_step), *(short(v) for v in run.differing.values()))
    console.print(table)


def write_csv(runs: list[Run], out) -> None:
    writer = csv.writer(out)
    writer.writerow(["run", "status", "steps", "wall_s", "monitor", "mode", "best", "best_step", *runs[0].differing])
    for run in runs:
        writer.writerow([run.name, run.status, run.steps, round(run.wall_s, 1), run.monitor, run.mode, run.best, run.best_step,
                         *(json.dumps(v) if isinstance(v, (list, dict)) else v for v in run.differing.values())])


def short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.runs", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default="outputs", help="folder of runs (default: outputs)")
    parser.add_argument("--csv", nargs="?", const="-", metavar="PATH", help="write CSV to PATH, or to stdout without PATH")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if args.csv not in (None, "-") and Path(args.csv).is_dir():  # `--csv DIR` takes DIR as the CSV's path
        print(f"error: --csv {args.csv!r} is a folder; give the folder of runs first: "
              f"python -m harness.runs {args.csv} --csv [PATH]", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"error: {str(root)!r} is not a folder", file=sys.stderr)
        return 2
    runs = compare(root)
    if not runs:
        print(f"error: no runs under {str(root)!r} (a run is a folder with config.yaml and metrics.jsonl)", file=sys.stderr)
        return 2
    if args.csv == "-":
        write_csv(runs, sys.stdout)
        return 0
    if args.csv:
        with open(args.csv, "w", newline="") as out:
            write_csv(runs, out)
    print_table(runs, root, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
