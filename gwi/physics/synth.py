"""Generate OpenFWI-layout training data with the OpenFWI-exact forward model.

    python -m gwi.physics.synth --family FlatVel_A --n 2000 --out data/synth [--seed 0] [--workers 2]
    python -m gwi.physics.synth --from-velocity ../shared/data/openfwi-velocity/FlatVel_A/model --out data/sim

Writes `OUT/<Family>/data/dataK.npy` (n, 5, 1000, 70) seismic and `OUT/<Family>/model/modelK.npy`
(n, 1, 70, 70) velocity, float32 (`--float16`: seismic in float16), 500 samples a file (the last
one smaller), K = 1, 2, ... the layout `gwi.layout` reads. `--exact-flip` adds a 6th source at
x = 35, the mirror of the middle one (n, 6, 1000, 70): the training reader then flips those
samples exactly (see gwi.layout.EXACT_FLIP_SOURCE_X).

- Generated maps (`--family`): sample j (0-based over the whole run) is drawn from a generator
  seeded with (seed, family, j), so shard K holds the same maps whatever --workers, batch size or
  device, and a larger --n only appends shards (the last shard grows if it was partial). The
  seismic is then the same bits for any --workers / --batch-size / --threads on the CPU (the
  simulator's fast path is exact and batch-independent); on a GPU it agrees to float32 rounding.
- `--from-velocity PATH` (a .npy file or a folder of them, (n, 1, nz, nx) or (n, nz, nx) in m/s):
  simulates those maps instead, one output shard per input file (modelK.npy keeps its K; other
  names are numbered in sorted order); the family defaults to the folder above `model/`.
- Resumable: a shard whose two files exist with the expected shapes and dtypes is skipped; every
  file is written to a temporary name and renamed, so an interrupted run leaves no partial file.
  Run the same command again to finish it. The same shard writer (`is_written`, `simulate_shard`,
  `write_shard`) makes the simulated data source's cache (gwi/simulated.py).
- Many processes, GPUs or machines: under a launcher that sets RANK and WORLD_SIZE (`accelerate
  launch`, torchrun) each process takes every WORLD_SIZE-th shard of the run, starting at its
  RANK, on cuda:LOCAL_RANK for `--device cuda`:
      accelerate launch --multi_gpu --num_processes 8 -m gwi.physics.synth --family FlatVel_A --n 1000000 --out data/synth --device cuda
  The shards are independent and each is written atomically, so the processes never talk to each
  other (no process group, no barrier) and the files are the same bits as a one-process run's;
  the split is by shard number, not by what is left to do, so processes started at different
  times (or rerun after an interruption) agree on it, and a rerun finishes each rank's missing
  shards. Several machines need one shared --out (or their folders merged afterwards).
- Bad arguments or input files stop with a one-line message naming them, exit code 2.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gwi.layout import MAP_SIZE, SOURCE_X, TIME_STEPS, npy_writer
from gwi.physics.acoustic import EXACT_FLIP_SOURCES, OPENFWI_SOURCES, forward_model
from gwi.physics.velocity import FAMILIES, generate
from harness.errors import RUN_FAILED_EXIT, ArgumentParser, UserError, print_user_error

PER_FILE = 500
# The end of the message for a file this command did not write for these arguments.
FOREIGN_FILE = "written with other settings? remove it or choose another --out"


@dataclass(frozen=True)
class Shard:
    index: int  # K in dataK.npy / modelK.npy
    count: int  # samples
    start: int = 0  # generated maps: global index of the first sample
    source: str | None = None  # --from-velocity: the input file


@dataclass(frozen=True)
class ShardFile:
    """One file a shard writes, and the shape and dtype it must have."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype


def _family_seed(family: str) -> int:
    return zlib.crc32(family.encode())


def shard_velocity(family: str, seed: int, shard: Shard) -> np.ndarray:
    """The shard's maps, float32 (count, 1, nz, nx)."""
    if shard.source is not None:
        maps = np.load(shard.source, mmap_mode="r")[:shard.count]
        return np.array(maps.reshape(len(maps), 1, *maps.shape[-2:]), dtype=np.float32)  # a writable copy
    return np.concatenate([generate(family, 1, np.random.default_rng([seed, _family_seed(family), j]))
                           for j in range(shard.start, shard.start + shard.count)])


def openfwi_files(out: Path, family: str, shard: Shard, seismic_dtype, nt: int = TIME_STEPS,
                  map_shape: tuple[int, int] = (MAP_SIZE, MAP_SIZE), sources: int = len(SOURCE_X)) -> list[ShardFile]:
    """A shard in the OpenFWI layout: OUT/<family>/data/dataK.npy (count, sources, nt, nx) seismic in
    `seismic_dtype`, then OUT/<family>/model/modelK.npy (count, 1, nz, nx) float32 velocity."""
    nz, nx = map_shape
    return [ShardFile(out / family / "data" / f"data{shard.index}.npy", (shard.count, sources, nt, nx), np.dtype(seismic_dtype)),
            ShardFile(out / family / "model" / f"model{shard.index}.npy", (shard.count, 1, nz, nx), np.dtype(np.float32))]


def is_written(files: list[ShardFile], foreign: str, regrow: bool = False) -> bool:
    """Whether a shard is complete: every one of its files there with its shape and dtype (headers
    only: milliseconds). A missing or unreadable (damaged) file: not written, simulate the shard
    again. A file of another shape or dtype was written with other settings: a UserError naming it
    and ending in `foreign` (what to do), never overwritten; except, with `regrow`, one that differs
    only in its sample count (the partial last shard of a smaller --n), simulated again at its size."""
    for file in files:
        if not file.path.is_file():
            return False
        try:
            found = np.load(file.path, mmap_mode="r")
        except (ValueError, OSError, EOFError):
            return False
        if regrow and found.shape[1:] == file.shape[1:] and found.shape[0] != file.shape[0]:
            return False
        if found.shape != file.shape:
            raise UserError(f"{file.path} exists with shape {found.shape}, expected {file.shape}; {foreign}")
        if found.dtype != file.dtype:
            raise UserError(f"{file.path} exists with dtype {found.dtype}, expected {file.dtype}; {foreign}")
    return True


def simulate_shard(family: str, seed: int, shard: Shard, nt: int = TIME_STEPS, batch_size: int = 8, device="cpu",
                   progress=None, sources=OPENFWI_SOURCES) -> tuple[np.ndarray, np.ndarray]:
    """(seismic float32 (count, S, nt, nx), velocity float32 (count, 1, nz, nx)) of the shard's maps,
    simulated `batch_size` at a time on `device` with `sources` (S of them: OpenFWI's 5, or
    EXACT_FLIP_SOURCES); `progress(k)` after each batch of k maps."""
    velocity = shard_velocity(family, seed, shard)
    parts = []
    for start in range(0, len(velocity), batch_size):
        maps = torch.from_numpy(velocity[start:start + batch_size]).to(device)
        parts.append(forward_model(maps, nt=nt, sources=sources).cpu().numpy())
        if progress is not None:
            progress(len(maps))
    return np.concatenate(parts), velocity


def write_shard(files: list[ShardFile], arrays) -> None:
    """Each array into its file, in the file's dtype, in order, each under a temporary name renamed
    into place (`npy_writer`): an interrupted run leaves no partial file, and a shard whose last file
    is there is complete."""
    if len(files) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for {len(files)} files")
    for file, array in zip(files, arrays):
        with npy_writer(file.path, file.dtype, np.shape(array)) as target:
            target[...] = array


def job_files(job: dict, shard: Shard) -> list[ShardFile]:
    """The files of one of this command's shards."""
    map_shape = np.load(shard.source, mmap_mode="r").shape[-2:] if shard.source is not None else (MAP_SIZE, MAP_SIZE)
    return openfwi_files(Path(job["out"]), job["family"], shard, np.float16 if job["float16"] else np.float32, job["nt"], map_shape,
                         len(job_sources(job)))


def job_sources(job: dict) -> tuple:
    """The sources this command simulates: OpenFWI's 5, or with --exact-flip the 6 of EXACT_FLIP_SOURCES."""
    return EXACT_FLIP_SOURCES if job["exact_flip"] else OPENFWI_SOURCES


def _exit_with_parent() -> None:
    """In a worker process: end this process as soon as its parent is gone. A killed parent
    (SIGKILL, or SIGTERM's default) runs no clean-up, and its spawned workers would otherwise
    simulate on for minutes. The parent's sentinel becomes ready when the parent exits."""
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True, name="exit-with-parent").start()


def write_shards(job: dict, shards: list[Shard], progress) -> None:
    for shard in shards:
        seismic, velocity = simulate_shard(job["family"], job["seed"], shard, nt=job["nt"], batch_size=job["batch_size"],
                                           device=job["device"], progress=progress, sources=job_sources(job))
        write_shard(job_files(job, shard), [seismic, velocity])


def _worker(job: dict, shards: list[Shard], threads: int, queue) -> None:
    _exit_with_parent()
    torch.set_num_threads(threads)
    write_shards(job, shards, queue.put)


def _from_velocity_shards(path: Path, limit: int | None) -> list[Shard]:
    if not path.exists():
        raise UserError(f"--from-velocity {path}: no such file or folder")
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"--from-velocity {path}: no .npy files in it")
    numbered = [re.fullmatch(r"model(\d+)\.npy", f.name) for f in files]
    if all(numbered):
        indices = [int(m.group(1)) for m in numbered]
        files = [f for _, f in sorted(zip(indices, files))]
        indices = sorted(indices)
    else:
        indices = list(range(1, len(files) + 1))
    shards, total = [], 0
    for index, file in zip(indices, files):
        try:
            maps = np.load(file, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"{file}: not a readable .npy file ({err})") from None
        if maps.ndim not in (3, 4) or (maps.ndim == 4 and maps.shape[1] != 1) or maps.shape[0] == 0:
            raise UserError(f"{file}: shape {maps.shape}, expected (n, 1, nz, nx) or (n, nz, nx) velocity maps")
        if maps.dtype.kind != "f":
            raise UserError(f"{file}: dtype {maps.dtype}, expected floating point velocities in m/s")
        count = len(maps) if limit is None else min(len(maps), limit - total)
        if count <= 0:
            break
        low, high = float(np.min(maps[:count])), float(np.max(maps[:count]))
        if not (np.isfinite(low) and np.isfinite(high)) or low < 300 or high > 6000:
            raise UserError(f"{file}: velocities in [{low:g}, {high:g}]; expected finite values in m/s (300 - 6000)")
        shards.append(Shard(index, count, source=str(file)))
        total += count
    return shards


def _family_from_path(path: Path) -> str:
    folder = path if path.is_dir() else path.parent
    return folder.parent.name if folder.name == "model" else folder.name


def plan(args) -> tuple[dict, list[Shard]]:
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    for name in ("per_file", "workers", "batch_size", "nt"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a folder")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available here")
    elif args.device != "cpu":
        raise UserError(f"--device {args.device}: expected cpu or cuda[:N]")
    if args.from_velocity is not None:
        shards = _from_velocity_shards(args.from_velocity, args.n)
        family = args.family or _family_from_path(args.from_velocity)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", family):
            raise UserError(f"--family {family!r}: use letters, digits, '_', '-' or '.'")
    else:
        if args.family is None or args.n is None:
            raise UserError("--family and --n are required (or --from-velocity PATH)")
        if args.family not in FAMILIES:
            raise UserError(f"--family {args.family!r}: unknown; known: {', '.join(FAMILIES)}")
        family = args.family
        shards = [Shard(k + 1, min(args.per_file, args.n - start), start)
                  for k, start in enumerate(range(0, args.n, args.per_file))]
    job = dict(family=family, seed=args.seed, out=str(args.out), nt=args.nt, float16=args.float16,
               batch_size=args.batch_size, device=args.device, exact_flip=args.exact_flip)
    return job, shards


def launcher_ranks() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this machine) from the launcher's environment
    (torchrun and accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); (0, 1, 0,
    1) when run alone."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None), ("LOCAL_WORLD_SIZE", None)):
        text = os.environ.get(name)
        try:
            values[name] = default if text is None or text == "" else int(text)
        except ValueError:
            raise UserError(f"environment variable {name}={text!r}: expected an integer") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"environment variables RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    local_rank = rank if values["LOCAL_RANK"] is None else values["LOCAL_RANK"]
    local_world = world if values["LOCAL_WORLD_SIZE"] is None else values["LOCAL_WORLD_SIZE"]
    return rank, world, local_rank, max(1, local_world)


def run(args) -> list[Shard]:
    """Simulate the shards not yet written (this process's share under a launcher); returns those
    it wrote."""
    rank, world, local_rank, local_world = launcher_ranks()
    job, shards = plan(args)
    if world > 1 and job["device"] == "cuda":
        job["device"] = f"cuda:{local_rank}"  # one GPU per process
    shards = shards[rank::world]  # by shard number: every process, started whenever, agrees on the split
    out = Path(job["out"])
    todo = [s for s in shards if not is_written(job_files(job, s), FOREIGN_FILE, regrow=True)]
    total = sum(s.count for s in todo)
    who = f" (process {rank} of {world}, {job['device']})" if world > 1 else ""
    print(f"{job['family']}{who}: {len(shards) - len(todo)} of {len(shards)} shards already written; "
          f"simulating {total} samples into {out / job['family']}", file=sys.stderr)
    if not todo:
        return []
    workers = min(args.workers, len(todo))
    cores = max(1, (os.cpu_count() or 1) // local_world)  # this process's share of the machine
    with tqdm(total=total, unit="sample", desc=job["family"], file=sys.stderr, disable=rank != 0) as bar:
        if workers == 1:
            torch.set_num_threads(max(1, args.threads or cores))
            write_shards(job, todo, bar.update)
        else:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            threads = args.threads or max(1, cores // workers)
            procs = [ctx.Process(target=_worker, args=(job, todo[w::workers], threads, queue)) for w in range(workers)]
            for p in procs:
                p.start()
            done = 0
            while done < total:
                try:
                    k = queue.get(timeout=1.0)
                except Exception:  # queue.Empty: check that the workers are alive
                    if not any(p.is_alive() for p in procs):
                        break
                    continue
                done += k
                bar.update(k)
            for p in procs:
                p.join()
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed:
                raise RuntimeError(f"{len(failed)} worker(s) failed (exit codes {failed}); run the command again to resume")
    return todo


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gwi.physics.synth", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--family", help="FlatVel_A, ..., Style_B (with --from-velocity: the output family name)")
    parser.add_argument("--n", type=int, help="samples to generate (with --from-velocity: at most this many)")
    parser.add_argument("--out", type=Path, required=True, help="root folder; <Family>/data, <Family>/model go under it")
    parser.add_argument("--float16", action="store_true", help="write the seismic as float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes, each simulating whole shards")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--from-velocity", type=Path, help="simulate these velocity .npy files (a file or a folder)")
    parser.add_argument("--batch-size", type=int, default=8, help="maps simulated together")
    parser.add_argument("--per-file", type=int, default=PER_FILE, help="samples per shard file")
    parser.add_argument("--exact-flip", action="store_true",
                        help="also simulate the mirrored middle source (x = 35): (n, 6, nt, nx) seismic that the flip "
                             "augmentation mirrors exactly (the reader keeps the 5 OpenFWI sources)")
    parser.add_argument("--nt", type=int, default=TIME_STEPS, help=f"time samples per trace (OpenFWI: {TIME_STEPS})")
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as err:
        return print_user_error(err)
    except RuntimeError as err:  # a worker failed: the run can be resumed
        print(f"error: {err}", file=sys.stderr)
        return RUN_FAILED_EXIT
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
