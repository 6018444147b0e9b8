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

`--online` (gwi recipes): the training data are online draws instead (gwi/online.py:
`data.source=online`, all five A families, affine / crop-resize / blend augmentation), each batch
simulated on the training device before the model sees it, and the line adds the median of the
loop's train/simulation_share (the share of the wall time spent simulating) and
train/simulated_per_s: whether the simulator keeps up with the recipe.

    python bench/recipe_throughput.py configs/gwi/unet.yaml [--steps 200] [--batches-per-epoch 10] [--online] [key=value ...]
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
ONLINE_FAMILIES = ("FlatVel_A", "CurveVel_A", "FlatFault_A", "CurveFault_A", "Style_A")  # --online's draws


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates")
    parser.add_argument("--batches-per-epoch", type=int, default=10, help="generated training data, in batches")
    parser.add_argument("--online", action="store_true", help="gwi: train on online draws simulated on the device")
    parser.add_argument("overrides", nargs="*", help="further key=value overrides")
    args = parser.parse_intermixed_args()
    if args.steps < 5 * LOG_EVERY or args.batches_per_epoch < 1:
        raise UserError(f"--steps must be at least {5 * LOG_EVERY} and --batches-per-epoch positive")

    recipe = load_config(args.config, args.overrides)
    batch = recipe.trainer.batch_size
    if args.online and recipe.task != "gwi":
        raise UserError(f"--online: {args.config} is a {recipe.task} recipe; online draws are gwi's")
    data = (["data.source=online", "data.fold=null", f"data.families=[{','.join(ONLINE_FAMILIES)}]",
             "data.online_augment=[affine,crop_resize,blend]"] if args.online else ["data.source=synthetic"])
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [
            *args.overrides, f"output_dir={out}", "resume=never", *data,
            f"data.num_train={batch * args.batches_per_epoch}", f"data.num_val={recipe.trainer.eval_batch_size or batch}",
            f"trainer.max_steps={args.steps}", "trainer.eval_every_epochs=0",
            "log.wandb=disabled", "log.progress=none", "log.plot=false", f"log.every_steps={LOG_EVERY}",
        ])
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        train(cfg)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").open()]

    def steady_median(key: str) -> float:
        values = [record[key] for record in records if key in record]
        return statistics.median(values[len(values) // 5:])

    device = torch.cuda.get_device_name() if cuda else "cpu"
    online = (f" online=1 simulation_share={steady_median('train/simulation_share'):.3f} "
              f"simulated_per_s={steady_median('train/simulated_per_s'):.1f}") if args.online else ""
    print(f"recipe={args.config} batch={batch} steps={args.steps} device={device!r} "
          f"samples_per_s={steady_median('train/samples_per_s'):.1f} peak_gib={'n/a' if peak is None else f'{peak:.2f}'}{online}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        sys.exit(print_user_error(err))
