"""Do pseudo-labels on an unseen family lower its error? A model trained on simulated FlatVel_A only
predicts a simulated CurveVel_A "test" set (Kaggle layout, no maps), `python -m gwi.pseudo` turns
its predictions into re-simulated pairs, and the model is fine-tuned on its training set plus those
pairs; against it, the same fine-tuning on the training set plus as many fresh FlatVel_A samples.
Validation is a labelled CurveVel_A set (other maps than the test set's) throughout.

    python bench/pseudo_labels.py [--work data/bench_pseudo] [--train 160] [--test 48] [--val 48]
                                  [--epochs 12] [--finetune-epochs 4] [--tta flip] [--max-misfit M] [--loop]

Data is simulated once into --work (FlatVel_A maps 0..train-1 train, the next `test` ones are the
fresh samples; CurveVel_A maps 0..val-1 validate, the next `test` ones are the test set) and reused.
Fine-tuning resumes the FlatVel_A run's `last` checkpoint (optimizer and EMA included, a constant
learning rate) with the new data roots, so both arms start from the same state and make the same
number of updates. Printed: val MAE on CurveVel_A (the EMA weights, at the end of each run) before
and after each fine-tuning; the last line is `pseudo_vs_fresh_ratio=<MAE after pseudo-labels / MAE
after fresh FlatVel_A>` (below 1: the pseudo-labels helped more).

`--max-misfit M` keeps only the pseudo-labels whose misfit is at most M (gwi.pseudo's filter; the
pseudo arm then adds fewer samples than the fresh one). `--loop` adds a third arm, 1st place's loop
in training: the same fine-tuning with `data.pseudo_dir` on the test set, a new round from the EMA
weights at the start of every fine-tuning epoch, each sample replaced by a pseudo-labelled one with
probability test / (train + test) (the pseudo arm's share; its epochs keep the training set's
length, so it makes fewer updates), printed as `loop_vs_fresh_ratio=` before the last line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gwi.layout import MANIFEST, SEISMIC_SAMPLE_SHAPE  # noqa: E402
from gwi.physics.synth import Shard, is_written, openfwi_files, simulate_shard, write_shard  # noqa: E402
from gwi.pseudo import main as pseudo_main  # noqa: E402
from gwi.simulated import TRAIN_SEISMIC_DTYPE  # noqa: E402
from harness.config import load_config  # noqa: E402
from harness.loop import train  # noqa: E402
from harness.tracking import read_metrics  # noqa: E402

SEED = 0
COMMON = ["task=gwi", "seed=0", "trainer.batch_size=16", "trainer.grad_clip=1.0", "trainer.eval_every_epochs=1",
          "optim.name=adamw", "optim.lr=2e-3", "optim.weight_decay=1e-4", "sched.name=constant", "ema.enabled=true",
          "ema.decay=0.99", "checkpoint.monitor=val/mae", "checkpoint.mode=min", "log.wandb=disabled", "log.plot=false",
          "log.progress=none", "log.every_steps=50", "data.source=files", "data.time_steps=200", "data.flip=true",
          "model.name=inversionnet", "model.width=0.25"]


def simulated(folder: Path, family: str, start: int, count: int, test_layout: bool = False) -> Path:
    """Maps start..start+count-1 of the family's stream (gwi.physics.synth's), simulated into
    `folder` in the OpenFWI layout, or one <i>.npy seismic file per map (the Kaggle test layout)."""
    shard = Shard(1, count, start)
    files = openfwi_files(folder, family, shard, TRAIN_SEISMIC_DTYPE)
    if test_layout:
        if len(list(folder.glob("*.npy"))) == count:
            return folder
    elif is_written(files, "remove --work and run again"):
        return folder
    began = time.perf_counter()
    seismic, velocity = simulate_shard(family, SEED, shard)
    if test_layout:
        folder.mkdir(parents=True, exist_ok=True)
        for i, sample in enumerate(seismic):
            np.save(folder / f"{family}_{start + i:05d}.npy", sample.astype(np.float32).reshape(SEISMIC_SAMPLE_SHAPE))
    else:
        write_shard(files, (seismic, velocity))
    print(f"simulated {count} {family} maps into {folder} in {time.perf_counter() - began:.0f} s", flush=True)
    return folder


def final_mae(run: Path) -> float:
    return [r for r in read_metrics(run) if "val/mae" in r][-1]["val/mae"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "bench_pseudo")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=48)
    parser.add_argument("--val", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--tta", choices=["none", "flip"], default="flip")
    parser.add_argument("--max-misfit", type=float, default=None, help="keep the pseudo-labels whose misfit is at most this")
    parser.add_argument("--loop", action="store_true", help="also fine-tune with data.pseudo_dir (a round every epoch)")
    args = parser.parse_args()
    data = args.work / "data"
    flat = simulated(data / "flat_train", "FlatVel_A", 0, args.train)
    fresh = simulated(data / "flat_fresh", "FlatVel_A", args.train, args.test)
    val = simulated(data / "curve_val", "CurveVel_A", 0, args.val)
    test = simulated(data / "curve_test", "CurveVel_A", args.val, args.test, test_layout=True)

    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    began = time.perf_counter()
    base = runs / "flatvel"
    train(load_config(None, [*COMMON, f"output_dir={base}", f"trainer.epochs={args.epochs}", f"data.roots=[{flat}]",
                             f"data.val_roots=[{val}]"]))
    before = final_mae(base)
    print(f"trained on FlatVel_A ({args.train} maps, {args.epochs} epochs) in {time.perf_counter() - began:.0f} s: "
          f"val MAE on CurveVel_A {before:.1f} m/s", flush=True)

    began = time.perf_counter()
    pseudo = runs / "pseudo_labels"
    filtered = ["--max-misfit", str(args.max_misfit)] if args.max_misfit is not None else []
    if pseudo_main(["--checkpoint", str(base / "checkpoints" / "last"), "--data", str(test), "--out", str(pseudo),
                    "--tta", args.tta, "--num-workers", "0", *filtered]):
        sys.exit("gwi.pseudo failed")
    manifest = json.loads((pseudo / MANIFEST).read_text())
    print(f"pseudo-labelled {args.test} CurveVel_A test files in {time.perf_counter() - began:.0f} s: kept {manifest['kept']}, "
          f"mean misfit {manifest['misfit_mean']:.3f}", flush=True)

    resumed = [f"trainer.epochs={args.epochs + args.finetune_epochs}", f"data.val_roots=[{val}]",
               f"resume={base / 'checkpoints' / 'last'}", "resume_changes=allow"]
    arms = {"pseudo": ([f"data.roots=[{flat}, {pseudo}]"], f"{manifest['kept']} pseudo-labelled CurveVel_A samples"),
            "fresh": ([f"data.roots=[{flat}, {fresh}]"], f"{args.test} fresh FlatVel_A samples")}
    if args.loop:
        arms["loop"] = ([f"data.roots=[{flat}]", f"data.pseudo_dir={test}", "data.pseudo_every_epochs=1",
                         f"data.pseudo_fraction={args.test / (args.train + args.test):.4f}", f"data.pseudo_tta={args.tta}",
                         *([f"data.pseudo_max_misfit={args.max_misfit}"] if args.max_misfit is not None else [])],
                        "pseudo-labels made anew from the EMA weights every epoch")
    after = {}
    for name, (data_keys, what) in arms.items():
        began = time.perf_counter()
        run = runs / f"finetune_{name}"
        train(load_config(None, [*COMMON, f"output_dir={run}", *resumed, *data_keys]))
        after[name] = final_mae(run)
        print(f"fine-tuned on FlatVel_A + {what} ({args.finetune_epochs} epochs) in {time.perf_counter() - began:.0f} s: "
              f"val MAE on CurveVel_A {before:.1f} -> {after[name]:.1f} m/s", flush=True)
    if args.loop:
        print(f"loop_vs_fresh_ratio={after['loop'] / after['fresh']:.3f}")
    print(f"pseudo_vs_fresh_ratio={after['pseudo'] / after['fresh']:.3f}")


if __name__ == "__main__":
    main()
