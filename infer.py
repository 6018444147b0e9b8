"""Predict with trained checkpoints: `python infer.py --checkpoint RUN_DIR_OR_CHECKPOINT [...] [key=value ...]`.

A run directory means its best checkpoint. Several --checkpoint are averaged into one ensemble.
Without further options the ensemble is evaluated on the validation data of the first checkpoint's
config (overrides such as data.num_val=... change it) and the metrics are printed as JSON.
"""
import argparse
import sys

from harness.config import UserError
from harness.inference import evaluate_checkpoints, print_json


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="run directory or checkpoint directory; repeat to ensemble")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("overrides", nargs="*", help="key=value changes to the checkpoint's config (data only, usually)")
    args = parser.parse_args(argv)
    try:
        print_json(evaluate_checkpoints(args.checkpoint, args.overrides, args.batch_size))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
