"""cnn data: CIFAR pickles and MNIST IDX files read through torchvision's own classes, named errors
for missing or damaged data, the seeded validation split, each augmentation doing what it says,
augmentation as a function of (seed, epoch, index), the device loader against the CPU path, and short
trainings through the shared loop on real-format files."""
from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from conftest import SMOKE_CNN, read_metrics, train_here
from cnn.data import DeviceImageSet, ImageSet, albumentations_pipeline, collate, read_split, split_train_val, synthetic_images
from cnn.models import create_model
from cnn.task import CnnData
from harness.config import load_config
from harness.errors import ConfigError, UserError
from harness.loop import train
from harness.task import get_task


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- tiny datasets in the real file formats ------------------------------------------------------


def gratings(n: int, size: int, channels: int, seed: int, num_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Learnable uint8 images (N, H, W, C): one grating orientation per class (cnn's generator)."""
    spec = SimpleNamespace(num_classes=num_classes, synth_seed=0, channels=channels, image_size=size, noise=0.25)
    images, labels = synthetic_images(n, spec, seed)
    return (images * 255).round().astype(np.uint8), labels


def write_cifar(root: Path, source: str, train: tuple, test: tuple) -> dict:
    """torchvision's CIFAR layout (python pickles, rows of 3072 bytes in C, H, W order); returns the
    md5 of each file, which torchvision checks."""
    cls = torchvision.datasets.CIFAR10 if source == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if source == "cifar10" else "fine_labels"

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        entry = {"data": rows, label_key: [int(v) for v in labels], "filenames": [f"{i}.png" for i in range(len(labels))]}
        if source == "cifar100":
            entry["coarse_labels"] = [0] * len(labels)
        (folder / name).write_bytes(pickle.dumps(entry))

    train_names = [name for name, _ in cls.train_list]
    for part, name in zip(np.array_split(np.arange(len(train[1])), len(train_names)), train_names):
        dump(name, train[0][part], train[1][part])
    dump(cls.test_list[0][0], *test)
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: [f"class{i}" for i in range(100)]}))
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def accept_written_cifar(monkeypatch, source: str, md5: dict) -> None:
    """Point torchvision's md5 table at the files just written (its integrity check still runs)."""
    cls = torchvision.datasets.CIFAR10 if source == "cifar10" else torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [[name, md5[name]] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5[name]] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5[cls.meta["filename"]]})


def write_idx(root: Path, class_name: str, train: tuple, test: tuple) -> Path:
    """MNIST's IDX files (big-endian header, then raw uint8) under <root>/<class_name>/raw/."""
    folder = root / class_name / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        images = images[..., 0]
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, *images.shape) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())
    return folder


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist_data")
    write_idx(root, "MNIST", gratings(320, 28, 1, seed=1), gratings(200, 28, 1, seed=2))
    return root


# ---- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_pickles_are_read_by_torchvision(tmp_path, monkeypatch, source):
    train_split, test_split = gratings(50, 32, 3, seed=1), gratings(20, 32, 3, seed=2)
    accept_written_cifar(monkeypatch, source, write_cifar(tmp_path, source, train_split, test_split))
    images, labels = read_split(source, str(tmp_path), train=True, download=False)
    assert images.dtype == np.uint8 and images.shape == (50, 32, 32, 3)
    assert np.array_equal(images, train_split[0]) and np.array_equal(labels, train_split[1])
    images, labels = read_split(source, str(tmp_path), train=False, download=False)
    assert np.array_equal(images, test_split[0]) and np.array_equal(labels, test_split[1])


@pytest.mark.parametrize("source, class_name", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_files_are_read_by_torchvision(tmp_path, source, class_name):
    train_split, test_split = gratings(30, 28, 1, seed=1), gratings(10, 28, 1, seed=2)
    write_idx(tmp_path, class_name, train_split, test_split)
    images, labels = read_split(source, str(tmp_path), train=True, download=False)
    assert images.shape == (30, 28, 28, 1) and np.array_equal(images, train_split[0]) and np.array_equal(labels, train_split[1])
    images, labels = read_split(source, str(tmp_path), train=False, download=False)
    assert np.array_equal(images, test_split[0])


def test_validation_is_a_seeded_hold_out_or_the_test_split(mnist_root):
    task = get_task("cnn")
    cfg = load_config(SMOKE_CNN, ["data.source=mnist", f"data.root={mnist_root}", "data.val_size=64"])
    train_set, val_set = task.build_datasets(cfg)
    assert (len(train_set), len(val_set)) == (256, 64)
    images, labels = read_split("mnist", str(mnist_root), train=True, download=False)
    (_, _), (val_images, _) = split_train_val(images, labels, 64, 0, "MNIST")
    again = split_train_val(images, labels, 64, 0, "MNIST")[1][0]
    other_seed = split_train_val(images, labels, 64, 1, "MNIST")[1][0]
    assert np.array_equal(val_images, again) and not np.array_equal(val_images, other_seed)
    assert torch.equal(val_set[0][0], torch.from_numpy(val_images[0]).permute(2, 0, 1).float() / 255)
    cfg = load_config(SMOKE_CNN, ["data.source=mnist", f"data.root={mnist_root}", "data.val_on_test=true"])
    train_set, val_set = task.build_datasets(cfg)
    assert (len(train_set), len(val_set)) == (320, 200)
    with pytest.raises(ConfigError, match="data.val_size.*320"):
        task.build_datasets(load_config(SMOKE_CNN, ["data.source=mnist", f"data.root={mnist_root}", "data.val_size=320"]))


def test_missing_data_is_a_user_error_naming_root_and_files(tmp_path, capsys):
    with pytest.raises(UserError) as err:
        read_split("cifar10", str(tmp_path / "nowhere"), train=True, download=False)
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "cifar-10-batches-py" in message
    assert "data_batch_1" in message and "test_batch" in message and "batches.meta" in message and "data.download" in message
    with pytest.raises(UserError, match=r"MNIST/raw.*train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        read_split("mnist", str(tmp_path), train=True, download=False)
    # The entry point: exit 2, the message, no traceback.
    result = train_here(capsys, SMOKE_CNN, f"output_dir={tmp_path / 'run'}", "data.source=cifar100", f"data.root={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert "CIFAR-100 not found" in result.stderr and "cifar-100-python" in result.stderr and "Traceback" not in result.stderr


def test_damaged_cifar_file_fails_torchvisions_md5_check(tmp_path):
    write_cifar(tmp_path, "cifar10", gratings(10, 32, 3, seed=1), gratings(5, 32, 3, seed=2))  # md5s differ from the real set
    with pytest.raises(UserError, match="failed torchvision's check"):
        read_split("cifar10", str(tmp_path), train=True, download=False)


# ---- augmentation ---------------------------------------------------------------------------------


def image_set(augment: list[str], images=None, seed: int = 0, **fields) -> ImageSet:
    images = gratings(16, 32, 3, seed=3)[0] if images is None else images
    return ImageSet(images, np.zeros(len(images), np.int64), albumentations_pipeline(CnnData(augment=augment, **fields), 32), seed=seed)


def as_float(image_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image_hwc).permute(2, 0, 1).float() / 255


def matching_window(out: torch.Tensor, original: torch.Tensor, pad: int, where: torch.Tensor | None = None,
                    mirrors: bool = False) -> tuple[bool, int, int] | None:
    """(mirrored, dy, dx) for which `out` equals the window at offset (dy, dx) of the reflect-padded
    original (or, with `mirrors`, of its mirror image), compared where `where` is True; None if none does."""
    size = original.shape[-1]
    where = torch.ones(size, size, dtype=torch.bool) if where is None else where
    for mirrored in (False, True) if mirrors else (False,):
        source = original.flip(-1) if mirrored else original
        padded = torch.nn.functional.pad(source[None], (pad,) * 4, mode="reflect")[0]
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                if torch.equal(padded[:, pad + dy:pad + dy + size, pad + dx:pad + dx + size][:, where], out[:, where]):
                    return mirrored, dy, dx
    return None


def test_hflip_mirrors_about_half_of_the_samples():
    images = gratings(64, 32, 3, seed=3)[0]
    dataset = image_set(["hflip"], images)
    flipped = 0
    for index in range(64):
        out, original = dataset[index][0], as_float(images[index])
        assert torch.equal(out, original) or torch.equal(out, original.flip(-1))
        flipped += torch.equal(out, original.flip(-1))
    assert 16 < flipped < 48


def test_pad_crop_keeps_the_shape_and_shifts_the_content():
    images = gratings(32, 32, 3, seed=3)[0]
    dataset = image_set(["pad_crop"], images, crop_padding=4)
    shifts = []
    for index in range(32):
        out = dataset[index][0]
        assert out.shape == (3, 32, 32)
        window = matching_window(out, as_float(images[index]), 4)
        assert window is not None, f"sample {index} is not a reflect-padded crop"
        shifts.append(window[1:])
    assert len(set(shifts)) > 5 and any(s != (0, 0) for s in shifts)


def test_cutout_zeroes_one_square_patch_and_nothing_else():
    images = np.full((16, 32, 32, 3), 200, np.uint8)  # no zero anywhere: the hole is exactly the zeros
    dataset = image_set(["cutout"], images, cutout_size=8)
    for index in range(16):
        out = dataset[index][0]
        hole = (out == 0).all(0)
        assert torch.equal(out[:, ~hole], as_float(images[index])[:, ~hole])
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert hole.sum() == len(rows) * len(cols) == 64  # one 8 x 8 square, fully inside the image


def test_affine_moves_the_digit_and_keeps_the_shape(mnist_root):
    images, _ = read_split("mnist", str(mnist_root), train=True, download=False)
    dataset = ImageSet(images[:8], np.zeros(8, np.int64),
                       albumentations_pipeline(CnnData(augment=["affine"], affine_degrees=15), 28))
    outs = [dataset[i][0] for i in range(8)]
    assert all(out.shape == (1, 28, 28) for out in outs)
    assert sum(not torch.equal(out, as_float(images[i])) for i, out in enumerate(outs)) >= 7


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    pipeline = ["pad_crop", "hflip", "cutout", "affine"]
    first, second = image_set(pipeline), image_set(pipeline)
    first.set_epoch(3)
    second.set_epoch(3)
    forward = [first[i][0] for i in range(16)]
    backward = [second[i][0] for i in reversed(range(16))][::-1]  # another instance, another order
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    first.set_epoch(4)
    assert not all(torch.equal(first[i][0], forward[i]) for i in range(16))  # a new epoch draws anew
    first.set_epoch(3)  # ... and coming back to epoch 3 (a resume) reproduces it exactly
    assert all(torch.equal(first[i][0], forward[i]) for i in range(16))
    other_seed = image_set(pipeline, seed=1)
    other_seed.set_epoch(3)
    assert not all(torch.equal(other_seed[i][0], forward[i]) for i in range(16))
    # DataLoader workers see the same draws as the main process.
    in_workers = torch.cat([x for x, _ in DataLoader(first, batch_size=8, num_workers=2)])
    assert torch.equal(in_workers, torch.stack(forward))


# ---- the device loader ----------------------------------------------------------------------------


def test_device_loader_equals_the_cpu_path_without_augmentation():
    images, labels = gratings(40, 32, 3, seed=4)
    cpu, device = ImageSet(images, labels), DeviceImageSet(images, labels, "cpu")
    indices = [5, 0, 39, 17, 17]
    batch = collate(device.__getitems__(indices))
    assert batch[0].dtype == torch.uint8 and batch[0].shape == (5, 3, 32, 32)
    reference = collate([cpu[i] for i in indices])
    assert torch.equal(batch[0].float() / 255, reference[0]) and torch.equal(batch[1], reference[1])
    model = create_model("smoke_cnn", in_channels=3, num_classes=4, width=8, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    assert torch.equal(model(batch[0]), model(reference[0]))  # uint8 in, same logits: Normalize converts identically
    # Through a DataLoader as the loop builds it (the batched fetch, then the task's collate).
    loader = DataLoader(device, batch_size=8, shuffle=False, collate_fn=collate)
    loaded = torch.cat([x for x, _ in loader])
    assert torch.equal(loaded.float() / 255, torch.stack([cpu[i][0] for i in range(40)]))
    # The DataLoader's pin-memory step (on when CUDA is present) must leave device batches alone.
    from torch.utils.data._utils.pin_memory import pin_memory
    assert pin_memory(batch) is batch


def test_device_augmentation_per_sample_whatever_the_batch():
    images, labels = gratings(24, 32, 3, seed=5)
    images = np.maximum(images, 1)  # no zero pixel, so the cutout hole is exactly the zeros
    dataset = DeviceImageSet(images, labels, "cpu", ["pad_crop", "hflip", "cutout"], crop_padding=4, cutout_size=8, seed=7)
    dataset.set_epoch(2)
    together = dataset.__getitems__(list(range(24)))[0]
    apart = torch.cat([dataset.__getitems__([i])[0] for i in reversed(range(24))]).flip(0)
    assert torch.equal(together, apart)
    dataset.set_epoch(3)
    assert not torch.equal(dataset.__getitems__(list(range(24)))[0], together)
    dataset.set_epoch(2)
    assert torch.equal(dataset.__getitems__(list(range(24)))[0], together)
    mirrored, shifted = 0, set()
    for index in range(24):
        out, original = together[index].float(), torch.from_numpy(images[index]).permute(2, 0, 1).float()
        hole = (out == 0).all(0)
        assert 0 < hole.sum() <= 64 and hole.sum() == hole.any(1).sum() * hole.any(0).sum()  # 8 x 8, clipped at the border
        window = matching_window(out, original, 4, where=~hole, mirrors=True)
        assert window is not None, f"sample {index} is not a (mirrored) reflect-padded crop with one hole"
        mirrored += window[0]
        shifted.add(window[1:])
    assert 4 < mirrored < 20 and len(shifted) > 5


def test_device_loader_refuses_workers_and_cpu_only_augmentations():
    task = get_task("cnn")
    with pytest.raises(ConfigError, match="trainer.num_workers=0"):
        task.build_datasets(load_config(SMOKE_CNN, ["data.gpu_loader=true", "trainer.num_workers=2"]))
    with pytest.raises(ConfigError, match="affine"):
        task.build_datasets(load_config(SMOKE_CNN, ["data.gpu_loader=true", "data.augment=[hflip, affine]"]))
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(SMOKE_CNN, ["data.augment=[mixup]"])


# ---- training through the shared loop on real-format files ---------------------------------------


def test_short_training_on_mnist_files_learns(tmp_path, mnist_root):
    cfg = load_config(SMOKE_CNN, [f"output_dir={tmp_path}", "data.source=mnist", f"data.root={mnist_root}",
                                  "data.val_on_test=true", "data.augment=[pad_crop]", "data.crop_padding=2", "model.width=8",
                                  "trainer.epochs=4", "optim.lr=0.02", "log.wandb=disabled", "log.plot=false"])
    train(cfg)
    accuracies = [row["val/acc"] for row in read_metrics(tmp_path) if "val/acc" in row]
    assert len(accuracies) == 4 and accuracies[-1] >= 0.9, accuracies  # 4 classes: chance is 0.25
    assert (tmp_path / "parameters.csv").read_text().startswith("name,layer,shape,count,trainable,norm")


def test_short_training_on_cifar_files_with_the_device_loader_learns(tmp_path, monkeypatch):
    md5 = write_cifar(tmp_path / "data", "cifar10", gratings(400, 32, 3, seed=1), gratings(100, 32, 3, seed=2))
    accept_written_cifar(monkeypatch, "cifar10", md5)
    cfg = load_config(SMOKE_CNN, [f"output_dir={tmp_path / 'run'}", "data.source=cifar10", f"data.root={tmp_path / 'data'}",
                                  "data.val_size=80", "data.gpu_loader=true", "data.augment=[pad_crop, cutout]",
                                  "model.width=8", "trainer.epochs=4", "optim.lr=0.02", "log.wandb=disabled", "log.plot=false"])
    train(cfg)
    accuracies = [row["val/acc"] for row in read_metrics(tmp_path / "run") if "val/acc" in row]
    assert accuracies[-1] >= 0.9, accuracies


@pytest.mark.gpu
def test_device_loader_trains_on_cuda(tmp_path, mnist_root):
    """On a GPU the set lives in device memory: batches arrive as CUDA uint8, pin-memory leaves them alone."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    task = get_task("cnn")
    cfg = load_config(SMOKE_CNN, [f"output_dir={tmp_path}", "data.source=mnist", f"data.root={mnist_root}", "data.val_on_test=true",
                                  "data.gpu_loader=true", "data.augment=[pad_crop, cutout]", "model.width=8", "trainer.epochs=4",
                                  "optim.lr=0.02", "log.wandb=disabled", "trainer.mixed_precision=bf16"])
    train_set, _ = task.build_datasets(cfg)
    assert train_set.images.is_cuda
    loader = DataLoader(train_set, batch_size=32, collate_fn=task.collate_fn, pin_memory=True)
    images, labels = next(iter(loader))
    assert images.is_cuda and images.dtype == torch.uint8 and labels.is_cuda
    train(cfg)
    assert [r["val/acc"] for r in read_metrics(tmp_path) if "val/acc" in r][-1] >= 0.9
