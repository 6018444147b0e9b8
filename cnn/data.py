"""Image classification data: CIFAR-10/100, MNIST and Fashion-MNIST read by torchvision's own dataset
classes, image files (a folder of class folders or a train.csv: cnn/images.py), or generated gratings;
a seeded validation split, seeded augmentation, and an optional device-resident loader.

Samples are pixels in [0, 1] (float32, C x H x W) or, from the device loader, uint8 batches: the
normalisation is the model's first layer (cnn.models.Normalize), so everything outside the model
works in pixel space.

Random augmentation is a function of (seed, epoch, sample index) only, never of the global RNG, the
worker or the batch: the loop calls `set_epoch` before each pass, and a resumed run sees exactly the
augmentation an uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from accelerate import PartialState
from torch.utils.data import Dataset, default_collate

from cnn.images import (FILE_SOURCES, GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, csv_image_folder, csv_samples,
                        folder_samples, holdout, read_image, subset)
from cnn.models import to_unit_float
from harness.errors import ConfigError, UserError
from harness.folds import FoldSamples, fold_indices

AUGMENTATIONS = ("pad_crop", "hflip", "cutout", "affine", "random_resized_crop", "vflip", "rotate90", "color_jitter")
DEVICE_AUGMENTATIONS = ("pad_crop", "hflip", "cutout")  # what the device loader implements as tensor ops


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a data source, without reading any file."""

    title: str
    channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Per-channel pixel mean/std of each training set (pixels in [0, 1]).
TORCHVISION_SPECS = {
    "cifar10": DatasetSpec("CIFAR-10", 3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec("CIFAR-100", 3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": DatasetSpec("MNIST", 1, 10, 28, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetSpec("Fashion-MNIST", 1, 10, 28, (0.2860,), (0.3530,)),
}


def dataset_spec(dc) -> DatasetSpec:
    if dc.source == "synthetic":  # identity normalisation: generated pixels are already well scaled
        return DatasetSpec("synthetic", dc.channels, dc.num_classes, dc.image_size, (0.0,) * dc.channels, (1.0,) * dc.channels)
    if dc.source in FILE_SOURCES:  # ImageNet's statistics: what pretrained backbones expect
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if dc.channels == 3 else (GRAY_MEAN, GRAY_STD)
        return DatasetSpec(f"{dc.source} data", dc.channels, len(dc.classes), dc.image_size, mean, std)
    return TORCHVISION_SPECS[dc.source]


def class_names(dc) -> list[str]:
    """The class names of a data source, in label order."""
    if dc.source in FILE_SOURCES:
        return list(dc.classes)
    spec = dataset_spec(dc)
    if dc.source == "cifar10":
        return list(CIFAR10_NAMES)
    if dc.source == "fashion_mnist":
        return list(torchvision_class(dc.source).classes)
    return [str(i) for i in range(spec.num_classes)]  # MNIST's digits, CIFAR-100's and synthetic classes by index


def torchvision_class(source: str):
    # torchvision takes seconds to import and runs on generated images never touch it: imported on first use.
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "mnist": datasets.MNIST,
            "fashion_mnist": datasets.FashionMNIST}[source]


def expected_files(source: str, root: Path) -> tuple[Path, list[str]]:
    """(folder, file names) torchvision reads for `source` under `root`, taken from its classes."""
    cls = torchvision_class(source)
    if source.startswith("cifar"):
        names = [name for name, _md5 in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return root / cls.base_folder, names
    names = [Path(url).stem for url, _md5 in cls.resources]  # the .gz archives, extracted
    return root / cls.__name__ / "raw", names


def read_split(source: str, root: str, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C) uint8, labels (N,) int64) of the training or the test split, read by
    torchvision's dataset class; a missing or damaged copy is a UserError naming the files."""
    spec, root = TORCHVISION_SPECS[source], Path(root)
    folder, names = expected_files(source, root)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing and not download:
        raise UserError(f"data.root={str(root)!r}: {spec.title} not found; expected {folder}/ with {', '.join(names)} "
                        f"(missing: {', '.join(missing)}). Put torchvision's layout there (e.g. torchvision.datasets."
                        f"{torchvision_class(source).__name__}(root, download=True) on a machine with internet), or set "
                        "data.download=true")
    try:
        dataset = torchvision_class(source)(str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:
        if missing:  # files were missing and data.download is on: the download failed
            raise UserError(f"data.download: could not download {spec.title} into {str(root)!r}: {err}") from None
        # torchvision's "not found or corrupted" although the files exist: its md5 check failed
        raise UserError(f"data.root={str(root)!r}: {spec.title} in {folder} failed torchvision's check ({err}); "
                        "the files are damaged or from another release: extract the archive again") from None
    images = np.asarray(dataset.data, dtype=np.uint8)
    if images.ndim == 3:  # MNIST-style (N, H, W)
        images = images[..., None]
    expected_shape = (spec.image_size, spec.image_size, spec.channels)
    if images.shape[1:] != expected_shape:
        raise UserError(f"{folder}: {spec.title} images of shape {images.shape[1:]}, expected {expected_shape}")
    return images, np.asarray(dataset.targets, dtype=np.int64)


def synthetic_images(n: int, dc, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of sinusoidal gratings, one orientation and frequency per class (fixed by `synth_seed`,
    shared by every split), at a random phase (position) per image, plus Gaussian noise: a problem a
    small CNN learns in seconds, with no download. (N, H, W, C) float32 in [0, 1], labels (N,)."""
    rng_classes = np.random.default_rng(dc.synth_seed)
    angle = np.pi * (np.arange(dc.num_classes) + rng_classes.uniform(0.2, 0.8, dc.num_classes)) / dc.num_classes
    cycles = rng_classes.uniform(1.5, 4.0, dc.num_classes)  # cycles across the image
    rng = np.random.default_rng([dc.synth_seed, split_seed])
    labels = rng.integers(0, dc.num_classes, n)
    phase = rng.uniform(0, 2 * np.pi, (n, dc.channels, 1, 1))
    y, x = np.mgrid[0:dc.image_size, 0:dc.image_size] / dc.image_size
    along = (np.cos(angle)[labels, None, None] * x + np.sin(angle)[labels, None, None] * y) * cycles[labels, None, None]
    images = 0.5 + 0.5 * np.sin(2 * np.pi * along[:, None] + phase)
    images += rng.normal(0, dc.noise, images.shape)
    return images.clip(0, 1).astype(np.float32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def split_train_val(images: np.ndarray, labels: np.ndarray, val_size: int, seed: int, title: str):
    """A seeded random `val_size` images of the training set validate; the rest train."""
    if val_size >= len(labels):
        raise ConfigError(f"key 'data.val_size': {val_size} leaves no training images ({title} has {len(labels)})")
    order = np.random.default_rng(seed).permutation(len(labels))
    val, train = np.sort(order[:val_size]), np.sort(order[val_size:])
    return (images[train], labels[train]), (images[val], labels[val])


# ---- augmentation ------------------------------------------------------------------------------------


def check_device_loader(dc, num_workers: int) -> None:
    """The device loader augments in the main process, and only with what it implements as tensor ops."""
    if not dc.gpu_loader:
        return
    if dc.source in FILE_SOURCES:
        raise ConfigError(f"key 'data.gpu_loader': data.source={dc.source} decodes image files in DataLoader workers; "
                          "the device loader holds a dataset already in memory (cifar10, mnist, ...): set data.gpu_loader=false")
    if num_workers:
        raise ConfigError("key 'trainer.num_workers': data.gpu_loader keeps the data on the device and augments it in "
                          "the main process; set trainer.num_workers=0")
    cpu_only = [name for name in dc.augment if name not in DEVICE_AUGMENTATIONS]
    if cpu_only:
        raise ConfigError(f"key 'data.augment': the device loader (data.gpu_loader) does {', '.join(DEVICE_AUGMENTATIONS)}, "
                          f"not {', '.join(cpu_only)}; drop it or set data.gpu_loader=false")


def albumentations_pipeline(dc, image_size: int, resize: bool = False, train: bool = True):
    """The CPU pipeline of `data.augment` (with `train`; evaluation augments nothing), in the order
    given; None when it has nothing to do. With `resize` (images of any size, from files) the images
    are first resized to image_size x image_size, unless random_resized_crop, which crops and resizes
    at random, is one of the steps."""
    names = list(dc.augment) if train else []
    sizing = resize and "random_resized_crop" not in names
    if not names and not sizing:
        return None
    # albumentations is slow to import (it loads scipy and defines every transform) and only runs that
    # augment on the CPU need it, so it is imported here rather than by every cnn run.
    import albumentations as A

    size, pad = image_size, dc.crop_padding
    steps = {
        # torch's "reflect" (no repeated edge pixel) is OpenCV's BORDER_REFLECT_101.
        "pad_crop": lambda: [A.PadIfNeeded(size + 2 * pad, size + 2 * pad, border_mode=cv2.BORDER_REFLECT_101),
                             A.RandomCrop(size, size)],
        "hflip": lambda: [A.HorizontalFlip(p=0.5)],
        "cutout": lambda: [A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(dc.cutout_size, dc.cutout_size),
                                           hole_width_range=(dc.cutout_size, dc.cutout_size), fill=0, p=1.0)],
        "affine": lambda: [A.Affine(translate_percent=(-dc.affine_translate, dc.affine_translate),
                                    scale=(1 - dc.affine_scale, 1 + dc.affine_scale),
                                    rotate=(-dc.affine_degrees, dc.affine_degrees),
                                    border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)],
        "random_resized_crop": lambda: [A.RandomResizedCrop(size=(size, size), scale=tuple(dc.crop_scale), p=1.0)],
        "vflip": lambda: [A.VerticalFlip(p=0.5)],
        "rotate90": lambda: [A.RandomRotate90(p=1.0)],
        "color_jitter": lambda: [A.ColorJitter(brightness=dc.jitter, contrast=dc.jitter, saturation=dc.jitter, hue=0.0, p=1.0)],
    }
    # INTER_AREA: the resampling that keeps detail when shrinking (most photos are larger than the model's input).
    first = [A.Resize(size, size, interpolation=cv2.INTER_AREA)] if sizing else []
    return A.Compose(first + [transform for name in names for transform in steps[name]()], seed=0)


def sample_generators(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, random.Random]:
    """The random state of one sample's augmentation: a function of (seed, epoch, index) only."""
    generator = np.random.default_rng([seed, epoch, index])
    return generator, random.Random(int(generator.integers(2**63)))


def augmented_pixels(image: np.ndarray, augment, seed: int, epoch: int, index: int) -> torch.Tensor:
    """One HWC image through `augment` (an albumentations Compose, or None) with the sample's own random
    state, as float32 C x H x W in [0, 1]."""
    if augment is not None:
        augment.set_random_state(*sample_generators(seed, epoch, index))
        image = augment(image=image)["image"]
        if image.ndim == 2:  # OpenCV drops a single channel
            image = image[..., None]
    return to_unit_float(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))


class ImageSet(Dataset):
    """Images (N, H, W, C), uint8 or float32 in [0, 1], and labels; yields (float32 C x H x W in [0, 1],
    label), augmented by `augment` (an albumentations Compose) seeded per (seed, epoch, index)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment=None, seed: int = 0):
        self.images, self.labels = images, labels
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return augmented_pixels(self.images[index], self.augment, self.seed, self.epoch, index), int(self.labels[index])


class ImageFiles(Dataset):
    """Image files with their labels (cnn/images.py lists and decodes them). Yields (float32 C x H x W in [0, 1], target): the integer label,
    or a float32 0/1 vector for multi-label data; with `targets=None` (a test set) the target is the
    sample's index. `transform` (an albumentations Compose) resizes and augments, seeded per
    (seed, epoch, index) like ImageSet. `targets` are the integer labels (a list, as torchvision's
    datasets have them) or a (N, classes) float32 0/1 array; `classes` the class names in label order."""

    def __init__(self, paths: list, targets, classes: list[str], channels: int, transform=None, seed: int = 0):
        self.paths = [str(p) for p in paths]
        self.targets = targets
        self.classes, self.channels = list(classes), channels
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        pixels = augmented_pixels(read_image(self.paths[index], self.channels), self.transform, self.seed, self.epoch, index)
        if self.targets is None:
            return pixels, index
        if isinstance(self.targets, np.ndarray):
            return pixels, torch.from_numpy(self.targets[index])
        return pixels, self.targets[index]


# ---- the device-resident loader ----------------------------------------------------------------------


class DeviceBatch(tuple):
    """(images, labels) already batched on the device by DeviceImageSet.__getitems__. The DataLoader's
    collate (`collate`) passes it through, and its pin-memory step leaves it alone (device tensors
    cannot be pinned)."""

    def pin_memory(self, device=None):
        return self


def collate(samples):
    """The task's collate_fn: device batches are ready; per-sample lists are stacked as usual."""
    return samples if isinstance(samples, DeviceBatch) else default_collate(samples)


MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 arithmetic, values kept below 2**32: no overflow on any device)."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    return (x >> 16) ^ x


def uniform_per_sample(seed: int, epoch: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """A uniform [0, 1) number per sample, a function of (seed, epoch, index, stream) only: the same on
    CPU and GPU, in any batch; `stream` tells apart the draws of one sample (crop x, crop y, flip, ...)."""
    key = _mix32(torch.full_like(index, seed & MASK32))
    key = _mix32(key ^ (epoch & MASK32))
    key = _mix32(key ^ index)
    key = _mix32(key ^ stream)
    return (key >> 8).float() / 2**24  # 24 bits: exact in float32


def reflect(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect out-of-range pixel coordinates back inside [0, size) without repeating the edge (torch's
    and OpenCV's REFLECT_101 padding), so a crop reads straight from the unpadded image."""
    coords = coords.abs()
    return torch.where(coords > size - 1, 2 * (size - 1) - coords, coords)


class DeviceImageSet(Dataset):
    """The whole split as one (N, C, H, W) tensor (uint8 for the real datasets) on `device`.
    `__getitems__` (PyTorch's batched fetch, which the DataLoader calls with a batch's indices) gathers
    the batch with one indexing op that also applies the random crop and flip, then cuts out the
    holes; nothing leaves the device and no worker is needed. The sampler, `set_epoch`, sharding
    across processes and skipping consumed batches on resume are the loop's DataLoader's, unchanged."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device, augment: list[str] = (), crop_padding: int = 4,
                 cutout_size: int = 8, seed: int = 0):
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.augment, self.crop_padding, self.cutout_size = tuple(augment), crop_padding, cutout_size
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> DeviceBatch:
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        if not self.augment:
            return DeviceBatch((self.images[index], self.labels[index]))
        return DeviceBatch((self.augmented(index), self.labels[index]))

    def augmented(self, index: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = self.images.shape
        device = index.device
        rows = torch.arange(height, device=device).expand(len(index), height)
        cols = torch.arange(width, device=device).expand(len(index), width)

        def draw(stream: int) -> torch.Tensor:
            return uniform_per_sample(self.seed, self.epoch, index, stream)

        if "pad_crop" in self.augment:  # a random window of the reflect-padded image
            span = 2 * self.crop_padding + 1
            rows = reflect(rows + ((draw(0) * span).long() - self.crop_padding)[:, None], height)
            cols = reflect(cols + ((draw(1) * span).long() - self.crop_padding)[:, None], width)
        if "hflip" in self.augment:
            cols = torch.where((draw(2) < 0.5)[:, None], cols.flip(1), cols)
        chans = torch.arange(channels, device=device)
        batch = self.images[index[:, None, None, None], chans[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        if "cutout" in self.augment:  # a square hole centred anywhere, clipped at the border (DeVries & Taylor)
            top = (draw(3) * height).long() - self.cutout_size // 2
            left = (draw(4) * width).long() - self.cutout_size // 2
            y = torch.arange(height, device=device)[None, :]
            x = torch.arange(width, device=device)[None, :]
            inside_rows = (y >= top[:, None]) & (y < top[:, None] + self.cutout_size)
            inside_cols = (x >= left[:, None]) & (x < left[:, None] + self.cutout_size)
            hole = inside_rows[:, :, None] & inside_cols[:, None, :]
            batch = batch.masked_fill(hole[:, None], 0)
        return batch


# ---- the task's entry point --------------------------------------------------------------------------


def training_split(dc) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a torchvision or synthetic source's whole training split, which data.fold splits."""
    if dc.source == "synthetic":
        return synthetic_images(dc.num_train, dc, 1)
    # With data.download, the main process downloads while the others wait, then they all read.
    with PartialState().main_process_first() if dc.download else contextlib.nullcontext():
        return read_split(dc.source, dc.root, train=True, download=dc.download)


def file_training_set(dc) -> tuple[list, list | np.ndarray]:
    """(paths, targets) of a folder or csv source's training images, which data.val_fraction or data.fold split."""
    classes = list(dc.classes)
    if dc.source == "folder":
        return folder_samples(Path(dc.root), classes)
    return csv_samples(dc, Path(dc.csv), csv_image_folder(dc), classes)


def file_ids(dc, paths: list) -> list[str]:
    """The images' paths under data.root (folder) or data.images (csv): oof.csv's ids."""
    base = Path(dc.root) if dc.source == "folder" else csv_image_folder(dc)
    return [str(Path(path).relative_to(base)) for path in paths]


def label_samples(labels, names: list[str], ids: list[str] | None = None) -> FoldSamples:
    """k-fold's view of a labelled training set: stratified by label (multi-label targets, which have
    no single class, as one stratum, as data.val_fraction's hold-out treats them); ids default to the
    sample indices."""
    ids = ids if ids is not None else [str(i) for i in range(len(labels))]
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        return FoldSamples(strata=np.zeros(len(labels), dtype=np.int64), names=["any"], ids=ids, key="label")
    return FoldSamples(strata=np.asarray(labels), names=names, ids=ids, key="label")


def fold_samples(dc) -> FoldSamples:
    if dc.source in FILE_SOURCES:
        paths, targets = file_training_set(dc)
        return label_samples(targets, class_names(dc), file_ids(dc, paths))
    return label_samples(training_split(dc)[1], class_names(dc))


def fold_split(dc) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, val) (images, labels) of k-fold part `data.fold` of a torchvision or synthetic training split."""
    if dc.val_on_test:
        raise ConfigError("key 'data.fold': k-fold validates on a part of the training split, data.val_on_test on the "
                          "test split; set one of them")
    images, labels = training_split(dc)
    train_index, val_index = fold_indices(label_samples(labels, class_names(dc)), dc.folds, dc.fold, dc.split_seed)
    return (images[train_index], labels[train_index]), (images[val_index], labels[val_index])


def build_datasets(dc, seed: int, num_workers: int = 0) -> tuple[Dataset, Dataset]:
    """(train, val) for `data.source`: validation is `data.val_size` seeded images carved from the
    training set, the official test split with `data.val_on_test`, or part `data.fold` of the
    training split (k-fold, stratified by label)."""
    check_device_loader(dc, num_workers)
    spec = dataset_spec(dc)
    if dc.source in FILE_SOURCES:
        return file_datasets(dc, seed)
    if dc.fold is not None:
        train, val = fold_split(dc)
    elif dc.source == "synthetic":
        train, val = synthetic_images(dc.num_train, dc, 1), synthetic_images(dc.num_val, dc, 2)
    else:
        # With data.download, the main process downloads while the others wait, then they all read.
        with PartialState().main_process_first() if dc.download else contextlib.nullcontext():
            train = read_split(dc.source, dc.root, train=True, download=dc.download)
            val = read_split(dc.source, dc.root, train=False, download=dc.download) if dc.val_on_test else None
        if val is None:
            train, val = split_train_val(*train, dc.val_size, dc.split_seed, spec.title)
    if dc.gpu_loader:
        device = PartialState().device  # this process's device: the GPU it drives, or the CPU
        options = dict(crop_padding=dc.crop_padding, cutout_size=dc.cutout_size, seed=seed)
        return DeviceImageSet(*train, device, dc.augment, **options), DeviceImageSet(*val, device, (), **options)
    return ImageSet(*train, albumentations_pipeline(dc, spec.image_size), seed=seed), ImageSet(*val)


def file_datasets(dc, seed: int) -> tuple[ImageFiles, ImageFiles]:
    """(train, val) of a folder of class folders or a train.csv: validation is data.val_root (folder),
    part data.fold (k-fold, stratified by class) or data.val_fraction of each class, held out by
    data.split_seed."""
    classes = list(dc.classes)
    paths, targets = file_training_set(dc)
    if dc.fold is not None:
        if dc.val_root:
            raise ConfigError("key 'data.fold': k-fold validates on a part of data.root, data.val_root on another folder; "
                              "set one of them")
        train_index, val_index = fold_indices(label_samples(targets, classes, file_ids(dc, paths)), dc.folds, dc.fold,
                                              dc.split_seed)
        train, val = subset(paths, targets, train_index), subset(paths, targets, val_index)
    elif dc.val_root:
        train, val = (paths, targets), folder_samples(Path(dc.val_root), classes, "data.val_root", every_class=False)
    else:
        train_index, val_index = holdout(targets, dc.val_fraction, dc.split_seed)
        train, val = subset(paths, targets, train_index), subset(paths, targets, val_index)
    augment = albumentations_pipeline(dc, dc.image_size, resize=True)
    evaluate = albumentations_pipeline(dc, dc.image_size, resize=True, train=False)
    return (ImageFiles(*train, classes, dc.channels, augment, seed=seed),
            ImageFiles(*val, classes, dc.channels, evaluate, seed=seed))
