"""Where a run's numbers go: `metrics.jsonl`, W&B (through Accelerate's tracker) and the console.

Only the main process writes anything; the other processes get a `Tracker` that does nothing.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import wandb
from wandb.sdk import wandb_setup
from tqdm.auto import tqdm

from harness.errors import ConfigError


def has_wandb_credentials() -> bool:
    """True when wandb could log in without prompting: an API key in the environment or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


CONNECT_TIMEOUT_S = 5
# W&B's own environment switches, as its users set them per machine or per shell; "run" and
# "dryrun" are W&B's older names for online and offline.
WANDB_MODE_NAMES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


def configured_wandb_mode(requested: str) -> str:
    """log.wandb, unless W&B's own variables say otherwise: WANDB_MODE (online/offline/disabled),
    when set, replaces it, and WANDB_DISABLED=true means disabled, as they do for any W&B program."""
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return requested
    if env not in WANDB_MODE_NAMES:
        raise ConfigError(f"WANDB_MODE={env!r}: expected online, offline or disabled (or unset it to use log.wandb)")
    return WANDB_MODE_NAMES[env]


def wandb_server_unreachable() -> tuple[str, str | None]:
    """(the W&B server's URL, why a direct TCP connection to it fails within CONNECT_TIMEOUT_S, or
    None when it opens). wandb's client retries a refused connection with back-off for a minute or
    more; a machine without network should hear so at once. Behind a proxy a direct connection
    proves nothing, so then the answer is None."""
    server = wandb_setup.singleton().settings.base_url
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return server, None
    parts = urlparse(server)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return server, err.strerror or type(err).__name__
    return server, None


def resolve_wandb_mode(requested: str) -> str:
    """The mode W&B starts in: `configured_wandb_mode`, then offline instead of online when there is
    no API key (wandb would prompt, or raise in a non-interactive shell) or the server cannot be
    reached (wandb would retry for 90 s first)."""
    mode = configured_wandb_mode(requested)
    if mode != requested:
        print(f"W&B: {mode} (W&B's environment: WANDB_MODE / WANDB_DISABLED), not log.wandb={requested}", file=sys.stderr)
    if mode == "online" and not has_wandb_credentials():
        print("W&B: no API key found (WANDB_API_KEY or ~/.netrc): logging offline; "
              "sync later with `wandb sync <output_dir>/wandb/offline-run-*`", file=sys.stderr)
        return "offline"
    if mode == "online":
        server, reason = wandb_server_unreachable()
        if reason:
            print(f"W&B: cannot connect to {server} ({reason}): logging offline; "
                  "sync later with `wandb sync <output_dir>/wandb/offline-run-*`", file=sys.stderr)
            return "offline"
    return mode


Started = TypeVar("Started")


def with_offline_fallback(mode: str, start: Callable[[str], Started]) -> Started:
    """`start(mode)`; when an online start fails (the server cannot be reached, a bad key), say so and
    `start("offline")` instead: an unreachable server must not kill a training run or lose an
    analysis. Used by training (`start_wandb`) and cnn.analyze."""
    try:
        return start(mode)
    except Exception as err:
        if mode != "online":
            raise
        print(f"W&B: online start failed ({err}); logging offline instead", file=sys.stderr)
        return start("offline")


def start_wandb(accelerator, cfg, run_dir: Path, run_id: str | None) -> str | None:
    """Start the W&B run on the main process through Accelerate's tracker; returns the run id (kept in
    the checkpoint so a resumed run continues the same W&B run)."""
    mode = resolve_wandb_mode(cfg.log.wandb)
    if mode == "disabled":
        return None
    run_id = choose_run_id(run_id, cfg, say=accelerator.print)
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))

    def init(mode: str):
        accelerator.trackers.clear()  # what a failed online start left behind
        kwargs = dict(
            mode=mode, dir=str(run_dir), name=cfg.log.name or run_dir.name, group=cfg.log.group,
            tags=list(cfg.log.tags), entity=cfg.log.entity, resume="allow" if run_id else None,
            # Under a sweep W&B takes the id from WANDB_RUN_ID itself and warns about any id= given.
            id=None if in_sweep else run_id,
            settings=wandb.Settings(init_timeout=90, silent=True, console="off"),
        )
        accelerator.init_trackers(cfg.log.project, config=cfg.model_dump(mode="json"), init_kwargs={"wandb": kwargs})

    with_offline_fallback(mode, init)
    run = accelerator.get_tracker("wandb", unwrap=True) if accelerator.is_main_process else None
    return getattr(run, "id", None)


def choose_run_id(stored: str | None, cfg, say=print) -> str | None:
    """The W&B run to log to: WANDB_RUN_ID when set (a sweep agent sets it for each trial, and W&B
    itself uses it under a sweep), else the id a resumed checkpoint stored (continue that run), else
    None (W&B makes a new one). Every process computes the same answer from the same inputs."""
    from_env = os.environ.get("WANDB_RUN_ID") or None
    if from_env is None or stored is None or from_env == stored:  # a requeued sweep trial keeps its id
        return from_env or stored
    if os.environ.get("WANDB_SWEEP_ID") and cfg.resume == "auto":
        # The output_dir's checkpoint belongs to another trial: continuing it would train this
        # trial's parameters from that trial's weights (or stop at once if it had finished).
        raise ConfigError(f"W&B sweep trial {from_env}: output_dir {cfg.output_dir!r} holds the checkpoint of run "
                          f"{stored}, another trial; each trial needs its own output_dir")
    say(f"W&B: logging to run {from_env} (WANDB_RUN_ID), not {stored}, the run that wrote the checkpoint")
    return from_env


METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `<run_dir>/metrics.jsonl`, in order: the one reader of the file (run table,
    learning curves, task reports), with one tolerance of bad lines: a line that is not a JSON
    object (`parse_record`) is skipped, wherever it is. At the end it is the torn last line of a run
    killed while writing (a resume removes it before appending: `harness.rundir.drop_records_after`,
    which keeps lines by the same test); in the middle it is damage from outside the harness, and
    only that line is lost. A missing file is a FileNotFoundError."""
    rows = []
    for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines():
        record = parse_record(line)
        if record is not None:
            rows.append(record)
    return rows


def parse_record(line: str) -> dict | None:
    """One line of a run's .jsonl log as its record, or None when it is not a JSON object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class Tracker:
    """metrics.jsonl + W&B + a progress display, all on the main process only."""

    def __init__(self, accelerator, run_dir: Path, total_steps: int, start_step: int, progress: str, log_every: int):
        self.accelerator = accelerator
        self.active = accelerator.is_main_process
        self.log_every = log_every
        self.jsonl = open(run_dir / METRICS_FILE, "a") if self.active else None
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "plain"
        self.progress = progress if self.active else "none"
        self.total_steps = total_steps
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.bar = None
        if self.progress == "bar":
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, values: dict, step: int, epoch: float) -> None:
        if not self.active:
            return
        record = {"step": step, "epoch": round(epoch, 4), **{k: _plain(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.accelerator.log(values, step=step)

    def summary(self, values: dict) -> None:
        if not self.active:
            return
        run = self.accelerator.get_tracker("wandb", unwrap=True) if self._has_wandb() else None
        if run is not None:
            for key, value in values.items():
                run.summary[key] = _plain(value)

    def mark_preempting(self) -> None:
        """Tell W&B this run was stopped from outside, not finished: a sweep requeues such a run
        when the process also exits non-zero (harness.cli does), and the requeued trial resumes."""
        if self.active and self._has_wandb():
            self.accelerator.get_tracker("wandb", unwrap=True).mark_preempting()

    def _has_wandb(self) -> bool:
        return any(t.name == "wandb" for t in self.accelerator.trackers)

    def advance(self, step: int, shown: dict) -> None:
        """Called after every optimizer update with the latest averaged train values."""
        if self.progress == "bar":
            self.bar.update(step - self.bar.n)
            if shown:
                self.bar.set_postfix({k: _short(v) for k, v in shown.items()}, refresh=False)
        elif self.progress == "plain" and shown and (step % self.log_every == 0 or step == self.total_steps):
            done = step - self.start_step
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / max(done, 1) * (self.total_steps - step)
            fields = " ".join(f"{k} {_short(v)}" for k, v in shown.items())
            print(f"step {step}/{self.total_steps} {fields} eta {_clock(eta)}", flush=True)

    def message(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
