"""Convert a tree of OpenFWI / Kaggle training data to float16 seismic in the same layout.

    python -m gwi.convert SRC DST

Seismic becomes float16 (half the disk and the page cache; OpenFWI amplitudes, |x| < 100, keep
about 3 significant digits); velocity maps stay float32 (they are 1.4 % of the bytes, and float16
would round 4000 m/s to steps of 4 m/s). Every file is written to a temporary name and renamed, so
an interrupted conversion resumes where it stopped: run the same command again. `DST/manifest.json`
is written last (families, file pairs, sample counts, min/max) and marks a finished conversion;
a finished DST is never overwritten. Velocities outside [1500, 4500] m/s are refused before anything
is written, non-finite values when their file is converted; both errors name the file and sample.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gwi.layout import MANIFEST, find_pairs, npy_writer
from harness.errors import ArgumentParser, UserError, print_user_error
from harness.files import write_text_atomic

CHUNK = 50  # samples converted at a time: bounds memory to ~70 MB whatever the file size
FLOAT16_MAX = float(np.finfo(np.float16).max)


def convert_array(src: Path, dst: Path, dtype: np.dtype) -> dict:
    """Copy one .npy to `dst` in `dtype`, chunk by chunk; returns its min/max. Refuses non-finite
    values and values float16 cannot hold, naming the file and sample (velocity outside [1500, 4500]
    m/s was refused before, when `find_pairs` found the pair)."""
    source = np.load(src, mmap_mode="r")
    low, high = np.inf, -np.inf
    with npy_writer(dst, dtype, source.shape) as target:
        for start in range(0, len(source), CHUNK):
            chunk = np.asarray(source[start:start + CHUNK], dtype=np.float32)
            finite = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
            if not finite.all():
                raise UserError(f"{src}: sample {start + int(np.argmin(finite))} contains NaN or inf values")
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
            if dtype == np.float16 and max(abs(low), abs(high)) > FLOAT16_MAX:
                raise UserError(f"{src}: values up to {max(abs(low), abs(high)):g} do not fit float16 (max {FLOAT16_MAX:g})")
            target[start:start + len(chunk)] = chunk
    return {"min": low, "max": high}


def convert(src: Path, dst: Path) -> dict:
    src, dst = Path(src), Path(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"DST {dst}: exists and is not a folder; give a new or a partly converted folder")
    if (dst / MANIFEST).exists():
        raise UserError(f"{dst} already holds a finished conversion ({dst / MANIFEST}); refusing to overwrite it")
    if dst.resolve() == src.resolve():
        raise UserError(f"DST {dst} is SRC: convert into another folder")
    pairs = find_pairs([src])
    files = []
    for pair in tqdm(pairs, desc="float16", unit="pair"):
        entry = {"family": pair.family, "samples": pair.samples}
        for kind, path, dtype in (("seismic", pair.seismic, np.float16), ("velocity", pair.velocity, np.float32)):
            relative = path.relative_to(src) if path.is_relative_to(src) else Path(pair.family) / path.name
            out = dst / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            stats_file = out.with_name(out.name + ".stats.json")
            if out.exists() and stats_file.exists():  # converted by an earlier, interrupted run
                stats = json.loads(stats_file.read_text())
            else:
                stats = convert_array(path, out, dtype)
                stats_file.write_text(json.dumps(stats))
            entry[kind] = {"path": str(relative), **stats}
        files.append(entry)
    manifest = {
        "source": str(src.resolve()),
        "seismic_dtype": "float16",
        "velocity_dtype": "float32",
        "families": summarize(files),
        "files": files,
    }
    for stats_file in dst.rglob("*.stats.json"):
        stats_file.unlink()
    write_text_atomic(dst / MANIFEST, json.dumps(manifest, indent=1))  # last: it marks the copy finished
    return manifest


def summarize(files: list[dict]) -> dict:
    """Per family: files, samples, seismic and velocity min / max."""
    families = {}
    for entry in files:
        family = families.setdefault(entry["family"], {"files": 0, "samples": 0, "seismic_min": np.inf, "seismic_max": -np.inf,
                                                       "velocity_min": np.inf, "velocity_max": -np.inf})
        family["files"] += 1
        family["samples"] += entry["samples"]
        for kind in ("seismic", "velocity"):
            family[f"{kind}_min"] = min(family[f"{kind}_min"], entry[kind]["min"])
            family[f"{kind}_max"] = max(family[f"{kind}_max"], entry[kind]["max"])
    return families


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m gwi.convert", description=__doc__.strip().splitlines()[0])
    parser.add_argument("src", type=Path, help="a folder of family folders (or one family folder)")
    parser.add_argument("dst", type=Path, help="where the float16 copy goes (created; resumed if interrupted)")
    args = parser.parse_args(argv)
    try:
        manifest = convert(args.src, args.dst)
    except UserError as err:
        return print_user_error(err)
    for name, family in manifest["families"].items():
        print(f"{name:14s} {family['files']:4d} files {family['samples']:7d} samples  seismic [{family['seismic_min']:.4g}, "
              f"{family['seismic_max']:.4g}]  velocity [{family['velocity_min']:.0f}, {family['velocity_max']:.0f}]")
    print(f"wrote {args.dst / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
