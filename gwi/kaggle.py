"""An offline Kaggle submission bundle: a folder to upload as a Kaggle dataset.

    python -m gwi.kaggle bundle --checkpoint RUN_OR_CHECKPOINT [--checkpoint ...] --out DIR
                                [--wheel PACKAGE ...] [--no-dependency-wheels]

DIR receives
  wheels/         this project's wheel, and wheels of the dependencies a Kaggle GPU image lacks or
                  has in an older version (default: timm and segmentation-models-pytorch, at the
                  versions installed here, so the models build exactly as trained)
  checkpoints/    each checkpoint's inference weights and meta.json (its resolved config)
  submission.ipynb
                  installs the wheels offline (`pip install --no-index --find-links`), predicts
                  the test folder with flip TTA and writes /kaggle/working/submission.csv (the paths
                  are parameters in its first cell)
Competition notebooks run without internet, hence wheels rather than `pip install` from PyPI.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

from harness import checkpoint as ckpt
from harness.errors import UserError, print_user_error

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "kagglerig"
DEFAULT_DEPENDENCY_WHEELS = ("timm", "segmentation-models-pytorch")

PARAMETERS = '''# Parameters: where Kaggle mounts things. Change them for a local run.
BUNDLE = "/kaggle/input/{bundle_name}"
TEST_DIR = "/kaggle/input/waveform-inversion/test"
OUT = "/kaggle/working/submission.csv"
PIP_TARGET = None  # None: install into the notebook's environment; a folder: install there instead
TTA = "flip"
BATCH_SIZE = 64
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

PREDICT = '''# Predict the test folder with the bundled checkpoints (averaged) and write the submission.
import json
import harness
from harness.inference import predict_folder
print("harness from", Path(harness.__file__).parent)
checkpoints = sorted(str(p) for p in Path(BUNDLE, "checkpoints").iterdir() if p.is_dir())
print("checkpoints:", checkpoints)
result = predict_folder(checkpoints, TEST_DIR, OUT, TTA, BATCH_SIZE, num_workers=2, save_predictions=None)
print(json.dumps(result, indent=1))
'''


def notebook(bundle_name: str) -> dict:
    """A minimal nbformat-4 notebook: a parameter cell, an install cell, a prediction cell."""
    cells = [PARAMETERS.format(bundle_name=bundle_name), INSTALL, PREDICT]
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


def bundle(checkpoints: list[str], out: Path, dependency_wheels: tuple[str, ...]) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: not empty; give a new folder")
    if not checkpoints:
        raise UserError("--checkpoint: give at least one")
    wheels, kept = out / "wheels", out / "checkpoints"
    wheels.mkdir(parents=True)
    kept.mkdir()
    for number, spec in enumerate(checkpoints):
        try:
            source = ckpt.resolve(spec)
        except FileNotFoundError as err:
            raise UserError(f"--checkpoint {spec}: {err}") from None
        target = kept / f"{number:02d}-{Path(spec).resolve().name}-{source.name}"
        target.mkdir()
        for name in (ckpt.WEIGHTS, ckpt.META):  # inference needs these two; optimizer state stays home
            shutil.copy2(source / name, target / name)
    build_project_wheel(wheels)
    for package in dependency_wheels:
        download_wheel(package, wheels)
    (out / "submission.ipynb").write_text(json.dumps(notebook(out.name), indent=1))
    return {"bundle": str(out), "wheels": sorted(p.name for p in wheels.iterdir()),
            "checkpoints": sorted(p.name for p in kept.iterdir())}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gwi.kaggle", description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("bundle", help="write the offline submission bundle")
    make.add_argument("--checkpoint", action="append", required=True, help="run directory or checkpoint; repeat to ensemble")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--wheel", action="append", default=None, help="dependency to ship as a wheel (repeatable)")
    make.add_argument("--no-dependency-wheels", action="store_true", help="ship only this project's wheel")
    args = parser.parse_args(argv)
    dependencies = () if args.no_dependency_wheels else tuple(args.wheel or DEFAULT_DEPENDENCY_WHEELS)
    try:
        result = bundle(args.checkpoint, args.out, dependencies)
    except UserError as err:
        return print_user_error(err)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
