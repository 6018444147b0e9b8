"""`python -m gwi.kaggle bundle ...`: the offline Kaggle bundle of a gwi run, the command's earlier name.
It is `python -m harness.kaggle bundle ...` (harness/kaggle.py), which serves every task; the same
arguments, the same bundle."""
from __future__ import annotations

import sys

from harness.kaggle import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m gwi.kaggle"))
