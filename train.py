"""Train any task: `python train.py [CONFIG.yaml] [key=value | --key=value ...]`.

Works the same under `accelerate launch` with any number of processes. With no CONFIG it runs
configs/default.yaml. `python train.py --help` lists every config key with its default.
"""
import sys

from harness.cli import run_cli
from harness.crossval import train


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:], train, __doc__))
