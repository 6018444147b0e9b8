"""Classification prediction for infer.py --data: a submission CSV for test images, or scores for
labelled ones.

What `--data` is decides what happens:
- a folder of images (`<dir>/<id>.<ext>`) or a CSV of ids (images in data.images, overridable on the
  command line) with --out: the submission. With --sample-submission its header and id order are
  the answer's, and each of its ids must have an image; without, ids are the file names (sorted) or
  the CSV's, under the training CSV's id and label column names (`id,label` otherwise).
- a folder of class folders, or a CSV with the label column(s) and no --out: accuracy, log-loss,
  per class and the confusion matrix; --save-predictions keeps the probabilities (.npy) or one row
  per image (.csv), and beside it `<name>_confusion.png`.

The answer is a class name per image (as training named them), or with --probabilities one column
per class (two classes and one answer column: the second class's probability). A sample with one column per class and multi-label data is answered 0/1 per class (the
probability with --probabilities); a sample with one answer column and multi-label data gets the
space-separated names of the classes at probability >= 0.5. The CSV is written under a temporary
name, read back and checked (header, every id once in order, every value a class name or a number in
[0, 1]) and only then renamed into place.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cnn.data import ImageFiles, albumentations_pipeline, class_names, dataset_spec
from cnn.images import (csv_ids, csv_samples, folder_samples, image_paths, is_image, is_multi_label, label_columns,
                        read_table)
from cnn.plots import confusion_matrix, save_confusion
from harness.errors import UserError
from harness.files import TEMPORARY_SUFFIX

THRESHOLD = 0.5  # multi-label: a class is predicted present at this probability or above
PROBABILITY_DIGITS = 6


def predict_folder(task, model, data: str, out: str | None, *, batch_size: int, num_workers: int, device,
                   save_predictions: str | None = None, sample_submission: str | None = None,
                   probabilities: bool = False) -> dict:
    """The task's folder prediction (see the module's docstring): labelled data is scored, test images
    are answered into `out`. Everything is listed and checked before the first image is decoded."""
    dc = task.cfg.data
    classes = class_names(dc)
    data = Path(data)
    sample = read_sample(Path(sample_submission)) if sample_submission else None
    if data.is_file():
        header, rows = read_table(data, "--data")
        if out is None and has_labels(dc, header):
            if sample is not None:
                raise UserError(f"--sample-submission: {data} has labels and is scored; give --out to write a submission")
            images = Path(dc.images) if dc.images else data.parent
            paths, targets = csv_samples(dc, data, images, classes, every_class=False)
            return score(task, model, paths, targets, classes, batch_size, num_workers, device, save_predictions)
        ids = csv_ids(data, header, rows, dc.id_column)
        folder, listed_in = (Path(dc.images) if dc.images else data.parent), data
    elif data.is_dir():
        top = sorted(path for path in data.iterdir() if path.is_file() and is_image(path.name))
        if not top:
            if not any(data.iterdir()):
                raise UserError(f"--data {data}: empty; expected a test folder of images or a folder of class folders")
            if out is not None:
                raise UserError(f"--out: {data} holds class folders and is scored, not submitted; give a folder of test "
                                "images (<id>.jpg ...) or a CSV of ids to write a submission")
            paths, targets = folder_samples(data, classes, "--data", every_class=False)
            return score(task, model, paths, targets, classes, batch_size, num_workers, device, save_predictions)
        ids = [path.stem for path in top]
        folder, listed_in = data, None
        twice = sorted(file_id for file_id, n in Counter(ids).items() if n > 1)
        if twice:
            raise UserError(f"--data {data}: id {twice[0]!r} has two images ({', '.join(p.name for p in top if p.stem == twice[0])})")
    else:
        raise UserError(f"--data {data}: no such file or folder")
    if out is None:
        raise UserError(f"--out: give the submission CSV path for the test images in {data}")
    if save_predictions:
        raise UserError(f"--save-predictions: {data} has no labels; its predictions are the submission (--out)")
    if sample is not None:
        header, ids, listed_in = sample[0], sample[1], Path(sample_submission)
    else:
        header = [dc.id_column if dc.source == "csv" else "id"] + default_answer(dc, classes, probabilities)
    paths = image_paths(folder, ids, dc.extension, listed_in, "--data") if listed_in else [folder / p.name for p in top]
    fmt, columns = answer_format(header, classes, is_multi_label(dc), probabilities, sample_submission)
    predicted = predict(task, model, paths, classes, batch_size, num_workers, device)
    return write_submission(Path(out), header, ids, fmt, columns, predicted, classes)


# ---- what to answer --------------------------------------------------------------------------------


def read_sample(path: Path) -> tuple[list[str], list[str]]:
    """(header, ids) of a sample submission: the first column holds the ids, each once."""
    header, rows = read_table(path, "--sample-submission")
    if len(header) < 2:
        raise UserError(f"--sample-submission {path}: one column ({header[0]!r}); expected an id column and the answer column(s)")
    return header, csv_ids(path, header, rows, header[0])


def has_labels(dc, header: list[str]) -> bool:
    """Whether a CSV carries the training data's label column(s)."""
    try:
        label_columns(dc, header, Path())
    except UserError:
        return False
    return True


def default_answer(dc, classes: list[str], probabilities: bool) -> list[str]:
    """The answer columns without a sample: one per class for probabilities and multi-label data, else
    the training CSV's label column (`label` for folders)."""
    if probabilities or is_multi_label(dc):
        return list(classes)
    return [dc.label_column if dc.source == "csv" else "label"]


def answer_format(header: list[str], classes: list[str], multi_label: bool, probabilities: bool,
                  sample: str | None) -> tuple[str, list[int]]:
    """("label" | "labels" | "binary" | "probabilities", the class index of each answer column). Two
    classes and one answer column with --probabilities: the probability of the second class (a binary
    competition's "probability of 1 / of the positive class")."""
    answer, where = header[1:], f"--sample-submission {sample}" if sample else "the submission"
    if sorted(answer) == sorted(classes):
        if probabilities:
            return "probabilities", [classes.index(name) for name in answer]
        if multi_label:
            return "binary", [classes.index(name) for name in answer]
        raise UserError(f"{where}: one column per class ({', '.join(answer[:5])}{', ...' if len(answer) > 5 else ''}); "
                        "add --probabilities to write each class's probability")
    if len(answer) == 1 and answer[0] not in classes:
        if probabilities and len(classes) == 2 and not multi_label:
            return "probabilities", [1]
        if probabilities:
            raise UserError(f"--probabilities: {where} has one answer column ({answer[0]!r}), not one per class "
                            "(one column of probabilities needs two classes); drop --probabilities to write class names")
        return ("labels" if multi_label else "label"), []
    missing, unknown = [c for c in classes if c not in answer], [c for c in answer if c not in classes]
    raise UserError(f"{where}: answer columns {', '.join(answer)} are neither one label column nor one per class of the "
                    f"training data (missing classes: {', '.join(missing) or 'none'}; unknown: {', '.join(unknown) or 'none'})")


# ---- predicting ------------------------------------------------------------------------------------


@torch.no_grad()
def predict(task, model, paths: list[Path], classes: list[str], batch_size: int, num_workers: int, device) -> np.ndarray:
    """(N, classes) float32 probabilities of the images at `paths`, decoded and resized as in validation."""
    spec = dataset_spec(task.cfg.data)
    transform = albumentations_pipeline(task.cfg.data, spec.image_size, resize=True, train=False)
    dataset = ImageFiles(paths, None, classes, spec.channels, transform)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    out = np.empty((len(dataset), len(classes)), np.float32)
    for images, index in tqdm(loader, desc="predict", unit="batch", total=len(loader)):
        out[index.numpy()] = task.predict(model, images.to(device, non_blocking=True)).cpu().numpy()
    return out


def answer_cells(fmt: str, columns: list[int], probabilities: np.ndarray, classes: list[str]) -> list[list[str]]:
    """The answer cells of each row, in the header's column order."""
    if fmt == "label":
        return [[classes[k]] for k in probabilities.argmax(1)]
    if fmt == "labels":
        return [[" ".join(classes[k] for k in np.flatnonzero(row >= THRESHOLD))] for row in probabilities]
    chosen = probabilities[:, columns]
    if fmt == "binary":
        return (chosen >= THRESHOLD).astype(int).astype(str).tolist()
    return np.char.mod(f"%.{PROBABILITY_DIGITS}f", chosen.astype(np.float64)).tolist()


def write_submission(out: Path, header: list[str], ids: list[str], fmt: str, columns: list[int],
                     probabilities: np.ndarray, classes: list[str]) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + TEMPORARY_SUFFIX)
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([file_id, *cells] for file_id, cells in zip(ids, answer_cells(fmt, columns, probabilities, classes)))
    validate_submission(tmp, header, ids, fmt, classes)
    os.replace(tmp, out)
    counts = np.bincount(probabilities.argmax(1), minlength=len(classes))
    return {"images": len(ids), "submission": str(out), "format": fmt, "columns": header,
            "predicted": {name: int(n) for name, n in zip(classes, counts)}}


def validate_submission(path: Path, header: list[str], ids: list[str], fmt: str, classes: list[str]) -> None:
    """Raise unless `path` has `header`, one row per id in the order of `ids`, and every answer a class
    name (a space-separated list of them for "labels"), 0 or 1 ("binary"), or a number in [0, 1]."""
    known = set(classes)
    with open(path, newline="") as handle:
        rows = csv.reader(handle)
        found = next(rows, None)
        if found != header:
            raise UserError(f"{path}: header {found}, expected {header}")
        count = 0
        for count, row in enumerate(rows, start=1):
            line = count + 1
            if count > len(ids) or len(row) != len(header):
                raise UserError(f"{path} line {line}: {len(row)} fields or a row too many, expected {len(ids)} rows of {len(header)}")
            if row[0] != ids[count - 1]:
                raise UserError(f"{path} line {line}: id {row[0]!r}, expected {ids[count - 1]!r} (the sample's order)")
            for value in row[1:]:
                if not valid_cell(value, fmt, known):
                    raise UserError(f"{path} line {line}: {value!r} is not a valid {fmt} answer")
    if count != len(ids):
        raise UserError(f"{path}: {count} rows, expected {len(ids)}")


def valid_cell(value: str, fmt: str, known: set[str]) -> bool:
    if fmt == "label":
        return value in known
    if fmt == "labels":
        return all(name in known for name in value.split())
    if fmt == "binary":
        return value in ("0", "1")
    try:
        number = float(value)
    except ValueError:
        return False
    return math.isfinite(number) and 0 <= number <= 1


# ---- scoring labelled images ----------------------------------------------------------------------------


def score(task, model, paths: list[Path], targets, classes: list[str], batch_size: int, num_workers: int, device,
          save_predictions: str | None) -> dict:
    """Accuracy, log-loss and per-class figures of labelled images (and the confusion matrix for one
    label per image); with save_predictions, the predictions and the confusion matrix's picture."""
    probabilities = predict(task, model, paths, classes, batch_size, num_workers, device)
    if isinstance(targets, np.ndarray):
        result = multi_label_scores(probabilities, targets, classes)
    else:
        result = single_label_scores(probabilities, np.asarray(targets), classes)
    if save_predictions:
        save = Path(save_predictions)
        save_rows(save, paths, targets, probabilities, classes)
        result["predictions"] = str(save)
        if "confusion" in result:
            png = save.with_name(save.stem + "_confusion.png")
            matrix = np.asarray(result["confusion"]["matrix"])
            save_confusion(png, matrix, classes, f"accuracy {result['accuracy']:.4f} on {len(paths)} images")
            result["confusion_png"] = str(png)
    return {"images": len(paths), **result}


def single_label_scores(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    predicted = probabilities.argmax(1)
    true_p = probabilities[np.arange(len(labels)), labels]
    matrix = confusion_matrix(torch.from_numpy(labels), torch.from_numpy(predicted), len(classes)).numpy()
    per_class = {}
    for k, name in enumerate(classes):
        images, chosen = int(matrix[k].sum()), int(matrix[:, k].sum())
        if images or chosen:
            per_class[name] = {"images": images, "accuracy": matrix[k, k] / images if images else None,
                               "precision": matrix[k, k] / chosen if chosen else None}
    return {"accuracy": float((predicted == labels).mean()),
            "log_loss": float(-np.log(np.clip(true_p, 1e-15, 1)).mean()),
            "per_class": jsonable(per_class),
            "confusion": {"rows": "true class", "columns": "predicted class", "classes": classes, "matrix": matrix.tolist()}}


def multi_label_scores(probabilities: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict:
    p = np.clip(probabilities.astype(np.float64), 1e-15, 1 - 1e-15)
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    right = (probabilities >= THRESHOLD) == (targets > 0.5)
    per_class = {name: {"positives": int(targets[:, k].sum()), "accuracy": float(right[:, k].mean()),
                        "log_loss": float(bce[:, k].mean())} for k, name in enumerate(classes)}
    return {"accuracy": float(right.mean()), "exact_match": float(right.all(1).mean()), "log_loss": float(bce.mean()),
            "per_class": per_class}


def jsonable(values: dict) -> dict:
    return {name: {key: (float(v) if v is not None and key != "images" else v) for key, v in row.items()}
            for name, row in values.items()}


def save_rows(path: Path, paths: list[Path], targets, probabilities: np.ndarray, classes: list[str]) -> None:
    """The predictions of labelled images: (N, classes) float32 probabilities for a .npy path, else a
    CSV of path, true label(s), predicted label(s) and one probability column per class; written
    under a temporary name and renamed into place once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TEMPORARY_SUFFIX)
    if path.suffix == ".npy":
        with open(tmp, "wb") as handle:
            np.save(handle, probabilities)
    else:
        def names(row) -> str:
            return " ".join(classes[k] for k in np.flatnonzero(row))

        multi = isinstance(targets, np.ndarray)
        truth = [names(row > 0.5) for row in targets] if multi else [classes[k] for k in targets]
        guess = [names(row >= THRESHOLD) for row in probabilities] if multi else [classes[k] for k in probabilities.argmax(1)]
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path", "label", "predicted", *classes])
        cells = np.char.mod(f"%.{PROBABILITY_DIGITS}f", probabilities.astype(np.float64)).tolist()
        writer.writerows([str(p), t, g, *c] for p, t, g, c in zip(paths, truth, guess, cells))
        tmp.write_text(text.getvalue())
    os.replace(tmp, path)
