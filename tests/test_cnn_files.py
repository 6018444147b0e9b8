"""cnn data from image files (data.source=folder / csv) and classification prediction (infer.py
--data): real JPEG and PNG files of different sizes and modes in both Kaggle layouts, a train.csv
with string labels, a multi-label CSV, a sample submission; training through the shared loop,
submissions in the sample's header and id order, validated, and scores of labelled folders."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CNN_FOLDER_ARGS, SMOKE_CNN, infer_here, read_metrics, train_here
from cnn.data import file_datasets
from cnn.images import holdout, read_image
from cnn.predict import validate_submission
from cnn.task import CnnData
from harness import checkpoint as ckpt
from harness.config import load_config
from harness.errors import UserError
from harness.task import get_task
from image_files import (CLASSES, save, write_csv, write_csv_layout, write_folder, write_multi_label, write_sample_submission,
                         write_test_folder)

pytestmark = pytest.mark.usefixtures("one_thread")


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def infer_json(capsys, *args) -> dict:
    done = infer_here(capsys, *args, "--num-workers", "0")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])


# ---- decoding and listing ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
def test_any_mode_reads_as_rgb_or_gray_of_its_own_size(tmp_path, mode, suffix):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (21, 13, 3), dtype=np.uint8)
    path = save(tmp_path / f"x{suffix}", pixels, mode)  # RGBA / P as JPEG become PNG
    rgb, gray = read_image(path, 3), read_image(path, 1)
    assert rgb.shape == (21, 13, 3) and rgb.dtype == np.uint8
    assert gray.shape == (21, 13, 1)
    with Image.open(path) as image:
        expected = np.asarray(image.convert("RGB"), dtype=np.int16)
    # JPEG decoders may round differently by a level or two; PNG / BMP are lossless and must match exactly
    assert np.abs(rgb.astype(np.int16) - expected).max() <= (2 if path.suffix == ".jpg" else 0)


def test_a_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert read_image(tmp_path / "deep.png", 3).min() == 255


def test_folder_source_lists_classes_splits_each_class_and_resizes(tmp_path):
    write_folder(tmp_path / "train", per_class=5)
    dc = CnnData(source="folder", root=str(tmp_path / "train"), image_size=16, val_fraction=0.2)
    assert dc.classes == sorted(CLASSES)  # read from the folder into the config
    train, val = file_datasets(dc, seed=0)
    assert len(train) + len(val) == 15
    assert sorted(val.targets) == [0, 1, 2]  # 20 % of each class of 5: one image each
    assert not set(train.paths) & set(val.paths)
    sizes = set()
    for dataset in (train, val):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
            assert label == dataset.targets[index]
            sizes.add(Image.open(dataset.paths[index]).size)
    assert len(sizes) > 2  # the files had different sizes


def test_holdout_takes_the_fraction_of_each_class_and_keeps_one_to_train():
    targets = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2]
    train, val = holdout(targets, 0.5, seed=1)
    assert sorted(train.tolist() + val.tolist()) == list(range(11))
    assert [targets[i] for i in val] == [0, 1, 1, 1, 1]  # one of 2, four of 8, none of the class of one
    assert holdout(targets, 0.5, seed=1)[1].tolist() == val.tolist() != holdout(targets, 0.5, seed=2)[1].tolist()


def test_val_root_validates_on_its_own_folder(tmp_path):
    write_folder(tmp_path / "train", per_class=3)
    write_folder(tmp_path / "val", per_class=1, seed=5)
    dc = CnnData(source="folder", root=str(tmp_path / "train"), val_root=str(tmp_path / "val"), image_size=16)
    train, val = file_datasets(dc, seed=0)
    assert (len(train), len(val)) == (9, 3)
    assert all(path.startswith(str(tmp_path / "val")) for path in val.paths)


def test_csv_source_reads_string_labels_and_ids_without_extension(tmp_path):
    write_csv_layout(tmp_path, count=12)
    dc = CnnData(source="csv", csv=str(tmp_path / "train.csv"), images=str(tmp_path / "train"), id_column="image_id",
                 label_column="species", image_size=16, channels=1)
    assert dc.classes == sorted(CLASSES)
    train, val = file_datasets(dc, seed=0)
    rows = {row[0]: row[1] for row in read_rows(tmp_path / "train.csv")[1:]}
    for dataset in (train, val):
        for path, label in zip(dataset.paths, dataset.targets):
            assert dc.classes[label] == rows[Path(path).stem]
    image, _ = train[0]
    assert image.shape == (1, 16, 16)


def test_integer_labels_are_ordered_as_numbers(tmp_path):
    write_csv_layout(tmp_path, count=6)
    rows = read_rows(tmp_path / "train.csv")
    write_csv(tmp_path / "numbers.csv", ["image_id", "label"], [[r[0], str([2, 10, 1][i % 3])] for i, r in enumerate(rows[1:])])
    dc = CnnData(source="csv", csv=str(tmp_path / "numbers.csv"), images=str(tmp_path / "train"), id_column="image_id")
    assert dc.classes == ["1", "2", "10"]


# ---- a trained run: predict, validate, score -------------------------------------------------------------


def test_folder_run_keeps_its_class_names_and_logs_each_class(cnn_folder_run):
    run, _ = cnn_folder_run
    meta = ckpt.read_meta(run / "checkpoints" / "best")
    assert meta["config"]["data"]["classes"] == sorted(CLASSES)
    evals = [row for row in read_metrics(run) if "val/acc" in row]
    assert evals and all(f"val/acc_{name}" in evals[-1] for name in CLASSES)
    # the per-class accuracies are the recall of each class: their mean over equal classes is the accuracy
    assert np.mean([evals[-1][f"val/acc_{name}"] for name in CLASSES]) == pytest.approx(evals[-1]["val/acc"])


def test_a_resume_reads_the_same_classes_and_refuses_a_new_one(tmp_path, capsys):
    write_folder(tmp_path / "train", per_class=3)
    args = [SMOKE_CNN, *CNN_FOLDER_ARGS, "sched.name=cosine", f"data.root={tmp_path / 'train'}", f"output_dir={tmp_path / 'run'}"]
    assert train_here(capsys, *args, "trainer.epochs=1").returncode == 0
    resumed = train_here(capsys, *args, "trainer.epochs=2")
    assert resumed.returncode == 0 and "data.classes" not in resumed.stdout + resumed.stderr
    save(tmp_path / "train" / "yak" / "0.png", np.zeros((16, 16, 3), np.uint8), "RGB")
    refused = train_here(capsys, *args, "trainer.epochs=3")
    assert refused.returncode == 2 and "key 'data.classes'" in refused.stderr


def test_submission_follows_the_sample_header_and_order(cnn_folder_run, tmp_path, capsys):
    run, _ = cnn_folder_run
    ids, _ = write_test_folder(tmp_path / "test")
    order = write_sample_submission(tmp_path / "sample.csv", ids, header=("image", "breed"))
    out = tmp_path / "sub" / "submission.csv"
    result = infer_json(capsys, "--checkpoint", run, "--data", tmp_path / "test", "--out", out,
                        "--sample-submission", tmp_path / "sample.csv")
    rows = read_rows(out)
    assert rows[0] == ["image", "breed"]
    assert [r[0] for r in rows[1:]] == order != sorted(order)
    assert {r[1] for r in rows[1:]} <= set(CLASSES)
    assert result["format"] == "label" and sum(result["predicted"].values()) == len(ids)
    assert not (tmp_path / "sub" / "submission.csv.tmp").exists()


def test_probabilities_in_the_sample_column_order_and_hflip_tta(cnn_folder_run, tmp_path, capsys):
    run, _ = cnn_folder_run
    ids, _ = write_test_folder(tmp_path / "test")
    header = ("id", "owl", "cat", "dog")
    write_sample_submission(tmp_path / "sample.csv", ids, header=header)
    plain, flipped = tmp_path / "plain.csv", tmp_path / "tta.csv"
    base = ["--checkpoint", run, "--data", tmp_path / "test", "--sample-submission", tmp_path / "sample.csv", "--probabilities"]
    infer_json(capsys, *base, "--out", plain)
    infer_json(capsys, *base, "--out", flipped, "--tta", "hflip")
    p, q = (np.array([r[1:] for r in read_rows(path)[1:]], dtype=float) for path in (plain, flipped))
    assert read_rows(plain)[0] == list(header)
    assert np.allclose(p.sum(1), 1, atol=1e-4) and ((0 <= p) & (p <= 1)).all()
    assert not np.allclose(p, q)  # the mirrored images were predicted too
    # the same probabilities as the task's own prediction, in the sample's column order
    task_cfg = load_config(SMOKE_CNN, [*CNN_FOLDER_ARGS, f"data.root={cnn_folder_run[1]}"])
    task = get_task("cnn", task_cfg)
    model = task.build_model(task_cfg, from_checkpoint=True)
    ckpt.load_weights(model, run / "checkpoints" / "best")
    sample_rows = read_rows(tmp_path / "sample.csv")[1:]
    first = next(Path(tmp_path / "test").glob(f"{sample_rows[0][0]}.*"))
    _, val = file_datasets(task_cfg.data, 0)
    image = torch.from_numpy(val.transform(image=read_image(first, 3))["image"]).permute(2, 0, 1).float()[None] / 255
    expected = task.predict(model.eval(), image)[0].detach().numpy()
    assert p[0] == pytest.approx(expected[[CLASSES.index(c) for c in header[1:]]], abs=2e-6)


def test_two_classes_and_one_probability_column_answer_the_second_class(tmp_path, capsys):
    write_folder(tmp_path / "train", per_class=4)
    for owl in (tmp_path / "train" / "owl").iterdir():
        owl.unlink()
    (tmp_path / "train" / "owl").rmdir()
    done = train_here(capsys, SMOKE_CNN, *CNN_FOLDER_ARGS, "trainer.epochs=1", "sched.name=cosine",
                      f"data.root={tmp_path / 'train'}", f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    ids, _ = write_test_folder(tmp_path / "test", count=4)
    write_sample_submission(tmp_path / "sample.csv", ids, header=("id", "is_dog"))
    base = ["--checkpoint", tmp_path / "run", "--data", tmp_path / "test", "--sample-submission", tmp_path / "sample.csv"]
    infer_json(capsys, *base, "--out", tmp_path / "p.csv", "--probabilities")
    write_sample_submission(tmp_path / "both.csv", ids, header=("id", "cat", "dog"))
    infer_json(capsys, *base[:-1], tmp_path / "both.csv", "--out", tmp_path / "both_p.csv", "--probabilities")
    one = {r[0]: float(r[1]) for r in read_rows(tmp_path / "p.csv")[1:]}
    both = {r[0]: float(r[2]) for r in read_rows(tmp_path / "both_p.csv")[1:]}
    assert read_rows(tmp_path / "p.csv")[0] == ["id", "is_dog"] and one == pytest.approx(both, abs=1e-6)


def test_a_labelled_folder_is_scored_with_its_confusion_matrix(cnn_folder_run, tmp_path, capsys):
    run, data = cnn_folder_run
    saved = tmp_path / "oof.csv"
    result = infer_json(capsys, "--checkpoint", run, "--data", data, "--save-predictions", saved)
    rows = read_rows(saved)
    assert rows[0] == ["path", "label", "predicted", *sorted(CLASSES)] and len(rows) - 1 == result["images"] == 24
    probabilities = np.array([r[3:] for r in rows[1:]], dtype=float)
    truth = [sorted(CLASSES).index(r[1]) for r in rows[1:]]
    assert result["accuracy"] == pytest.approx(np.mean(probabilities.argmax(1) == truth))
    assert result["log_loss"] == pytest.approx(-np.log(probabilities[np.arange(24), truth]).mean(), abs=1e-4)
    matrix = np.array(result["confusion"]["matrix"])
    assert matrix.sum() == 24 and matrix.sum(1).tolist() == [8, 8, 8]
    assert np.trace(matrix) / 24 == pytest.approx(result["accuracy"])
    assert result["per_class"]["cat"]["images"] == 8
    png = Path(result["confusion_png"])
    assert png == tmp_path / "oof_confusion.png" and Image.open(png).size[0] > 100
    npy = tmp_path / "oof.npy"
    infer_json(capsys, "--checkpoint", run, "--data", data, "--save-predictions", npy)
    assert np.load(npy) == pytest.approx(probabilities, abs=1e-6)


def test_validation_refuses_a_broken_submission(tmp_path):
    header, ids = ["id", "label"], ["a", "b"]
    cases = {
        "missing": ("id,label\na,cat\n", "1 rows, expected 2"),
        "order": ("id,label\nb,cat\na,cat\n", "id 'b', expected 'a'"),
        "twice": ("id,label\na,cat\na,cat\n", "id 'a', expected 'b'"),
        "label": ("id,label\na,cat\nb,horse\n", "'horse' is not a valid label answer"),
        "header": ("image,label\na,cat\nb,cat\n", "header"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / f"{name}.csv").write_text(text)
        with pytest.raises(UserError, match=message):
            validate_submission(tmp_path / f"{name}.csv", header, ids, "label", list(CLASSES))
    (tmp_path / "p.csv").write_text("id,cat,dog,owl\na,0.5,0.5,0\nb,1.2,0,0\n")
    with pytest.raises(UserError, match="'1.2' is not a valid probabilities answer"):
        validate_submission(tmp_path / "p.csv", ["id", *CLASSES], ids, "probabilities", list(CLASSES))


def test_a_corrupt_image_met_mid_run_saves_and_names_it(tmp_path, capsys):
    write_folder(tmp_path / "train", per_class=4)
    bad = tmp_path / "train" / "dog" / "4.jpg"
    bad.write_bytes(bad.read_bytes()[:120])  # a cut JPEG: listed like any other, found only by decoding it
    done = train_here(capsys, SMOKE_CNN, *CNN_FOLDER_ARGS, "trainer.batch_size=2", "trainer.num_workers=1", "sched.name=cosine",
                      f"data.root={tmp_path / 'train'}", f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("run failed: ")]
    assert f"{bad}: not a readable image" in line and "the run stopped; saved" in line
    assert ckpt.read_meta(tmp_path / "run" / "checkpoints" / "last")["reason"] == ckpt.DATA_ERROR_REASON


# ---- train.csv layouts ----------------------------------------------------------------------------------


def test_train_csv_with_string_labels_trains_and_predicts_a_csv_of_ids(tmp_path, capsys):
    write_csv_layout(tmp_path / "comp", count=12)
    args = [SMOKE_CNN, *CNN_FOLDER_ARGS, "trainer.epochs=1", "sched.name=cosine", "data.source=csv", f"data.csv={tmp_path / 'comp' / 'train.csv'}",
            f"data.images={tmp_path / 'comp' / 'train'}", "data.id_column=image_id", "data.label_column=species",
            "data.extension=.png", "data.channels=1",
            "data.augment=[random_resized_crop,hflip,vflip,rotate90,color_jitter]", f"output_dir={tmp_path / 'run'}"]
    done = train_here(capsys, *args)
    assert done.returncode == 0, done.stderr
    # a test.csv of ids whose images lie in another folder (data.images changed on the command line)
    ids, _ = write_test_folder(tmp_path / "comp" / "test")
    write_csv(tmp_path / "comp" / "test.csv", ["image_id"], [[i] for i in ids])
    out = tmp_path / "submission.csv"
    result = infer_json(capsys, "--checkpoint", tmp_path / "run", "--data", tmp_path / "comp" / "test.csv", "--out", out,
                        f"data.images={tmp_path / 'comp' / 'test'}", "data.extension=null")
    rows = read_rows(out)
    assert rows[0] == ["image_id", "species"] and [r[0] for r in rows[1:]] == ids
    assert result["images"] == len(ids)


def test_multi_label_csv_trains_with_bce_and_answers_per_class(tmp_path, capsys):
    write_multi_label(tmp_path, count=12)
    args = [SMOKE_CNN, *CNN_FOLDER_ARGS, "trainer.epochs=1", "sched.name=cosine", "data.source=csv", f"data.csv={tmp_path / 'multi.csv'}",
            "data.label_column=null", f"data.images={tmp_path / 'multi'}", f"output_dir={tmp_path / 'run'}"]
    done = train_here(capsys, *args)
    assert done.returncode == 0, done.stderr
    last = [row for row in read_metrics(tmp_path / "run") if "val/loss" in row][-1]
    assert set(f"val/acc_{c}" for c in CLASSES) <= set(last)
    assert 0.3 < last["val/loss"] < 1.0  # a binary cross-entropy per class near log 2, not a 3-way cross-entropy
    ids, _ = write_test_folder(tmp_path / "test", count=4)
    binary, probabilities = tmp_path / "b.csv", tmp_path / "p.csv"
    infer_json(capsys, "--checkpoint", tmp_path / "run", "--data", tmp_path / "test", "--out", binary)
    infer_json(capsys, "--checkpoint", tmp_path / "run", "--data", tmp_path / "test", "--out", probabilities, "--probabilities")
    assert read_rows(binary)[0] == ["id", *CLASSES] and {v for r in read_rows(binary)[1:] for v in r[1:]} <= {"0", "1"}
    p = np.array([r[1:] for r in read_rows(probabilities)[1:]], dtype=float)
    assert ((p >= 0.5).astype(int).astype(str) == np.array([r[1:] for r in read_rows(binary)[1:]])).all()
    # a labelled multi-label CSV is scored per class
    scored = infer_json(capsys, "--checkpoint", tmp_path / "run", "--data", tmp_path / "multi.csv")
    assert set(scored["per_class"]) == set(CLASSES) and [scored["per_class"][c]["positives"] for c in CLASSES] == [4, 8, 4]
    # one answer column: the names of the classes present, space-separated
    write_sample_submission(tmp_path / "sample.csv", ids, header=("id", "tags"))
    tags = tmp_path / "t.csv"
    infer_json(capsys, "--checkpoint", tmp_path / "run", "--data", tmp_path / "test", "--out", tags,
               "--sample-submission", tmp_path / "sample.csv")
    assert all(set(r[1].split()) <= set(CLASSES) for r in read_rows(tags)[1:])


def test_the_folder_recipes_train_on_tiny_data(tmp_path, capsys):
    write_folder(tmp_path / "train", per_class=3)
    for recipe, extra in (("folder_resnet", ["model.width=8"]), ("folder_timm", ["model.name=timm:resnet10t"])):
        done = train_here(capsys, f"configs/cnn/{recipe}.yaml", f"data.root={tmp_path / 'train'}", "data.image_size=32",
                          "trainer.max_steps=5", "trainer.batch_size=4", "trainer.eval_batch_size=4", "trainer.num_workers=0",
                          "trainer.mixed_precision=no", "log.wandb=disabled", "log.plot=false", "log.progress=none",
                          "sched.warmup_steps=0", f"output_dir={tmp_path / recipe}", *extra)
        assert done.returncode == 0, done.stderr
        assert ckpt.read_meta(tmp_path / recipe / "checkpoints" / "best")["config"]["data"]["classes"] == sorted(CLASSES)
