"""ResNet-9 training throughput on the CPU: the harness against a raw PyTorch loop.

Both train the DAWNBench ResNet-9 (6.57M parameters) on CIFAR-shaped generated images (3 x 32 x 32,
10 classes) for the same updates at the same small batch, evaluate once and save once; the harness
pays for what the cnn smoke config turns on (a `last` checkpoint with optimizer state and a `best`
one, metrics.jsonl every 5 updates; W&B and the plot off, as in bench/loop_overhead.py, whose raw
loop this reuses). They alternate (raw, harness, raw, ...) so both see the same machine state, and
the medians are compared. Prints images/s end to end (build + train + eval + save) for both, the
harness's own steady-state train/samples_per_s, and last `overhead_ratio=<harness time / raw time>`.

    python bench/cnn_throughput.py [--steps 20] [--batch 16] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loop_overhead import harness_loop, raw_loop, timed  # noqa: E402
from harness.config import load_config  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smoke" / "cnn.yaml"


def bench_config(steps: int, batch: int, out: Path):
    """One epoch of `steps` updates: the harness evaluates and checkpoints once, like the raw loop."""
    return load_config(CONFIG, [
        f"output_dir={out}", f"trainer.max_steps={steps}", f"trainer.batch_size={batch}", "trainer.eval_batch_size=64",
        f"data.num_train={steps * batch}", "data.num_val=64", "data.image_size=32", "data.num_classes=10",
        "model.name=resnet9", "model.width=null", "optim.name=sgd", "optim.lr=0.05", "sched.name=onecycle",
        "log.wandb=disabled", "log.progress=none", "log.every_steps=5", "log.plot=false", "resume=never",
    ])


def harness_samples_per_s(run_dir: Path) -> float:
    """The loop's own train/samples_per_s, median over its log windows after the first (warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [row["train/samples_per_s"] for row in rows if "train/samples_per_s" in row]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"resnet9, batch {args.batch}, {args.steps} updates, {torch.get_num_threads()} CPU threads, median of {args.repeats}")
    times, steady = {"raw": [], "harness": []}, []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # the first round warms caches and is not counted
            for name, run in (("raw", raw_loop), ("harness", harness_loop)):
                out = Path(tmp) / f"{name}{repeat}"
                out.mkdir()
                with contextlib.redirect_stdout(io.StringIO()):  # the parameter tables and eval lines of every run
                    seconds = timed(run, bench_config(args.steps, args.batch, out)).wall
                if repeat:
                    times[name].append(seconds)
                    if name == "harness":
                        steady.append(harness_samples_per_s(out))
    images = args.steps * args.batch
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:8s} median {median:.2f} s = {images / median:.1f} images/s end to end; "
              f"all: {', '.join(f'{v:.2f}' for v in values)}")
    print(f"harness  steady-state training {statistics.median(steady):.1f} images/s (its train/samples_per_s)")
    print(f"overhead_ratio={statistics.median(times['harness']) / statistics.median(times['raw']):.3f}")


if __name__ == "__main__":
    main()
