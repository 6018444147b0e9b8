"""An offline Kaggle submission bundle for any task: a folder to upload as a Kaggle dataset.

    python -m harness.kaggle bundle --checkpoint RUN_OR_CHECKPOINT [--checkpoint ...] --out DIR
                                    [--test-dir PATH] [--infer-args "ARGS"] [--wheel PACKAGE ...]
                                    [--no-dependency-wheels]

DIR receives
  wheels/         this project's wheel, and wheels of the dependencies a Kaggle image lacks or has
                  in another version, at the versions installed here, so the models build exactly as
                  trained: the task's `kaggle_wheels` (gwi: timm and segmentation-models-pytorch;
                  cnn: timm; none with --no-dependency-wheels) and each --wheel
  checkpoints/    each checkpoint's inference weights and meta.json (its resolved config); a k-fold
                  run (data.fold=all) gives one per fold
  infer.py        the project's prediction command
  submission.ipynb
                  installs the wheels offline (`pip install --no-index`), runs infer.py on the test
                  folder with every bundled checkpoint (averaged) and writes
                  /kaggle/working/submission.csv; the paths, the batch size and the infer.py
                  arguments are parameters in its first cell (defaults from the task: its Kaggle
                  test folder and arguments, e.g. gwi's `--tta flip`; --test-dir / --infer-args
                  set them)
Competition notebooks run without internet, hence wheels rather than `pip install` from PyPI.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from harness import checkpoint as ckpt
from harness.errors import ArgumentParser, UserError, print_user_error
from harness.inference import expand_folds
from harness.task import get_task

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "kagglerig"
INFER_SCRIPT = ROOT / "infer.py"

PARAMETERS = '''# Parameters: where Kaggle mounts things. Change them for a local run.
BUNDLE = "/kaggle/input/{bundle_name}"
TEST_DIR = {test_dir!r}  # None: evaluate on the first checkpoint's validation data instead (a check of the bundle)
OUT = "/kaggle/working/submission.csv"
PIP_TARGET = None  # None: install into the notebook's environment; a folder: install there instead
BATCH_SIZE = 64
INFER_ARGS = {infer_args!r}  # more infer.py arguments for the test folder
'''

INSTALL = '''# Offline install from the bundle's wheels (the competition notebook has no internet).
import subprocess, sys
from pathlib import Path
wheels = sorted(str(p) for p in Path(BUNDLE, "wheels").glob("*.whl"))
command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", *wheels]
if PIP_TARGET:
    command += ["--target", PIP_TARGET]
    sys.path.insert(0, PIP_TARGET)
subprocess.check_call(command)
'''

PREDICT = '''# Predict with the bundled checkpoints (averaged) through infer.py, as on the command line.
sys.path.insert(0, BUNDLE)  # the bundle's infer.py (the packages come from the wheels)
import harness
import infer
print("harness from", Path(harness.__file__).parent)
checkpoints = sorted(str(p) for p in Path(BUNDLE, "checkpoints").iterdir() if p.is_dir())
print("checkpoints:", checkpoints)
args = [flag for path in checkpoints for flag in ("--checkpoint", path)] + ["--batch-size", str(BATCH_SIZE)]
if TEST_DIR:
    args += ["--data", TEST_DIR, "--out", OUT, *INFER_ARGS]
code = infer.main(args)
if code:
    raise SystemExit(f"infer.py failed (exit {code}): {' '.join(args)}")
'''


def notebook(bundle_name: str, test_dir: str | None, infer_args: list[str]) -> dict:
    """A minimal nbformat-4 notebook: a parameter cell, an install cell, a prediction cell."""
    cells = [PARAMETERS.format(bundle_name=bundle_name, test_dir=test_dir, infer_args=list(infer_args)), INSTALL, PREDICT]
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "cells": [{"cell_type": "code", "id": f"cell{i}", "metadata": {}, "execution_count": None, "outputs": [],
                   "source": source.splitlines(keepends=True)} for i, source in enumerate(cells)],
    }


def notebook_code(path: Path, **parameters) -> str:
    """The notebook's code cells as one script, with `parameters` assigned right after the parameter
    cell (papermill-style), e.g. to point it at a local test folder; how the tests run it."""
    cells = ["".join(cell["source"]) for cell in json.loads(Path(path).read_text())["cells"] if cell["cell_type"] == "code"]
    overrides = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    return "\n".join([cells[0], overrides, *cells[1:]])


def build_project_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(ROOT)], check=True)
    (wheel,) = out.glob(f"{PROJECT}-*.whl")
    return wheel


def download_wheel(package: str, out: Path) -> None:
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"--wheel {package}: not installed here, so its version is unknown") from None
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                             "--dest", str(out), f"{package}=={version}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"--wheel {package}=={version}: pip could not download its wheel: {result.stderr.strip()[-300:]}")


def copy_checkpoints(specs: list[str], kept: Path) -> str:
    """Copy the inference files of every checkpoint `specs` name (a k-fold run: each fold's best) into
    `kept`, one folder each; returns their task's name."""
    tasks = set()
    paths = expand_folds(specs)
    for number, spec in enumerate(paths):
        try:
            source = ckpt.resolve(spec)
        except FileNotFoundError as err:
            raise UserError(f"--checkpoint {spec}: {err}") from None
        tasks.add(ckpt.read_meta(source)["config"]["task"])
        target = kept / f"{number:02d}-{Path(spec).resolve().name}-{source.name}"
        target.mkdir(parents=True)
        for name in (ckpt.WEIGHTS, ckpt.META):  # inference needs these two; optimizer state stays home
            shutil.copy2(source / name, target / name)
    if len(tasks) > 1:
        raise UserError(f"--checkpoint: these checkpoints belong to different tasks ({', '.join(sorted(tasks))})")
    return tasks.pop()


def bundle(checkpoints: list[str], out: Path, dependency_wheels: tuple[str, ...] | None = None,
           test_dir: str | None = None, infer_args: list[str] | None = None, extra_wheels: tuple[str, ...] = ()) -> dict:
    """Write the bundle (module docstring) into the new folder `out`. None: the task's default (its
    `kaggle_wheels`, `kaggle_test_dir`, `kaggle_infer_args`); `extra_wheels` are shipped as well."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: not empty; give a new folder")
    if not checkpoints:
        raise UserError("--checkpoint: give at least one")
    wheels, kept = out / "wheels", out / "checkpoints"
    wheels.mkdir(parents=True)
    task = get_task(copy_checkpoints(checkpoints, kept))
    build_project_wheel(wheels)
    for package in dict.fromkeys([*(task.kaggle_wheels if dependency_wheels is None else dependency_wheels), *extra_wheels]):
        download_wheel(package, wheels)
    shutil.copy2(INFER_SCRIPT, out / INFER_SCRIPT.name)
    infer_args = list(task.kaggle_infer_args if infer_args is None else infer_args)
    (out / "submission.ipynb").write_text(json.dumps(notebook(out.name, test_dir or task.kaggle_test_dir, infer_args), indent=1))
    return {"bundle": str(out), "task": task.name, "wheels": sorted(p.name for p in wheels.iterdir()),
            "checkpoints": sorted(p.name for p in kept.iterdir())}


def main(argv: list[str], prog: str = "python -m harness.kaggle") -> int:
    parser = ArgumentParser(prog=prog, description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("bundle", help="write the offline submission bundle")
    make.add_argument("--checkpoint", action="append", required=True,
                      help="run directory, checkpoint or k-fold run (all its folds); repeat to ensemble")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--test-dir", help="the notebook's default test folder (default: the task's Kaggle test folder)")
    make.add_argument("--infer-args", help="the notebook's extra infer.py arguments, one string (default: the task's)")
    make.add_argument("--wheel", action="append", default=[], help="one more dependency to ship as a wheel (repeatable)")
    make.add_argument("--no-dependency-wheels", action="store_true", help="ship none of the task's dependency wheels")
    args = parser.parse_args(argv)
    infer_args = shlex.split(args.infer_args) if args.infer_args is not None else None
    try:
        result = bundle(args.checkpoint, args.out, () if args.no_dependency_wheels else None, args.test_dir, infer_args,
                        tuple(args.wheel))
    except UserError as err:
        return print_user_error(err)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
