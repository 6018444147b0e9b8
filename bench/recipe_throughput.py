"""Training throughput of one recipe (a config) at its own batch size, on the project's generated
data: samples/s and peak device memory over a few hundred updates of the real loop (train.py's).

The recipe runs as configured (model, batch size, mixed precision, EMA, clipping, augmentation,
loader) except: `data.source=synthetic` (gwi: layered maps with surrogate seismic, gwi/synthetic.py;
cnn: generated gratings at CIFAR's shape), `--batches-per-epoch` batches of data cycled for
`--steps` updates, evaluation only at the end, no W&B, no plot, a temporary output_dir. The loop
still writes `last` at every epoch's end, so samples/s is the median of the loop's own
train/samples_per_s over windows of 2 updates, after the first fifth (warm-up): the few windows
holding a checkpoint write do not move the median. Peak memory: torch.cuda.max_memory_allocated
(on the CPU: not measured). One line: `recipe=<config> batch=<B> samples_per_s=<x> peak_gib=<y>`.

    python bench/recipe_throughput.py configs/gwi/unet.yaml [--steps 200] [--batches-per-epoch 10] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.config import load_config  # noqa: E402
from harness.errors import UserError, print_user_error  # noqa: E402
from harness.loop import train  # noqa: E402

LOG_EVERY = 2  # updates per samples/s window


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates")
    parser.add_argument("--batches-per-epoch", type=int, default=10, help="generated training data, in batches")
    parser.add_argument("overrides", nargs="*", help="further key=value overrides")
    args = parser.parse_intermixed_args()
    if args.steps < 5 * LOG_EVERY or args.batches_per_epoch < 1:
        raise UserError(f"--steps must be at least {5 * LOG_EVERY} and --batches-per-epoch positive")

    recipe = load_config(args.config, args.overrides)
    batch = recipe.trainer.batch_size
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [
            *args.overrides, f"output_dir={out}", "resume=never", "data.source=synthetic",
            f"data.num_train={batch * args.batches_per_epoch}", f"data.num_val={recipe.trainer.eval_batch_size or batch}",
            f"trainer.max_steps={args.steps}", "trainer.eval_every_epochs=0",
            "log.wandb=disabled", "log.progress=none", "log.plot=false", f"log.every_steps={LOG_EVERY}",
        ])
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        train(cfg)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        rates = [record["train/samples_per_s"] for record in map(json.loads, (Path(out) / "metrics.jsonl").open())
                 if "train/samples_per_s" in record]
    steady = rates[len(rates) // 5:]
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"recipe={args.config} batch={batch} steps={args.steps} device={device!r} "
          f"samples_per_s={statistics.median(steady):.1f} peak_gib={'n/a' if peak is None else f'{peak:.2f}'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        sys.exit(print_user_error(err))
