"""Writing the Kaggle submission: gwi's bulk writer (numpy formats every value at once, fixed
width) against a straightforward pandas writer (a dict per CSV row, then DataFrame.to_csv), for
the same predictions. Both outputs are checked to hold the same numbers (to the 0.1 m/s written).
The last line is `speedup=<pandas seconds / ours>`.

    python bench/submission_writer.py [--files 2000]     (the real test set has 65,818 files)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gwi.submission import HEADER, ODD_COLUMNS, format_rows, validate_submission  # noqa: E402


def ours(ids, velocity, path: Path) -> float:
    start = time.perf_counter()
    with open(path, "wb") as handle:
        handle.write(HEADER.encode())
        for first in range(0, len(ids), 64):  # the batches inference produces
            handle.write(format_rows(ids[first:first + 64], velocity[first:first + 64]))
    return time.perf_counter() - start


def pandas_rows(ids, velocity, path: Path) -> float:
    import pandas as pd

    start = time.perf_counter()
    rows = []
    for file_id, sample in zip(ids, velocity):
        for y in range(70):
            row = {"oid_ypos": f"{file_id}_y_{y}"}
            for x in ODD_COLUMNS:
                row[f"x_{x}"] = float(sample[y, x])
            rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False, float_format="%.1f")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ids = [f"{i:010x}" for i in rng.choice(2**40, args.files, replace=False)]
    velocity = rng.uniform(1500, 4500, (args.files, 70, 70)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ours_path, pandas_path = Path(tmp) / "ours.csv", Path(tmp) / "pandas.csv"
        seconds = {"ours": ours(ids, velocity, ours_path), "pandas": pandas_rows(ids, velocity, pandas_path)}
        start = time.perf_counter()
        validate_submission(ours_path, ids)
        validation = time.perf_counter() - start
        a = np.loadtxt(ours_path, delimiter=",", skiprows=1, usecols=range(1, 36))
        b = np.loadtxt(pandas_path, delimiter=",", skiprows=1, usecols=range(1, 36))
        assert np.abs(a - b).max() <= 0.1 + 1e-9, "the two writers disagree"
    rows = args.files * 70
    for name, value in seconds.items():
        print(f"{name:7s} {value:7.2f} s for {args.files} files ({rows} rows): {rows / value:,.0f} rows/s; "
              f"65,818 files would take about {value / args.files * 65818:,.0f} s")
    print(f"validation of ours: {validation:.2f} s ({validation / args.files * 65818:,.0f} s at 65,818 files)")
    print(f"speedup={seconds['pandas'] / seconds['ours']:.1f}")


if __name__ == "__main__":
    main()
