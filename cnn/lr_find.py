"""Learning-rate range test for a classification config (the harness's LR finder, harness/lr_find.py):

    python -m cnn.lr_find CONFIG [key=value ...] [--start-lr 1e-7] [--end-lr 10] [--steps 100]
                          [--beta 0.98] [--diverge 4]

e.g. `python -m cnn.lr_find configs/cnn/mnist_tiny.yaml data.root=/path/with/MNIST/raw`. Prints the
suggested lr (steepest descent of the smoothed loss) and minimum-loss lr / 10, and writes
`<output_dir>/lr_find.png` and `<output_dir>/lr_find.csv`; nothing of a training run in output_dir
is touched. With a one-cycle schedule optim.lr is the peak: the suggestion is a starting point for it.
"""
import sys
from pathlib import Path

from harness import lr_find

PROG = "python -m cnn.lr_find"
CNN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smoke" / "cnn.yaml"  # for --help's key table


def main(argv: list[str]) -> int:
    # A CONFIG is required: without one the harness would fall back to configs/default.yaml, a gwi run.
    if not argv or "=" in argv[0] or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        print(f"error: give a config file first: {PROG} CONFIG [key=value ...] (e.g. configs/cnn/mnist_tiny.yaml)",
              file=sys.stderr)
        return 2
    if argv in (["-h"], ["--help"]):
        argv = [argv[0], str(CNN_CONFIG)]
    return lr_find.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
