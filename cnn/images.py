"""Classification data from image files: a folder of class folders (`<root>/<class>/*.jpg`,
torchvision's ImageFolder layout) or a Kaggle `train.csv` (an id column and a label column, or one
0/1 column per class for multi-label) with the images at `<images>/<id><extension>`.

Everything that can be checked without decoding an image is checked when the data is listed, before
training starts, and stops with one line naming the file or the CSV line: a missing image, an empty
file, an id listed twice, an unknown label, an empty class. Images are decoded in the DataLoader's
workers (torchvision's decoder for JPEG, PNG and WebP, PIL for the rest), converted to RGB (grayscale,
palette and RGBA alike) or to grayscale, and resized by the dataset's albumentations pipeline; an image
that cannot be decoded is a UserError naming it, which the loop turns into a saved, named stop.

The datasets themselves are cnn.data.ImageFiles.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import to_dtype

from harness.errors import ConfigError, UserError

FILE_SOURCES = ("folder", "csv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # what torchvision.io.decode_image reads; PIL reads the rest
# Pretrained backbones expect ImageNet-normalised inputs; grayscale uses the mean of the three channels.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)
MULTI_LABEL_TRUE, MULTI_LABEL_FALSE = ("1", "1.0", "true", "True"), ("0", "0.0", "false", "False", "")
_DECODER_PREFIX = re.compile(r"^[^,]+, \S+\.cpp:\d+, ")  # torchvision's "decode_jpeg, /path/decode_jpeg.cpp:171, " prefix


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_multi_label(dc) -> bool:
    """A CSV with one 0/1 column per class: data.label_column null (every column but the id) or a list."""
    return dc.source == "csv" and not isinstance(dc.label_column, str)


# ---- decoding ----------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike, channels: int) -> np.ndarray:
    """The image at `path` as (H, W, channels) uint8: RGB for 3 channels (grayscale and palette images
    expanded, an alpha channel dropped), luminance for 1; 16-bit images scaled to 8 bits."""
    path = str(path)
    try:
        if os.path.splitext(path)[1].lower() in TORCHVISION_EXTENSIONS:
            image = decode_image(read_file(path), mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)
            if image.dtype != torch.uint8:
                image = to_dtype(image, torch.uint8, scale=True)
            return image.permute(1, 2, 0).numpy()
        with Image.open(path) as opened:
            pixels = np.asarray(opened.convert("RGB" if channels == 3 else "L"))
        return pixels if pixels.ndim == 3 else pixels[..., None]
    except FileNotFoundError:
        raise UserError(f"{path}: missing (the image was there when the data was listed)") from None
    except (RuntimeError, OSError, ValueError, Image.DecompressionBombError) as err:
        reason = _DECODER_PREFIX.sub("", str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise UserError(f"{path}: not a readable image ({reason})") from None


# ---- listing a folder of class folders ---------------------------------------------------------------


def class_folders(root: Path, flag: str = "data.root") -> list[str]:
    """The class folder names under `root`, sorted (torchvision's ImageFolder order)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: not a folder")
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise UserError(f"{flag} {root}: no class folders; expected <root>/<class>/<image> (e.g. {root}/cat/1.jpg)")
    return names


def images_under(folder: Path) -> list[Path]:
    """Image files under `folder`, at any depth (as ImageFolder finds them), sorted; other files are skipped."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / name for name in files if is_image(name) and not name.startswith(".")]
    return sorted(found)


def check_not_empty(path: Path, where: str = "") -> None:
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: an empty file{where}")


def folder_samples(root: Path, classes: list[str], flag: str = "data.root", every_class: bool = True):
    """(paths, integer labels) of a folder of class folders. A class folder not in `classes` is an
    unknown label; with `every_class` (training) each class must have a folder with images in it."""
    root = Path(root)
    found = class_folders(root, flag)
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise UserError(f"{root / unknown[0]}: unknown label {unknown[0]!r}; the classes are {_list(classes)}")
    paths, targets = [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = images_under(folder) if folder.is_dir() else []
        if not files and (every_class or folder.is_dir()):
            raise UserError(f"{folder}: empty class {name!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
        for path in files:
            check_not_empty(path)
        paths += files
        targets += [label] * len(files)
    return paths, targets


# ---- listing a train.csv ---------------------------------------------------------------------------


def read_table(path: Path, flag: str = "data.csv") -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV file (a UTF-8 byte-order mark is ignored); the first data row is line 2."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows or not rows[0]:
        raise UserError(f"{flag} {path}: empty; expected a header line (e.g. id,label) and one line per image")
    return [name.strip() for name in rows[0]], rows[1:]


def column(header: list[str], name: str, path: Path, hint: str = "") -> int:
    if name not in header:
        raise UserError(f"{path}: no column {name!r} (columns: {', '.join(header)}){hint}")
    return header.index(name)


def label_columns(dc, header: list[str], path: Path) -> list[str]:
    """The label column(s) of a CSV: [data.label_column], or for multi-label the listed columns / every
    column but the id."""
    if isinstance(dc.label_column, str):
        column(header, dc.label_column, path, "; set data.label_column to the label column, or to null for one "
                                               "0/1 column per class (multi-label)")
        return [dc.label_column]
    if dc.label_column is None:
        names = [name for name in header if name != dc.id_column]
        if not names:
            raise UserError(f"{path}: no class columns besides the id column {dc.id_column!r}")
        return names
    for name in dc.label_column:
        column(header, name, path)
    return list(dc.label_column)


def sort_labels(labels) -> list[str]:
    """Class names in label order: numerically when every one is an integer (2 before 10), else sorted."""
    labels = set(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def csv_classes(dc) -> list[str]:
    """The classes of data.csv: the sorted distinct labels, or the multi-label columns in file order."""
    path = Path(dc.csv)
    header, rows = read_table(path)
    names = label_columns(dc, header, path)
    if is_multi_label(dc):
        return names
    index = header.index(names[0])
    return sort_labels(row[index].strip() for row in rows if len(row) > index and row[index].strip())


def listed_images(folder: Path) -> dict[str, str]:
    """{name: name, stem: name} for the image files directly in `folder`: an id may be either."""
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file() and is_image(entry.name))
    return {stem: name for name in names for stem in (os.path.splitext(name)[0], name)}


def csv_ids(path: Path, header: list[str], rows: list[list[str]], id_column: str) -> list[str]:
    """The id of every row, each once: an id listed twice stops, naming both lines."""
    index = column(header, id_column, path, "; set data.id_column")
    seen: dict[str, int] = {}
    ids = []
    for line, row in enumerate(rows, start=2):
        file_id = row[index].strip() if len(row) > index else ""
        if not file_id:
            raise UserError(f"{path} line {line}: no id in column {id_column!r}")
        if file_id in seen:
            raise UserError(f"{path} line {line}: id {file_id!r} listed twice (first on line {seen[file_id]})")
        seen[file_id] = line
        ids.append(file_id)
    return ids


def image_paths(folder: Path, ids: list[str], extension: str | None, listed_in: Path, flag: str = "data.images") -> list[Path]:
    """`<folder>/<id><extension>` for each id; with `extension` None, the image file whose name or stem
    is the id (so one folder may mix .jpg and .png). A missing or empty file stops, naming it and its
    CSV line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: not a folder")
    if not ids:
        raise UserError(f"{listed_in}: no rows below the header")
    listed = listed_images(folder) if extension is None else {}
    paths = []
    for line, file_id in enumerate(ids, start=2):
        if extension is None and file_id not in listed:
            raise UserError(f"{folder / file_id}.*: missing: no image file for id {file_id!r} (listed on {listed_in} line "
                            f"{line}; looked for {', '.join(IMAGE_EXTENSIONS)})")
        path = folder / (listed[file_id] if extension is None else f"{file_id}{extension}")
        if not path.is_file():
            raise UserError(f"{path}: missing (listed on {listed_in} line {line})")
        check_not_empty(path, f" (listed on {listed_in} line {line})")
        paths.append(path)
    return paths


def csv_targets(dc, path: Path, header: list[str], rows: list[list[str]], classes: list[str], every_class: bool = True):
    """The labels of each row: integers into `classes`, or a (N, classes) 0/1 float32 array for
    multi-label; an empty or unknown label stops, naming the line; with `every_class`, so does a class
    no row has."""
    names = label_columns(dc, header, path)
    if is_multi_label(dc):
        unknown = [name for name in names if name not in classes]
        if unknown:
            raise UserError(f"{path}: unknown label column {unknown[0]!r}; the classes are {_list(classes)}")
        targets = np.zeros((len(rows), len(classes)), np.float32)
        for name in names:
            index, k = header.index(name), classes.index(name)
            for line, row in enumerate(rows, start=2):
                value = row[index].strip() if len(row) > index else ""
                if value not in MULTI_LABEL_TRUE + MULTI_LABEL_FALSE:
                    raise UserError(f"{path} line {line}: column {name!r} is {value!r}; expected 0 or 1 (one 0/1 column per class)")
                targets[line - 2, k] = value in MULTI_LABEL_TRUE
        empty = [classes[k] for k in np.flatnonzero(targets.sum(0) == 0)] if every_class else []
        if empty:
            raise UserError(f"{path}: empty class {empty[0]!r}: no row has a 1 in its column")
        return targets
    index, lookup = header.index(names[0]), {name: k for k, name in enumerate(classes)}
    targets = []
    for line, row in enumerate(rows, start=2):
        label = row[index].strip() if len(row) > index else ""
        if not label:
            raise UserError(f"{path} line {line}: no label in column {names[0]!r}")
        if label not in lookup:
            raise UserError(f"{path} line {line}: unknown label {label!r}; the classes are {_list(classes)}")
        targets.append(lookup[label])
    empty = sorted(set(range(len(classes))) - set(targets)) if every_class else []
    if empty:
        raise UserError(f"{path}: empty class {classes[empty[0]]!r}: no row has this label")
    return targets


def csv_samples(dc, path: Path, images: Path, classes: list[str], every_class: bool = True):
    """(paths, targets) of a labelled CSV (data.csv's layout) whose images are in `images`."""
    path = Path(path)
    header, rows = read_table(path)
    ids = csv_ids(path, header, rows, dc.id_column)
    targets = csv_targets(dc, path, header, rows, classes, every_class)
    return image_paths(images, ids, dc.extension, path), targets


def csv_image_folder(dc) -> Path:
    """data.images, or the folder holding data.csv when it is null."""
    return Path(dc.images) if dc.images else Path(dc.csv).parent


# ---- the classes of a config, and the validation split --------------------------------------------------


def resolve_classes(dc) -> list[str]:
    """The class names of a folder / csv source, read from the data (config validation fills
    data.classes with them, so that checkpoints carry them)."""
    if dc.source == "folder":
        return class_folders(Path(dc.root))
    if not dc.csv:
        raise ConfigError("key 'data.csv': data.source=csv needs the path of the training CSV (an id column and a label column)")
    return csv_classes(dc)


def holdout(targets, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `fraction` of each class validates (at least one image of
    a class with two or more, never its last one), seeded; multi-label targets are split at random."""
    rng = np.random.default_rng(seed)
    if isinstance(targets, np.ndarray):  # multi-label: no single class to stratify by
        order = rng.permutation(len(targets))
        count = min(max(round(fraction * len(order)), 1), len(order) - 1)
        return np.sort(order[count:]), np.sort(order[:count])
    targets = np.asarray(targets)
    val = []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        val += members[:count].tolist()
    val = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(targets)), val), val


def subset(paths: list, targets, indices: np.ndarray):
    return [paths[i] for i in indices], (targets[indices] if isinstance(targets, np.ndarray) else [targets[i] for i in indices])


def _list(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
