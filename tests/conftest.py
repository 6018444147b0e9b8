"""Shared test helpers: run the real entry points (subprocess) or the loop in-process on the smoke
configs, and read what a run wrote (metrics.jsonl, checkpoints, the W&B offline log)."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import infer
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from harness.cli import run_cli
from image_files import write_folder
from harness.config import load_config
from harness.crossval import train

ROOT = Path(__file__).resolve().parent.parent
SMOKE_CNN = ROOT / "configs" / "smoke" / "cnn.yaml"
SMOKE_GWI = ROOT / "configs" / "smoke" / "gwi.yaml"


def clean_env(**extra) -> dict:
    """The environment of an entry point run by a test: no launcher or W&B settings inherited, and one
    OpenMP thread (the smoke runs' tensors are tiny; two spinning threads per process on a shared
    2-core machine make a run many times slower)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **extra})
    return env


def run_entry(script: str, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def reset_accelerate_state() -> None:
    """Forget this process's Accelerate state, as Accelerate's own test cases do between tests: it is a
    singleton whose mixed precision cannot change once set, so an in-process run with another
    trainer.mixed_precision than an earlier one needs a fresh one."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_xdist_worker():
    """`make test` runs two pytest-xdist workers on a 2-core machine: a worker's torch ops get one
    thread each, since two workers with two spinning OpenMP threads apiece are slower than one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def train_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """What `python train.py ARGS` does (harness.cli.run_cli with harness.crossval.train), in this
    process, with its exit code and output as run_entry returns them: a subprocess costs seconds of
    imports, so tests use it only where the process itself (signals, exit codes from the shell, the
    environment) is what they check."""
    reset_accelerate_state()
    capsys.readouterr()
    code = run_cli([str(arg) for arg in args], train, "")
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["train.py", *map(str, args)], code, out, err)


def infer_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """What `python infer.py ARGS` does, in this process (see train_here)."""
    reset_accelerate_state()
    capsys.readouterr()
    code = infer.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["infer.py", *map(str, args)], code, out, err)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(nproc: int, script: str, *args: str, timeout: float = 300, module: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch` on CPU processes; module: `script` is a module name (accelerate launch -m).
    Each launch rendezvouses on a free port: two launches on Accelerate's default port at once (two
    pytest-xdist workers) would join each other's process group."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    launcher += (["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(free_port())] if nproc > 1
                 else ["--cpu", "--num_processes", "1"])
    target = ["-m", script] if module else [str(ROOT / script)]
    return subprocess.run([*launcher, *target, *map(str, args)], cwd=ROOT,
                          env=clean_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wandb_records(run_dir: Path):
    """Every record of the W&B offline run in `run_dir`, decoded from its .wandb transaction log with
    wandb's own protobuf schema (a LevelDB-style log: 7-byte file header, 32 KiB blocks, records with a
    7-byte header of crc32, length and type; FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    (log_path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    data = log_path.read_bytes()
    assert data[:4] == b":W&B", f"{log_path} is not a W&B transaction log"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the tail of a block too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_log(run_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, summary) of the W&B offline run in `run_dir`."""
    rows, summary = [], {}
    for record in wandb_records(run_dir):
        kind_name = record.WhichOneof("record_type")
        if kind_name == "history":
            rows.append(_items(record.history.item))
        elif kind_name == "summary":
            summary.update(_items(record.summary.update))
    return rows, summary


def wandb_run(run_dir: Path) -> tuple[dict, dict]:
    """(run, config) of the W&B offline run in `run_dir`: the run record's ids (run_id, sweep_id,
    project, ...) and the config as W&B holds it (the run record's, then later config updates)."""
    run, config = {}, {}
    for record in wandb_records(run_dir):
        kind_name = record.WhichOneof("record_type")
        if kind_name == "run" and not run:
            run = {"run_id": record.run.run_id, "sweep_id": record.run.sweep_id, "project": record.run.project}
            config.update(_items(record.run.config.update))
        elif kind_name == "config":
            config.update(_items(record.config.update))
    return run, config


def wandb_artifacts(run_dir: Path) -> list[dict]:
    """The artifacts the W&B offline run in `run_dir` logged, in order: name, type, aliases, metadata,
    and files {path in the artifact: (size, the staged copy `wandb sync` uploads)}."""
    return [
        {"name": record.artifact.name, "type": record.artifact.type, "aliases": list(record.artifact.aliases),
         "metadata": json.loads(record.artifact.metadata or "{}"),
         "files": {entry.path: (entry.size, entry.local_path) for entry in record.artifact.manifest.contents}}
        for record in wandb_records(run_dir) if record.WhichOneof("record_type") == "artifact"
    ]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared machine two spinning OpenMP
    threads are many times slower than one (use with pytestmark = pytest.mark.usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gwi_smoke_run(tmp_path_factory):
    """A gwi smoke run trained once for the whole session (one epoch); tests only read it."""
    run = tmp_path_factory.mktemp("gwi_run")
    train(load_config(SMOKE_GWI, [f"output_dir={run}", "trainer.epochs=1", "log.wandb=disabled", "data.time_steps=64",
                                  "log.plot=false"]))
    return run


# A cnn run on a tiny folder of class folders (tests/image_files.py): three classes of 8 JPEG/PNG
# images of 16-32 px in four modes, resized to 16 x 16, 12 updates.
CNN_FOLDER_ARGS = ["data.source=folder", "data.image_size=16", "trainer.batch_size=4", "trainer.epochs=3", "optim.lr=0.02",
                   "log.wandb=disabled", "log.plot=false", "log.progress=none"]


@pytest.fixture(scope="session")
def cnn_folder_run(tmp_path_factory):
    """(run directory, its data folder): a cnn run on image files trained once for the session; tests only read it."""
    root = tmp_path_factory.mktemp("cnn_folder")
    write_folder(root / "train", per_class=8)
    train(load_config(SMOKE_CNN, [*CNN_FOLDER_ARGS, f"data.root={root / 'train'}", f"output_dir={root / 'run'}"]))
    return root / "run", root / "train"


@pytest.fixture
def smoke_cnn_args(tmp_path):
    """CLI args for a fast cnn smoke run writing into a fresh temporary output_dir."""
    return [str(SMOKE_CNN), f"output_dir={tmp_path / 'run'}"]
