"""Every bad input a user is likely to give gets a one-line message naming the thing, and its exit
code, never a traceback. CASES is the list; the README's table "Bad input and faults" is generated
from it (`python tests/test_bad_inputs.py` rewrites it) and a test keeps the two equal.

Each case runs the real entry point in this process (train.py's `run_cli`, `infer.main`,
`gwi.convert.main`, `gwi.physics.synth.main`,
`gwi.pseudo.main`) on tiny files made in a temporary folder; `{tmp}` in a
command is that folder, `{run}` a trained gwi smoke run and `{cnn_run}` a cnn run on image files
(shared, read only). To add a case: one
`Case(...)` below (with a `setup` making its files if it needs any), then run this file.
"""
from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from gwi_files import write_test_dir, write_tree  # noqa: E402
from image_files import write_csv, write_csv_layout, write_folder, write_sample_submission, write_test_folder  # noqa: E402

SMOKE = "configs/smoke/gwi.yaml"
QUIET = "log.wandb=disabled log.plot=false log.progress=none data.time_steps=64"
FILES = f"data.source=files data.roots=[{{tmp}}/tree] trainer.batch_size=2 {QUIET} output_dir={{tmp}}/out"


@dataclass(frozen=True)
class Case:
    input: str  # what the user did (the README's first column)
    command: str  # entry point and arguments; {tmp} and {run} are filled in
    message: str  # a fragment of the one error line
    exit_code: int
    setup: Callable[[Path, Path | None], None] | None = None  # (tmp, run): makes the files the command reads, in {tmp}
    env: dict = field(default_factory=dict)

    @property
    def needs_run(self) -> bool:
        return "{run}" in self.command or self.setup is run_without_best_meta

    @property
    def needs_cnn_run(self) -> bool:
        return "{cnn_run}" in self.command


# ---- files the cases read ---------------------------------------------------------------------------


def tree(tmp: Path, run: Path | None) -> None:
    write_tree(tmp / "tree")


def tree_with_nan(tmp: Path, run: Path | None) -> None:  # met at step 3 of the smoke run below
    write_tree(tmp / "tree")
    path = tmp / "tree" / "FlatVel_A" / "data" / "data1.npy"
    array = np.load(path)
    array[1, 0, 0, 0] = np.nan
    np.save(path, array)


def tree_with_truncated_file(tmp: Path, run: Path | None) -> None:
    write_tree(tmp / "tree")
    path = tmp / "tree" / "CurveFault_A" / "seis2_1_0.npy"
    path.write_bytes(path.read_bytes()[:5000])


def tree_with_text_file(tmp: Path, run: Path | None) -> None:
    write_tree(tmp / "tree")
    (tmp / "tree" / "FlatVel_A" / "model" / "model2.npy").write_text("1500,1600\n")


def tree_missing_partner(tmp: Path, run: Path | None) -> None:
    write_tree(tmp / "tree")
    (tmp / "tree" / "CurveFault_A" / "vel2_1_0.npy").unlink()


def kaggle_folder(tmp: Path, run: Path | None) -> None:
    write_test_dir(tmp / "test", ["a1", "b2"])


def kaggle_truncated(tmp: Path, run: Path | None) -> None:
    kaggle_folder(tmp, run)
    path = tmp / "test" / "b2.npy"
    path.write_bytes(path.read_bytes()[:3000])


def kaggle_text(tmp: Path, run: Path | None) -> None:
    kaggle_folder(tmp, run)
    (tmp / "test" / "b2.npy").write_text("id,value\n1,2\n")


def tree_and_kaggle_folder(tmp: Path, run: Path | None) -> None:
    tree(tmp, run)
    kaggle_folder(tmp, run)


def empty_dir(tmp: Path, run: Path | None) -> None:
    (tmp / "empty").mkdir()


def a_file(tmp: Path, run: Path | None) -> None:
    (tmp / "file.txt").write_text("not a folder\n")


def kaggle_and_file(tmp: Path, run: Path | None) -> None:
    kaggle_folder(tmp, run)
    a_file(tmp, run)


def tree_and_file(tmp: Path, run: Path | None) -> None:
    tree(tmp, run)
    a_file(tmp, run)


def run_without_best_meta(tmp: Path, run: Path | None) -> None:
    shutil.copytree(run, tmp / "run")
    (tmp / "run" / "checkpoints" / "best" / "meta.json").unlink()


def image_folder(tmp: Path, run: Path | None) -> None:
    write_folder(tmp / "train", per_class=4)


def image_folder_with_empty_class(tmp: Path, run: Path | None) -> None:
    image_folder(tmp, run)
    for path in (tmp / "train" / "dog").iterdir():
        path.unlink()


def image_folder_with_empty_file(tmp: Path, run: Path | None) -> None:
    image_folder(tmp, run)
    (tmp / "train" / "owl" / "5.png").write_bytes(b"")


def image_folder_with_corrupt_image(tmp: Path, run: Path | None) -> None:  # only decoding finds it: mid-run
    image_folder(tmp, run)
    path = tmp / "train" / "dog" / "4.jpg"
    path.write_bytes(path.read_bytes()[:120])


def train_csv(tmp: Path, run: Path | None) -> None:
    write_csv_layout(tmp / "comp", count=9)


def train_csv_missing_image(tmp: Path, run: Path | None) -> None:
    train_csv(tmp, run)
    (tmp / "comp" / "train" / "img003.png").unlink()


def rewrite_train_csv(tmp: Path, change) -> None:
    path = tmp / "comp" / "train.csv"
    header, *rows = [line.split(",") for line in path.read_text().splitlines()]
    write_csv(path, header, change(rows))


def train_csv_id_twice(tmp: Path, run: Path | None) -> None:
    train_csv(tmp, run)
    rewrite_train_csv(tmp, lambda rows: rows[:6] + [rows[2]] + rows[6:])


def train_csv_empty_label(tmp: Path, run: Path | None) -> None:
    train_csv(tmp, run)
    rewrite_train_csv(tmp, lambda rows: rows[:4] + [[rows[4][0], ""]] + rows[5:])


def unlabelled_images(tmp: Path, run: Path | None) -> None:
    write_test_folder(tmp / "test", count=4)


def images_and_sample(header=("id", "label"), extra_ids=(), twice=False):
    def setup(tmp: Path, run: Path | None) -> None:
        ids, _ = write_test_folder(tmp / "test", count=4)
        ids += list(extra_ids)
        write_sample_submission(tmp / "sample.csv", ids + ids[1:2] if twice else ids, header=header, shuffle_seed=0)
    return setup


def images_one_corrupt(tmp: Path, run: Path | None) -> None:
    unlabelled_images(tmp, run)
    (tmp / "test" / "t02.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")


def images_one_id_twice(tmp: Path, run: Path | None) -> None:
    unlabelled_images(tmp, run)
    shutil.copy(tmp / "test" / "t01.png", tmp / "test" / "t01.jpg")


def folds_run_folder(tmp: Path, run: Path | None) -> None:  # what infer.py recognises a data.fold=all run by
    (tmp / "cv" / "fold_0").mkdir(parents=True)


INFER = "infer.py --checkpoint {run} --num-workers 0"
CNN = "configs/smoke/cnn.yaml data.image_size=16 trainer.batch_size=4 sched.name=cosine " + QUIET.replace(" data.time_steps=64", "")
FOLDER = f"{CNN} data.source=folder data.root={{tmp}}/train output_dir={{tmp}}/out"
CSV = (f"{CNN} data.source=csv data.csv={{tmp}}/comp/train.csv data.images={{tmp}}/comp/train data.id_column=image_id "
       "data.label_column=species output_dir={tmp}/out")
INFER_CNN = "infer.py --checkpoint {cnn_run} --num-workers 0"

CASES = [
    # train.py: config keys and values
    Case("an unknown key", f"train.py {SMOKE} optim.lrr=0.1", "unknown key 'optim.lrr'; nearest valid keys: optim.lr", 2),
    Case("a word for a number", f"train.py {SMOKE} trainer.epochs=three", "key 'trainer.epochs': expected int, got 'three'", 2),
    Case("a boolean for a number", f"train.py {SMOKE} trainer.epochs=true",
         "key 'trainer.epochs': expected a number, got true (a YAML boolean", 2),
    Case("zero epochs", f"train.py {SMOKE} trainer.epochs=0", "key 'trainer.epochs': expected int, got 0", 2),
    Case("a config file that does not exist", "train.py nosuch.yaml", "config file 'nosuch.yaml' not found", 2),
    Case("an optimizer timm does not know", f"train.py {SMOKE} optim.name=adamww",
         "key 'optim.name': unknown optimizer 'adamww'; nearest: adamw", 2),
    Case("an unknown task", f"train.py {SMOKE} task=nosuch", "key 'task': unknown task 'nosuch'; known tasks: cnn, gwi", 2),
    Case("a batch larger than the training set", f"train.py {SMOKE} trainer.batch_size=1000 data.num_train=16 {QUIET} "
         "output_dir={tmp}/out", "key 'trainer.batch_size': 1000 is larger than the training set (16 samples)", 2),
    Case("init_from a folder without checkpoints", f"train.py {SMOKE} {QUIET} init_from={{tmp}} output_dir={{tmp}}/out",
         "key 'init_from': no complete checkpoint (a directory with meta.json) at '{tmp}'", 2),
    Case("a ViT layout with a CNN encoder", f"train.py {SMOKE} model.name=vit_tiled model.encoder=resnet18",
         "key 'model.encoder': vit_tiled takes a timm ViT-family encoder (vit_*, *dinov2*, eva02_*, deit*;", 2),
    Case("an unknown WANDB_MODE", f"train.py {SMOKE} {QUIET} output_dir={{tmp}}/out", "WANDB_MODE='sometimes': expected "
         "online, offline or disabled", 2, env={"WANDB_MODE": "sometimes"}),
    Case("a fold number out of range", f"train.py {SMOKE} data.fold=5 data.folds=5",
         "key 'data.fold': 5 is not in 0..4 (data.folds=5), nor all", 2),
    Case("data.fold with online data", f"train.py {SMOKE} data.source=online data.fold=0",
         "key 'data': data.fold splits a fixed training set and online draws are new every epoch", 2),
    Case("data.fold=all with resume=PATH", f"train.py {SMOKE} data.fold=all resume={{tmp}} {QUIET} output_dir={{tmp}}/out",
         "key 'resume': '{tmp}' names one checkpoint; data.fold=all resumes each fold from its own fold_<k>", 2),
    Case("a data.scale_augment range without 1", f"train.py {SMOKE} data.source=simulated data.scale_augment=[1.1,1.2]",
         "key 'data.scale_augment': [1.1, 1.2] leaves no factor for a map spanning 1500-4500 m/s", 2),
    Case("a data.scale_augment range with lo > hi", f"train.py {SMOKE} data.source=simulated data.scale_augment=[1.2,0.8]",
         "key 'data.scale_augment': [1.2, 0.8] has lo > hi", 2),
    # train.py: training data
    Case("data.source=files without data.roots", f"train.py {SMOKE} data.source=files {QUIET} output_dir={{tmp}}/out",
         "key 'data.roots': data.source=files needs at least one folder of training data", 2),
    Case("a seismic file without its velocity file", f"train.py {SMOKE} {FILES}", "seis2_1_0.npy: no matching velocity file",
         2, tree_missing_partner),
    Case("a truncated .npy under data.roots", f"train.py {SMOKE} {FILES}", "seis2_1_0.npy: not a readable .npy file", 2,
         tree_with_truncated_file),
    Case("a text file named .npy under data.roots", f"train.py {SMOKE} {FILES}", "model2.npy: not a readable .npy file", 2,
         tree_with_text_file),
    Case("a NaN sample under data.roots (met mid-epoch)", f"train.py {SMOKE} {FILES} data.flip=false",
         "data1.npy: sample 1 contains NaN or inf values; the run stopped; saved", 1, tree_with_nan),
    # train.py: image files (data.source=folder / csv)
    Case("data.source=csv without data.csv", f"train.py {CNN} data.source=csv output_dir={{tmp}}/out",
         "key 'data.csv': data.source=csv needs the path of the training CSV", 2),
    Case("an empty class folder", f"train.py {FOLDER}", "{tmp}/train/dog: empty class 'dog': no images", 2,
         image_folder_with_empty_class),
    Case("a class folder not in data.classes (an unknown label)", f"train.py {FOLDER} data.classes=[cat,dog]",
         "{tmp}/train/owl: unknown label 'owl'; the classes are cat, dog", 2, image_folder),
    Case("an empty image file", f"train.py {FOLDER}", "{tmp}/train/owl/5.png: an empty file", 2, image_folder_with_empty_file),
    Case("a corrupt image under data.root (met mid-epoch)", f"train.py {FOLDER} trainer.num_workers=1 trainer.batch_size=2",
         "{tmp}/train/dog/4.jpg: not a readable image", 1, image_folder_with_corrupt_image),
    Case("an image train.csv lists that is missing", f"train.py {CSV}",
         "{tmp}/comp/train/img003.*: missing: no image file for id 'img003' (listed on {tmp}/comp/train.csv line 5", 2, train_csv_missing_image),
    Case("an id listed twice in train.csv", f"train.py {CSV}",
         "{tmp}/comp/train.csv line 8: id 'img002' listed twice (first on line 4)", 2, train_csv_id_twice),
    Case("a label not in data.classes in train.csv", f"train.py {CSV} data.classes=[cat,dog]",
         "{tmp}/comp/train.csv line 4: unknown label 'owl'; the classes are cat, dog", 2, train_csv),
    Case("an empty label in train.csv", f"train.py {CSV}", "{tmp}/comp/train.csv line 6: no label in column 'species'", 2,
         train_csv_empty_label),
    Case("train.csv without the label column", f"train.py {CSV} data.label_column=label",
         "{tmp}/comp/train.csv: no column 'label' (columns: image_id, species); set data.label_column", 2, train_csv),
    # infer.py
    Case("--out is a directory (checked before predicting a folder with a damaged file)",
         INFER + " --data {tmp}/test --out {tmp}", "--out {tmp}: is a directory; give a file path", 2, kaggle_truncated),
    Case("--out inside a file", INFER + " --data {tmp}/test --out {tmp}/file.txt/sub.csv",
         "{tmp}/file.txt is a file, not a folder", 2, kaggle_and_file),
    Case("a truncated .npy in a test folder", INFER + " --data {tmp}/test --out {tmp}/sub.csv",
         "b2.npy: not a readable .npy file", 2, kaggle_truncated),
    Case("a text file named .npy in a test folder", INFER + " --data {tmp}/test --out {tmp}/sub.csv",
         "b2.npy: not a readable .npy file", 2, kaggle_text),
    Case("an empty --data folder", INFER + " --data {tmp}/empty --out {tmp}/sub.csv",
         "--data {tmp}/empty: empty; expected a test folder of <id>.npy files", 2, empty_dir),
    Case("--save-predictions with a test folder", INFER + " --data {tmp}/test --out {tmp}/sub.csv --save-predictions {tmp}/p.npy",
         "--save-predictions: {tmp}/test is a test folder", 2, kaggle_folder),
    Case("--num-workers -1", INFER + " --data {tmp}/test --num-workers -1",
         "argument --num-workers: expected a value >= 0, got -1", 2),
    Case("--batch-size 0", INFER + " --data {tmp}/test --batch-size 0", "argument --batch-size: expected a value >= 1, got 0", 2),
    Case("a physics option without its switch", INFER + " --data {tmp}/test --refine-tv 1",
         "--refine-tv / --refine-lr: they only act with --refine-steps N", 2),
    Case("a sample-submission id without an image", INFER_CNN + " --data {tmp}/test --out {tmp}/s.csv --sample-submission "
         "{tmp}/sample.csv", "{tmp}/test/t09.*: missing: no image file for id 't09'", 2, images_and_sample(extra_ids=["t09"])),
    Case("a sample submission listing an id twice", INFER_CNN + " --data {tmp}/test --out {tmp}/s.csv --sample-submission "
         "{tmp}/sample.csv", "{tmp}/sample.csv line 6: id 't01' listed twice", 2, images_and_sample(twice=True)),
    Case("--probabilities with a one-column sample submission", INFER_CNN + " --data {tmp}/test --out {tmp}/s.csv "
         "--sample-submission {tmp}/sample.csv --probabilities", "--probabilities: --sample-submission {tmp}/sample.csv has "
         "one answer column ('label')", 2, images_and_sample()),
    Case("sample-submission columns that are not the classes", INFER_CNN + " --data {tmp}/test --out {tmp}/s.csv "
         "--sample-submission {tmp}/sample.csv --probabilities", "answer columns cat, cow are neither one label column nor one "
         "per class", 2, images_and_sample(header=("id", "cat", "cow"))),
    Case("a corrupt image in a test folder", INFER_CNN + " --data {tmp}/test --out {tmp}/s.csv",
         "{tmp}/test/t02.jpg: not a readable image", 2, images_one_corrupt),
    Case("a test image id with two files", INFER_CNN + " --data {tmp}/test --out {tmp}/s.csv",
         "--data {tmp}/test: id 't01' has two images (t01.jpg, t01.png)", 2, images_one_id_twice),
    Case("--out with a folder of class folders", INFER_CNN + " --data {tmp}/train --out {tmp}/s.csv",
         "--out: {tmp}/train holds class folders and is scored, not submitted", 2, image_folder),
    Case("a classification option for the seismic task", INFER + " --data {tmp}/test --out {tmp}/s.csv --probabilities",
         "--probabilities: task 'gwi' has no such option", 2, kaggle_folder),
    Case("--checkpoint of a folder without checkpoints", "infer.py --checkpoint {tmp}", "no complete checkpoint", 2),
    Case("--checkpoint of a run whose best/meta.json is missing", "infer.py --checkpoint {tmp}/run",
         "checkpoints/best' is incomplete (no meta.json", 2, run_without_best_meta),
    Case("--checkpoint of a k-fold run without --data", "infer.py --checkpoint {tmp}/cv",
         "--checkpoint {tmp}/cv: a k-fold run (data.fold=all); its cross-validated score is in {tmp}/cv/cv.json", 2,
         folds_run_folder),
    Case("a malformed W&B artifact name", "infer.py --checkpoint wandb:team/model",
         "--checkpoint wandb:team/model: expected wandb:ENTITY/PROJECT/NAME:ALIAS", 2),
    # python -m gwi.convert, python -m gwi.physics.synth
    Case("convert: DST is a file", "gwi.convert {tmp}/tree {tmp}/file.txt", "DST {tmp}/file.txt: exists and is not a folder", 2,
         tree_and_file),
    Case("convert: DST is SRC", "gwi.convert {tmp}/tree {tmp}/tree", "DST {tmp}/tree is SRC", 2, tree),
    Case("synth: an unknown family", "gwi.physics.synth --family Nope --n 4 --out {tmp}/s", "--family 'Nope': unknown", 2),
    Case("pseudo: --out a folder that is not empty", "gwi.pseudo --checkpoint {run} --data {tmp}/test --out {tmp}/tree",
         "--out {tmp}/tree: exists and is not empty", 2, tree_and_kaggle_folder),
    Case("unlabelled data without the physics term", f"train.py {SMOKE} {FILES} data.unlabelled_roots=[{{tmp}}/test]",
         "key 'data.unlabelled_roots': unlabelled samples only train through the physics term", 2, tree_and_kaggle_folder),
]


# ---- running a case ------------------------------------------------------------------------------------


def entry_point(name: str):
    if name == "train.py":
        from harness.cli import run_cli
        from harness.crossval import train

        return lambda argv: run_cli(argv, train, "usage")  # the same call as train.py's
    if name == "infer.py":
        import infer

        return infer.main
    if name == "gwi.convert":
        from gwi.convert import main

        return main
    if name == "gwi.physics.synth":
        from gwi.physics.synth import main

        return main
    if name == "gwi.pseudo":
        from gwi.pseudo import main

        return main
    raise ValueError(f"unknown entry point {name!r}")


def run_case(case: Case, tmp: Path, run: Path | None, capsys, cnn_run: Path | None = None) -> tuple[int, str]:
    if case.setup is not None:
        case.setup(tmp, run)
    name, *argv = shlex.split(case.command.format(tmp=tmp, run=run, cnn_run=cnn_run))
    try:
        code = entry_point(name)(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    return code, capsys.readouterr().err


@pytest.fixture
def smoke_run_if_needed(request):
    case = request.getfixturevalue("case")
    return request.getfixturevalue("gwi_smoke_run") if case.needs_run else None


@pytest.fixture
def cnn_run_if_needed(request):
    case = request.getfixturevalue("case")
    return request.getfixturevalue("cnn_folder_run")[0] if case.needs_cnn_run else None


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", CASES, ids=[c.input for c in CASES])
def test_bad_input_gives_one_line_naming_it(case, tmp_path, smoke_run_if_needed, cnn_run_if_needed, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    code, err = run_case(case, tmp_path, smoke_run_if_needed, capsys, cnn_run_if_needed)
    errors = [line for line in err.splitlines() if line.startswith(("error: ", "run failed: "))]
    assert len(errors) == 1, err
    assert case.message.format(tmp=tmp_path) in errors[0], err
    assert code == case.exit_code, err
    assert "Traceback" not in err, err


# ---- the README's table --------------------------------------------------------------------------------

BLOCK = re.compile(r"(<!-- bad-inputs -->\n).*?(<!-- /bad-inputs -->)", re.S)


def readme_table() -> str:
    lines = [f"{len(CASES)} bad inputs, each run by `tests/test_bad_inputs.py` ({{tmp}}: a folder of test files):", "",
             "| input | message (part) | exit |", "|---|---|---|"]
    lines += [f"| {c.input} | `{c.message}` | {c.exit_code} |" for c in CASES]
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + readme_table() + m.group(2), text)


def test_readme_lists_every_case():
    text = (ROOT / "README.md").read_text()
    assert BLOCK.search(text), "README has no <!-- bad-inputs --> table"
    assert text == render(text), "README's bad-input table is stale: run `python tests/test_bad_inputs.py`"


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text()))
    print(f"updated {readme} ({len(CASES)} cases)")
