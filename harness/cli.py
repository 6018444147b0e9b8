"""Command-line glue shared by the entry points: parse CONFIG + overrides, turn user mistakes into a
one-line message and exit code 2 (no traceback), failed runs into exit code 1."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from harness.config import DEFAULT_CONFIG, dotted_keys, load_config, read_yaml, schema_for, type_name
from harness.errors import RUN_FAILED_EXIT, RunFailed, UserError, is_main_process, print_user_error


def sweep_trial_output_dir(cfg) -> None:
    """Under a W&B sweep agent each trial writes to <output_dir>/<W&B run id>: trials that run one
    after another or side by side never resume or overwrite one another, and a requeued trial (same
    id) finds its own checkpoint. Every process of a launch sees the same environment, so all agree."""
    run_id = os.environ.get("WANDB_RUN_ID")
    if os.environ.get("WANDB_SWEEP_ID") and run_id and Path(cfg.output_dir).name != run_id:
        cfg.output_dir = str(Path(cfg.output_dir) / run_id)


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The optional leading CONFIG path, then the overrides."""
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def key_table(task_name: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every config key of a task."""
    rows = []
    for key, field in dotted_keys(schema_for(task_name)).items():
        rows.append((key, type_name(field.annotation), repr(field.default), field.description or ""))
    return rows


def print_help(config_path: str | os.PathLike, usage: str) -> int:
    """The usage text and every config key of the config's task (type, default, meaning)."""
    task = read_yaml(config_path).get("task", "gwi")
    lines = [usage.strip(), "", f"Config keys for task {task!r} (key, type, default):"]
    lines += [f"  {key:30s} {type_text:30s} {default:14s} {description}" for key, type_text, default, description in key_table(task)]
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `train.py --help | head` closed the pipe early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit raises it again
    return 0


def run_cli(argv: list[str], command, usage: str) -> int:
    try:
        if argv and argv[0] in ("-h", "--help"):
            return print_help(argv[1] if len(argv) > 1 else DEFAULT_CONFIG, usage)
        config_path, overrides = split_args(argv)
        cfg = load_config(config_path, overrides)
        sweep_trial_output_dir(cfg)
        summary = command(cfg)
    except UserError as err:
        return print_user_error(err)
    except RunFailed as err:
        if is_main_process():
            print(f"run failed: {err}", file=sys.stderr)
        return RUN_FAILED_EXIT
    if is_main_process() and isinstance(summary, dict):
        print("done: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return preempted_sweep_trial_exit_code(summary)


def preempted_sweep_trial_exit_code(summary) -> int:
    """0, except for a sweep trial stopped by SIGTERM/SIGINT (a machine going away): then 128 + the
    signal's number, the usual code of a signal exit. A sweep requeues a trial marked preempting
    (the loop marks it) only when it exits non-zero; the requeued trial resumes its checkpoint."""
    stopped = summary.get("stopped") if isinstance(summary, dict) else None
    if os.environ.get("WANDB_SWEEP_ID") and stopped in ("SIGTERM", "SIGINT"):
        return 128 + signal.Signals[stopped]
    return 0


def markdown_key_table(task_name: str, sections: tuple[str, ...] | None = None) -> str:
    """The README's table of config keys (`python -m harness.cli TASK [SECTION ...]` prints it)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_text, default, description in key_table(task_name):
        if sections is None or key.split(".")[0] in sections:
            lines.append(f"| `{key}` | {type_text} | `{default}` | {description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_key_table(sys.argv[1] if len(sys.argv) > 1 else "gwi", tuple(sys.argv[2:]) or None))
