"""Predict with trained checkpoints.

    python infer.py --checkpoint RUN_DIR_OR_CHECKPOINT [--checkpoint ...] [--data DIR --out FILE]
                    [--tta flip] [--batch-size N] [--num-workers W] [--save-predictions FILE.npy]
                    [key=value ...]

A run directory means its best checkpoint; several --checkpoint are averaged into one ensemble.
With --data, the task predicts for that folder (gwi: a test folder -> the Kaggle submission CSV at
--out; a labelled folder -> MAE overall and per family, and with --save-predictions the
predictions as .npy). Without --data, the ensemble is evaluated on the validation data of the
first checkpoint's config (key=value overrides change it). Results are printed as JSON.
"""
import argparse
import sys

from harness.config import UserError, user_message
from harness.inference import evaluate_checkpoints, predict_folder, print_json


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], usage=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", action="append", required=True, help="run directory or checkpoint directory; repeat to ensemble")
    parser.add_argument("--data", help="folder to predict for (task-specific)")
    parser.add_argument("--out", help="output file for --data (gwi: submission.csv)")
    parser.add_argument("--tta", choices=["none", "flip"], default="none", help="flip: average with the mirrored sample's prediction")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--save-predictions", help="labelled --data: also save the predictions (.npy)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the checkpoint's config")
    args = parser.parse_args(argv)
    try:
        if args.data:
            result = predict_folder(args.checkpoint, args.data, args.out, args.tta, args.batch_size, args.num_workers,
                                    args.save_predictions, args.overrides)
        else:
            result = evaluate_checkpoints(args.checkpoint, args.overrides, args.batch_size)
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2
    print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
