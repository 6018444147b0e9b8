"""Predict with trained checkpoints.

    python infer.py --checkpoint RUN_DIR_OR_CHECKPOINT [--checkpoint ...] [--data DIR --out FILE]
                    [--tta flip|hflip|scale|flip+scale] [--batch-size N] [--num-workers W] [--save-predictions FILE]
                    [--sample-submission FILE] [--probabilities]
                    [--physics-misfit] [--refine-steps N [--refine-tv LAMBDA] [--refine-lr LR]]
                    [--physics-batch-size N] [--physics-csv FILE] [key=value ...]

A run directory means its best checkpoint; several --checkpoint are averaged into one ensemble.
With --data, the task predicts for that folder (gwi: a test folder -> the Kaggle submission CSV at
--out; a labelled folder -> MAE overall and per family, and with --save-predictions the
predictions as .npy; cnn: a folder of images or a CSV of ids -> the submission CSV at --out, in
--sample-submission's header and id order, class names or with --probabilities one column per class;
a folder of class folders or a labelled CSV -> accuracy, log-loss, per class, confusion matrix, and with
--save-predictions FILE.csv|.npy the predictions and FILE_confusion.png). Without --data, the ensemble is evaluated on the validation data of the
first checkpoint's config (key=value overrides change it), as training evaluated it (no TTA);
--tta, --out, --save-predictions and --num-workers act on --data only and are refused without it.
Results are printed as JSON.

Physics (gwi, with --data; gwi/physics/fwi.py), on the GPU when there is one: --physics-misfit
re-simulates every predicted map and reports the normalised misfit ||F(v) - d|| / ||d|| against
the file's seismic (mean in the JSON, per sample in --physics-csv, by default <out>_physics.csv
next to --out). --refine-steps N first refines the maps by N steps of full-waveform inversion
(Adam on the misfit + LAMBDA * total variation, within [1500, 4500] m/s); the refined maps are
written / scored, and the misfit before and after is reported. Slow: ~10-30 s per map and step
on a CPU.
"""
import sys
from pathlib import Path

from harness.errors import ArgumentParser, UserError, number, print_user_error
from harness.inference import evaluate_checkpoints, predict_folder, print_json

NUM_WORKERS = 2  # DataLoader workers reading --data
DATA_ONLY = ("tta", "out", "save_predictions", "num_workers", "sample_submission", "probabilities")  # flags that act on --data only


def check_data_flags(args) -> None:
    """A flag that would do nothing is an error, not ignored: the --data flags without --data."""
    if args.data:
        return
    given = [name for name in DATA_ONLY if getattr(args, name) not in (None, "none", False)]
    if given:
        flags = " / ".join(f"--{name.replace('_', '-')}" for name in given)
        raise UserError(f"{flags}: {'it acts' if len(given) == 1 else 'they act'} only with --data DIR (without "
                        "--data the ensemble is evaluated on the run's validation data as in training, without TTA)")


def physics_options(args) -> dict | None:
    """The physics flags as the task's options (gwi.submission.PhysicsOptions, which checks their
    values and holds the defaults), or None when none was asked for; the per-sample CSV defaults
    to <out>_physics.csv next to --out. A flag that would do nothing is an error, not ignored."""
    if not args.refine_steps and (args.refine_tv is not None or args.refine_lr is not None):
        raise UserError("--refine-tv / --refine-lr: they only act with --refine-steps N")
    if not (args.physics_misfit or args.refine_steps):
        if args.physics_batch_size is not None or args.physics_csv is not None:
            raise UserError("--physics-batch-size / --physics-csv: they only act with --physics-misfit or --refine-steps")
        return None
    csv = args.physics_csv
    if csv is None and args.out:
        out = Path(args.out)
        csv = str(out.with_name(out.stem + "_physics.csv"))
    options = {"misfit": args.physics_misfit, "refine_steps": args.refine_steps, "refine_tv": args.refine_tv,
               "refine_lr": args.refine_lr, "batch_size": args.physics_batch_size, "csv": csv}
    return {key: value for key, value in options.items() if value is not None}


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__.strip().splitlines()[0], usage=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", action="append", required=True, help="run directory or checkpoint directory; repeat to ensemble")
    parser.add_argument("--data", help="folder to predict for (task-specific)")
    parser.add_argument("--out", help="output file for --data (gwi: submission.csv)")
    parser.add_argument("--tta", choices=["none", "flip", "hflip", "scale", "flip+scale"], default="none",
                        help="gwi flip / cnn hflip: average with the mirrored sample's prediction; gwi scale: the median of the "
                             "predictions from the seismic made that of a few scaled velocities, each divided by its factor "
                             "(gwi/scaling.py); flip+scale: both")
    parser.add_argument("--batch-size", type=number(int, 1), default=None)
    parser.add_argument("--num-workers", type=number(int, 0), default=None, help=f"DataLoader workers reading --data (default {NUM_WORKERS})")
    parser.add_argument("--save-predictions", help="labelled --data: also save the predictions (.npy; cnn also .csv); refused for a test folder")
    parser.add_argument("--sample-submission", metavar="FILE", help="cnn: the answer takes this CSV's header and id order")
    parser.add_argument("--probabilities", action="store_true", help="cnn: one probability column per class instead of the class name")
    physics = parser.add_argument_group("physics (gwi, with --data)")
    physics.add_argument("--physics-misfit", action="store_true", help="report the normalised seismic misfit of the maps")
    physics.add_argument("--refine-steps", type=number(int, 0), default=0, metavar="N",
                         help="FWI steps from the network's maps (0: none)")
    physics.add_argument("--refine-tv", type=number(float, 0), metavar="LAMBDA",
                         help="weight of the total variation (default 1; with 0 the misfit falls but the MAE rose in our tests)")
    physics.add_argument("--refine-lr", type=number(float, 0, strict=True), metavar="LR",
                         help="Adam's step on the map scaled to [0, 1] (default 0.005: 15 m/s)")
    physics.add_argument("--physics-batch-size", type=number(int, 1), metavar="N",
                         help="maps simulated / refined together (default: --batch-size for the misfit; "
                              "refinement 1 on a CPU, 16 on a GPU)")
    physics.add_argument("--physics-csv", metavar="FILE", help="per-sample misfits (default: <out>_physics.csv next to --out)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the checkpoint's config")
    args = parser.parse_args(argv)
    try:
        check_data_flags(args)
        physics = physics_options(args)
        if args.data:
            num_workers = NUM_WORKERS if args.num_workers is None else args.num_workers
            options = {name: value for name, value in (("sample_submission", args.sample_submission),
                                                       ("probabilities", args.probabilities)) if value}
            result = predict_folder(args.checkpoint, args.data, args.out, args.tta, args.batch_size, num_workers,
                                    args.save_predictions, args.overrides, physics, options)
        else:
            if physics:
                raise UserError("--physics-misfit / --refine-steps: give --data (a folder of seismic to simulate against)")
            result = evaluate_checkpoints(args.checkpoint, args.overrides, args.batch_size)
    except UserError as err:
        return print_user_error(err)
    print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
