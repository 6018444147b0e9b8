"""Command-line glue shared by the entry points: parse CONFIG + overrides, turn user mistakes into a
one-line message and exit code 2 (no traceback), failed runs into exit code 1."""
from __future__ import annotations

import os
import sys

from harness.config import DEFAULT_CONFIG, UserError, dotted_keys, load_config, read_yaml, schema_for
from harness.loop import RunFailed

def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The optional leading CONFIG path, then the overrides."""
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def key_table(task_name: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every config key of a task."""
    rows = []
    for key, field in dotted_keys(schema_for(task_name)).items():
        annotation = field.annotation
        type_name = annotation.__name__ if isinstance(annotation, type) else repr(annotation).replace("typing.", "")
        rows.append((key, type_name, repr(field.default), field.description or ""))
    return rows


def run_cli(argv: list[str], command, usage: str) -> int:
    try:
        if argv and argv[0] in ("-h", "--help"):
            task = read_yaml(argv[1] if len(argv) > 1 else DEFAULT_CONFIG).get("task", "gwi")
            print(usage.strip() + f"\n\nConfig keys for task {task!r} (key, type, default):")
            for key, type_name, default, description in key_table(task):
                print(f"  {key:32s} {type_name:28s} {default:14s} {description}")
            return 0
        config_path, overrides = split_args(argv)
        cfg = load_config(config_path, overrides)
        summary = command(cfg)
    except UserError as err:
        if is_main_rank():
            print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        if is_main_rank():
            print(f"run failed: {err}", file=sys.stderr)
        return 1
    if is_main_rank() and isinstance(summary, dict):
        print("done: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
