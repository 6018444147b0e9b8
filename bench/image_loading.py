"""Image-folder loading: the cnn folder pipeline (data.source=folder: torchvision.io.decode_image, an
albumentations resize, float pixels) against torchvision's ImageFolder with its PIL loader and
transforms.Resize + ToTensor, on the same generated JPEG files, at the same DataLoader workers and
batch size, resized to the same square.

Each variant runs in its own process: list the folder, then `--epochs` passes through a DataLoader;
the fastest pass counts (other jobs on a shared machine only ever add time). Printed per variant:
images/s; the last line is `speedup=<folder pipeline images/s / ImageFolder images/s>`.

    python bench/image_loading.py [--images 400] [--size 224] [--workers 2] [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLASSES = ("a", "b", "c", "d")


def write_images(root: Path, count: int) -> None:
    """`count` JPEG photos-to-be of 300-500 px a side (quality 90), spread over four class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for n in range(count):
        height, width = rng.integers(300, 500, 2)
        # smooth colour fields plus noise compress like photographs, not like pure noise
        y, x = np.mgrid[0:height, 0:width]
        base = 127 + 100 * np.sin(x[..., None] / rng.uniform(10, 60, 3) + y[..., None] / rng.uniform(10, 60, 3))
        pixels = (base + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
        folder = root / CLASSES[n % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{n:05d}.jpg", quality=90)


def build(variant: str, root: str, size: int):
    """The dataset of one variant over the folder `root`."""
    if variant == "folder":
        from cnn.data import ImageFiles, albumentations_pipeline
        from cnn.images import folder_samples
        from cnn.task import CnnData

        dc = CnnData(source="folder", root=root, image_size=size)  # the classes are read from the folder
        paths, targets = folder_samples(Path(root), dc.classes)
        return ImageFiles(paths, targets, dc.classes, 3, albumentations_pipeline(dc, size, resize=True, train=False))
    from torchvision import datasets, transforms

    return datasets.ImageFolder(root, transform=transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()]))


def passes(variant: str, root: str, size: int, workers: int, epochs: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    data = build(variant, root, size)
    loader = DataLoader(data, batch_size=32, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(0),
                        persistent_workers=workers > 0)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        images = sum(len(batch[0]) for batch in loader)
        times.append(time.perf_counter() - start)
    return {"variant": variant, "images": images, "seconds": min(times), "images_per_s": images / min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(passes(*args.child[:1], args.child[1], args.size, args.workers, args.epochs)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), args.images)
        results = {}
        for variant in ("folder", "imagefolder"):
            out = subprocess.run([sys.executable, __file__, "--child", variant, tmp, "--size", str(args.size), "--workers",
                                  str(args.workers), "--epochs", str(args.epochs)], capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[variant]
            print(f"{variant:12s} {r['images']} images in {r['seconds']:.2f} s: {r['images_per_s']:.0f} images/s "
                  f"({args.workers} workers, {args.size} x {args.size})")
    print(f"speedup={results['folder']['images_per_s'] / results['imagefolder']['images_per_s']:.2f}")


if __name__ == "__main__":
    main()
