"""Inference speed with and without test-time augmentation: flip (doubles the forward passes: the
sample and its mirror image), scale (the records of 3 velocity scalings, gwi/scaling.py: 3 forward
passes and the records' shaping) and flip+scale (6). Times the gwi task's `predict` on random raw
seismic batches with the model a config names (default configs/smoke/gwi.yaml's), alternating the
modes, median of runs; each mode's cost against none is printed. The last line is
`tta_cost=<seconds with flip TTA / seconds without>`.

    python bench/gwi_tta.py [--config configs/smoke/gwi.yaml] [--batches 10] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from harness.config import load_config  # noqa: E402
from harness.task import get_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smoke" / "gwi.yaml"))
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    task = get_task(cfg.task, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = task.build_model(cfg).to(device).eval()
    batches = [3 * torch.randn(args.batch_size, 5, 1000, 70, device=device) for _ in range(args.batches)]
    seconds = {tta: [] for tta in task.tta_modes}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            for tta in task.tta_modes:
                task.tta = tta
                start = time.perf_counter()
                for batch in batches:
                    task.predict(model, (batch,))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat:
                    seconds[tta].append(time.perf_counter() - start)
    samples = args.batches * args.batch_size
    for tta, values in seconds.items():
        print(f"tta={tta:10s} {samples / statistics.median(values):8.1f} samples/s on {device} ({cfg.model.name}, batch "
              f"{args.batch_size}), cost {statistics.median(values) / statistics.median(seconds['none']):.2f}")
    print(f"tta_cost={statistics.median(seconds['flip']) / statistics.median(seconds['none']):.2f}")


if __name__ == "__main__":
    main()
