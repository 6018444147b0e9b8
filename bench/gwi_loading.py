"""Training-sample loading: float16 memory maps (what the gwi datasets do) against float32 full
loads (np.load of every file into RAM, as many public notebooks do), on the same generated data.

Each variant runs in its own process: build the dataset, then one epoch through a DataLoader
(2 workers, batch 16). Printed per variant: samples/s (the epoch including the dataset's start-up)
and memory: peak RSS (VmHWM) and the anonymous memory still held at the end (RssAnon; memory-mapped
data lives in the reclaimable page cache instead). The last line is
`speedup=<memmap samples/s / full-load samples/s>`.

    python bench/gwi_loading.py [--files 4] [--samples 100]
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


class FullLoad:
    """The reference: every float32 file loaded into memory up front."""

    def __init__(self, pairs):
        import torch

        self.seismic = torch.from_numpy(np.concatenate([np.load(p.seismic) for p in pairs]))
        self.velocity = torch.from_numpy(np.concatenate([np.load(p.velocity) for p in pairs]))

    def __len__(self):
        return len(self.seismic)

    def __getitem__(self, index):
        return self.seismic[index], self.velocity[index]


def memory() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmHWM", "RssAnon")}  # MiB


def one_epoch(variant: str, root: str) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from gwi.data import SeismicPairs
    from gwi.layout import find_pairs

    start = time.perf_counter()
    if variant == "memmap":
        pairs = find_pairs([root])
        dataset = SeismicPairs(pairs, sorted({p.family for p in pairs}))
    else:
        dataset = FullLoad(find_pairs([root]))
    loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    samples = sum(len(batch[0]) for batch in loader)
    seconds = time.perf_counter() - start
    return {"variant": variant, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds, **memory()}


def write_data(root: Path, files: int, samples: int) -> tuple[Path, Path]:
    from gwi.convert import convert

    rng = np.random.default_rng(0)
    full = root / "float32" / "FlatVel_A"
    for k in range(1, files + 1):
        (full / "data").mkdir(parents=True, exist_ok=True)
        (full / "model").mkdir(parents=True, exist_ok=True)
        np.save(full / "data" / f"data{k}.npy", rng.normal(0, 3, (samples, 5, 1000, 70)).astype(np.float32))
        np.save(full / "model" / f"model{k}.npy", rng.uniform(1500, 4500, (samples, 1, 70, 70)).astype(np.float32))
    convert(root / "float32", root / "float16")
    return root / "float32", root / "float16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--samples", type=int, default=100, help="per file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_epoch(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        float32, float16 = write_data(Path(tmp), args.files, args.samples)
        results = {}
        for variant, root in (("full_load", float32), ("memmap", float16), ("full_load", float32), ("memmap", float16)):
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(root)], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.setdefault(variant, []).append(result)
    for variant, runs in results.items():
        best = max(runs, key=lambda r: r["samples_per_s"])
        print(f"{variant:10s} {best['samples_per_s']:8.1f} samples/s over {best['samples']} samples; "
              f"peak RSS {best['VmHWM']:.0f} MiB, anonymous memory held {best['RssAnon']:.0f} MiB")
    speed = {v: max(r["samples_per_s"] for r in runs) for v, runs in results.items()}
    print(f"speedup={speed['memmap'] / speed['full_load']:.2f}")


if __name__ == "__main__":
    main()
