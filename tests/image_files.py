"""Tiny image data sets in the layouts of Kaggle image competitions, as real JPEG and PNG files of
different sizes and modes (grayscale, RGB, RGBA, palette), for the tests: a folder of class folders,
a train.csv with string labels and its image folder, a test folder with a sample submission, and a
multi-label CSV with one 0/1 column per class. Each class has its own bright region, so a small CNN
learns them in a few steps whatever the mode."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "owl")
MODES = ("RGB", "L", "RGBA", "P")  # cycled over the images of a class
SIZES = (16, 24, 32, 20)  # (height; the width is 4 pixels more)


def picture(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size + 4, 3) uint8: class 0 bright on the left, 1 at the top, 2 on the diagonal."""
    height, width = size, size + 4
    y, x = np.mgrid[0:height, 0:width]
    bright = [x < width / 2, y < height / 2, np.abs(x / width - y / height) < 0.25][label]
    image = np.where(bright, 200, 40)[..., None] + rng.normal(0, 20, (height, width, 3))
    return image.clip(0, 255).astype(np.uint8)


def save(path: Path, pixels: np.ndarray, mode: str) -> Path:
    image = Image.fromarray(pixels)
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg" and mode in ("RGBA", "P"):  # JPEG holds no alpha or palette: store those as PNG
        path = path.with_suffix(".png")
    image.save(path)
    return path


def images(count: int, seed: int, labels: list[int] | None = None):
    """(label, pixels, mode, suffix) for `count` images, labels cycling over the classes unless given."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = labels[i] if labels is not None else i % len(CLASSES)
        yield label, picture(label, SIZES[i % len(SIZES)], rng), MODES[(i // len(CLASSES)) % len(MODES)], (".jpg", ".png")[i % 2]


def write_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """<root>/<class>/<n>.jpg|png."""
    for n, (label, pixels, mode, suffix) in enumerate(images(per_class * len(CLASSES), seed)):
        save(root / CLASSES[label] / f"{n}{suffix}", pixels, mode)
    return root


def write_test_folder(folder: Path, count: int = 6, seed: int = 1) -> tuple[list[str], list[int]]:
    """<folder>/<id>.jpg|png with no labels; returns (ids, true labels)."""
    ids, labels = [], []
    for n, (label, pixels, mode, suffix) in enumerate(images(count, seed)):
        file_id = f"t{n:02d}"
        save(folder / f"{file_id}{suffix}", pixels, mode)
        ids.append(file_id)
        labels.append(label)
    return ids, labels


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_csv_layout(root: Path, count: int = 18, seed: int = 0) -> Path:
    """Kaggle's layout: <root>/train.csv (image_id,species with string labels), <root>/train/<id>.png
    (every image PNG, so ids carry no extension and data.extension=.png finds them)."""
    rows = []
    for n, (label, pixels, mode, _) in enumerate(images(count, seed)):
        file_id = f"img{n:03d}"
        save(root / "train" / f"{file_id}.png", pixels, mode)
        rows.append([file_id, CLASSES[label]])
    return write_csv(root / "train.csv", ["image_id", "species"], rows)


def write_sample_submission(path: Path, ids: list[str], header: list[str] = ("id", "label"), shuffle_seed: int = 3) -> list[str]:
    """A sample submission listing `ids` in a shuffled order with dummy answers; returns that order."""
    order = [ids[i] for i in np.random.default_rng(shuffle_seed).permutation(len(ids))]
    write_csv(path, list(header), [[file_id] + [CLASSES[0] if len(header) == 2 else "0.5"] * (len(header) - 1) for file_id in order])
    return order


def write_multi_label(root: Path, count: int = 18, seed: int = 0) -> Path:
    """<root>/multi.csv (id,cat,dog,owl; 0/1 per class: the image's class and, for every third image,
    the next one too) and <root>/multi/<id>.jpg."""
    rows = []
    for n, (label, pixels, mode, _) in enumerate(images(count, seed)):
        file_id = f"m{n:03d}"
        save(root / "multi" / f"{file_id}.jpg", pixels, "RGB" if mode in ("RGBA", "P") else mode)
        flags = [int(k == label or (n % 3 == 0 and k == (label + 1) % len(CLASSES))) for k in range(len(CLASSES))]
        rows.append([file_id, *flags])
    return write_csv(root / "multi.csv", ["id", *CLASSES], rows)
