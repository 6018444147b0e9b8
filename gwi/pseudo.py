"""Pseudo-labels re-simulated from unlabelled seismic (Kaggle 1st place's self-training): a trained
model predicts the maps of a test folder, optionally refines them by full-waveform inversion, keeps
those whose physics misfit ||F(v) - d|| / ||d|| is at most --max-misfit, and writes the pairs
(F(v), v): the seismic is re-simulated from the map, so every pair is physically exact whatever the
map's error, and the set is a training root like any other.

    python -m gwi.pseudo --checkpoint RUN --data TEST_DIR --out DIR [--refine-steps N] [--max-misfit M]
                         [--tta flip|scale|flip+scale] [--batch-size B] [--num-workers W]
    accelerate launch -m gwi.pseudo ...    (every process labels its share of the files)

DIR holds `pseudo/data/dataK.npy` ((n, 5, 1000, 70) float16 seismic, as gwi.convert writes) and
`pseudo/model/modelK.npy` ((n, 1, 70, 70) float32), up to 500 samples a file, and `manifest.json`
(the checkpoint, the settings, and per test file its misfit, whether it was kept and where it went).
DIR appears complete or not at all: it is written under a temporary name and renamed. Under
several processes, file i is labelled by process i mod N (its shards `dataR_K.npy`, R = i mod N + 1)
and the main process writes the one manifest, in file order.

In training, `data.pseudo_dir=TEST_DIR` does the same from the EMA weights (the raw weights when
EMA is off) at the start of every `data.pseudo_every_epochs`-th epoch (k, 2k, ...; not before the
model has trained k epochs) into `<output_dir>/pseudo/epochNNNN/` (every process labels its share
of the files, as under accelerate launch above; the previous round is then removed), and `PseudoMix` serves a pseudo-labelled sample in place of a training sample with
probability `data.pseudo_fraction`, drawn from (seed, epoch, index) like the flip. A resumed run
reads the round on disk; a round can only be made again at the start of its own epoch, where the
weights are those of the `last` checkpoint it was made from, so resume stays exact.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate.state import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from gwi.data import SeismicPairs
from gwi.layout import MANIFEST, VELOCITY_MAX, VELOCITY_MIN, find_pairs, npy_writer, read_manifest
from gwi.online import sample_format
from gwi.physics.acoustic import forward_model
from gwi.physics.fwi import refine, relative_misfit
from gwi.physics.synth import PER_FILE
from gwi.scaling import TTA_MODES
from gwi.submission import REFINE_BATCH_CPU, REFINE_BATCH_CUDA, PhysicsOptions, TestFiles
from harness.errors import ArgumentParser, ConfigError, UserError, number, print_user_error, user_message
from harness.files import write_text_atomic
from harness.inference import load_ensemble, print_json

PSEUDO_FAMILY = "pseudo"  # the family folder of the pairs (a data root's families name its folders)
PSEUDO_FAMILY_INDEX = -1  # the family index PseudoMix gives its samples: none of the run's families
SEISMIC_DTYPE, VELOCITY_DTYPE = np.float16, np.float32  # as gwi.convert writes
_MIX_STREAM = 0x5EED  # keeps PseudoMix's draws apart from the flip's, which use the same (seed, epoch, index)


def label_part(task, model, files: TestFiles, indices: list[int], folder: Path, *, shard_prefix: str = "",
               tta: str = "none", max_misfit: float | None = None, physics: PhysicsOptions = PhysicsOptions(),
               batch_size: int = 8, num_workers: int = 0, device=None, progress: bool = True) -> list[dict]:
    """Pseudo-label the test files `indices` of `files` with `model` through `task.predict`: the kept
    pairs go to `folder`/pseudo/{data,model}/{data,model}<shard_prefix>K.npy, PER_FILE a file.
    Returns a row per file (source, misfit, kept, and where a kept one went), in `indices` order."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Its own generator: an iterator would otherwise draw its seed from the global RNG, and a run
    # that makes a round must continue exactly as one that resumes and reads it.
    loader = DataLoader(Subset(files, indices), batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    task_tta, task.tta = task.tta, tta
    was_training = model.training
    model.eval()
    refine_batch = physics.batch_size or (REFINE_BATCH_CUDA if device.type == "cuda" else REFINE_BATCH_CPU)
    bar = tqdm(total=len(indices), desc="pseudo-label", unit="map", disable=not progress)
    rows, kept_seismic, kept_velocity, shards = [], [], [], 0

    def shard_name(kind: str, number: int) -> str:
        return f"{PSEUDO_FAMILY}/{kind}/{kind}{shard_prefix}{number}.npy"

    def write_shard():
        nonlocal shards
        shards += 1
        for kind, arrays, dtype in (("data", kept_seismic, SEISMIC_DTYPE), ("model", kept_velocity, VELOCITY_DTYPE)):
            with npy_writer(folder / shard_name(kind, shards), dtype, (len(arrays), *arrays[0].shape)) as array:
                array[:] = np.stack(arrays)
        kept_seismic.clear()
        kept_velocity.clear()

    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for seismic, index in loader:
                seismic = seismic.to(device)
                velocity = task.predict(model, (seismic,)).float().clamp(VELOCITY_MIN, VELOCITY_MAX)
                if physics.refine_steps:
                    with torch.enable_grad():
                        velocity = refine(velocity, seismic, physics.refine_steps, tv_weight=physics.refine_tv,
                                          lr=physics.refine_lr, batch_size=refine_batch, device=device)
                simulated = forward_model(velocity, grad=False)
                misfit = relative_misfit(simulated, seismic).cpu()
                for i, file_index in enumerate(index.tolist()):
                    row = {"source": files.paths[file_index].name, "misfit": round(float(misfit[i]), 6)}
                    row["kept"] = max_misfit is None or row["misfit"] <= max_misfit
                    if row["kept"]:
                        row |= {"file": shard_name("data", shards + 1), "row": len(kept_seismic)}
                        kept_seismic.append(simulated[i].cpu().numpy().astype(SEISMIC_DTYPE))
                        kept_velocity.append(velocity[i].cpu().numpy().astype(VELOCITY_DTYPE))
                        if len(kept_seismic) == PER_FILE:
                            write_shard()
                    rows.append(row)
                bar.update(len(index))
        if kept_seismic:
            write_shard()
    finally:
        bar.close()
        model.train(was_training)
        task.tta = task_tta
    return rows


def pseudo_manifest(rows: list[dict], *, source: str, data: Path, tta: str, max_misfit: float | None,
                    physics: PhysicsOptions) -> dict:
    """The manifest.json of a pseudo-label folder: the weights, the settings, the totals and the rows."""
    kept = [row["misfit"] for row in rows if row["kept"]]
    return {"checkpoint": source, "data": str(Path(data).resolve()), "tta": tta, "max_misfit": max_misfit,
            "refine": {"steps": physics.refine_steps, "tv_weight": physics.refine_tv, "lr": physics.refine_lr}
            if physics.refine_steps else None,
            "seismic_dtype": np.dtype(SEISMIC_DTYPE).name, "velocity_dtype": np.dtype(VELOCITY_DTYPE).name,
            "files": len(rows), "kept": len(kept), "dropped": len(rows) - len(kept),
            "misfit_mean": float(np.mean([row["misfit"] for row in rows])),
            "misfit_mean_kept": float(np.mean(kept)) if kept else None, "samples": rows}


def publish(tmp: Path, out: Path, manifest: dict) -> None:
    """The finished folder `tmp` with its manifest, renamed to `out`: it appears complete or not at all
    (an empty folder at `out` is replaced)."""
    tmp.mkdir(parents=True, exist_ok=True)
    write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, out)


def label_folder(task, model, data: Path, out: Path, *, source: str, tta: str = "none", max_misfit: float | None = None,
                 physics: PhysicsOptions = PhysicsOptions(), batch_size: int = 8, num_workers: int = 0, device=None,
                 progress: bool = True) -> dict:
    """Pseudo-label the test folder `data` into `out` (module docstring) with `model` through
    `task.predict`; `source` names the weights in the manifest. Returns the manifest. Under several
    processes (accelerate launch) every process must call it: file i is labelled by process i mod N
    into one shared temporary folder (shards dataR_K.npy), and the main process writes the manifest,
    in file order, and renames the folder into place. Nothing is written before every process has
    arrived, so all of them decided to call it from the same state of the disk."""
    state = PartialState()
    files = TestFiles(data)
    tmp = out.with_name(f".{out.name}.tmp")
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt's
        tmp.mkdir(parents=True)
    state.wait_for_everyone()
    rank, processes = state.process_index, state.num_processes
    try:
        rows, problem = None, None
        try:
            rows = label_part(task, model, files, list(range(rank, len(files), processes)), tmp,
                              shard_prefix="" if processes == 1 else f"{rank + 1}_", tta=tta, max_misfit=max_misfit,
                              physics=physics, batch_size=batch_size, num_workers=num_workers, device=device,
                              progress=progress and state.is_main_process)
        except UserError as err:  # e.g. a malformed file in this process's share: every process stops with it
            problem = user_message(err)
        shares = gather_object([(rows, problem)])  # every process's, in process order: all of them agree
        problems = [problem for _, problem in shares if problem]
        if problems:
            raise UserError(problems[0])
        if state.is_main_process:
            rows = [shares[i % processes][0][i // processes] for i in range(len(files))]  # back in file order
            publish(tmp, out, pseudo_manifest(rows, source=source, data=data, tta=tta, max_misfit=max_misfit, physics=physics))
    finally:
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
    state.wait_for_everyone()
    return read_manifest(out)


def check_pseudo_config(data) -> None:
    """`data.pseudo_dir` needs a test folder, and training seismic of the simulator's full length."""
    if data.source == "synthetic":
        raise ConfigError("key 'data.pseudo_dir': data.source=synthetic's seismic is a cheap surrogate, not the "
                          "simulator's that pseudo-labels carry; use data.source=simulated or files")
    folder = Path(data.pseudo_dir)
    if not folder.is_dir() or not any(folder.glob("*.npy")):
        raise ConfigError(f"key 'data.pseudo_dir': {data.pseudo_dir!r} is not a folder of <id>.npy test files")


def pseudo_pairs(folder: Path, flip: bool, seed: int) -> SeismicPairs | None:
    """The pairs of a pseudo-label folder as a training set (None when every map was dropped)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder}: no {MANIFEST}; not a finished pseudo-label folder")
    if not manifest["kept"]:
        return None
    return SeismicPairs(find_pairs([folder]), [PSEUDO_FAMILY], flip=flip, seed=seed)


class PseudoMix(Dataset):
    """The training set with, once `use` gave it pseudo-labelled pairs, each sample replaced with
    probability `fraction` by a pseudo-labelled one, both draws a function of (seed, epoch, index);
    the length stays the training set's, so the schedule's length does not change between rounds."""

    def __init__(self, base, fraction: float, seed: int):
        self.base, self.fraction, self.seed, self.epoch = base, fraction, seed, 0
        self.pseudo: SeismicPairs | None = None
        self.format = sample_format(base)  # a batch stacks one dtype and one tuple length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)
        if self.pseudo is not None:
            self.pseudo.set_epoch(epoch)

    def use(self, pseudo: SeismicPairs | None) -> None:
        self.pseudo = pseudo
        if pseudo is not None:
            pseudo.set_epoch(self.epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        if self.pseudo is not None:
            rng = np.random.default_rng([self.seed % 2**64, self.epoch, index, _MIX_STREAM])
            if rng.random() < self.fraction:
                seismic, velocity, _ = self.pseudo[int(rng.integers(len(self.pseudo)))]
                return self.format.stored(seismic, velocity, PSEUDO_FAMILY_INDEX)
        return self.base[index]


class PseudoRounds:
    """`data.pseudo_dir` in training (module docstring): `start_epoch` before each pass makes or
    reads the current round and hands it to the PseudoMix."""

    def __init__(self, task, cfg):
        self.task, self.data, self.seed = task, cfg.data, cfg.seed
        self.batch_size = cfg.trainer.eval_batch_size or cfg.trainer.batch_size
        self.root = Path(cfg.output_dir) / "pseudo"
        self.loaded: int | None = None  # the round epoch whose pairs the mix holds

    def folder(self, round_epoch: int) -> Path:
        return self.root / f"epoch{round_epoch:04d}"

    def start_epoch(self, model, mix: PseudoMix, epoch: int, batch: int) -> None:
        round_epoch = epoch // self.data.pseudo_every_epochs * self.data.pseudo_every_epochs
        if round_epoch == self.loaded:
            return
        folder = self.folder(round_epoch)
        if round_epoch and read_manifest(folder) is None:
            if epoch != round_epoch or batch:
                raise UserError(f"{folder}: the pseudo-labels of epoch {round_epoch} are missing; they were made from "
                                f"the weights of the start of that epoch and cannot be made again from later ones: "
                                f"restore the folder, or start a new run")
            self.make_round(model, folder, epoch)
        mix.use(pseudo_pairs(folder, self.data.flip, self.seed) if round_epoch else None)
        self.loaded = round_epoch

    def make_round(self, model, folder: Path, epoch: int) -> None:
        """The round of `epoch` into `folder`, labelled by every process (label_folder); then the
        earlier rounds are removed."""
        state = PartialState()
        if state.is_main_process:
            print(f"pseudo-labels: epoch {epoch}: predicting {self.data.pseudo_dir} into {folder}", flush=True)
        label_folder(self.task, model, Path(self.data.pseudo_dir), folder, source=f"{self.root.parent} epoch {epoch}",
                     tta=self.data.pseudo_tta, max_misfit=self.data.pseudo_max_misfit, batch_size=self.batch_size,
                     device=next(model.parameters()).device)
        if state.is_main_process:
            for old in self.root.glob("epoch*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        state.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gwi.pseudo", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="run or checkpoint directory; repeat to ensemble")
    parser.add_argument("--data", required=True, type=Path, help="test folder of <id>.npy seismic (the Kaggle test layout)")
    parser.add_argument("--out", required=True, type=Path, help="the new data root (must not exist, or be empty)")
    parser.add_argument("--refine-steps", type=number(int, 0), default=0, metavar="N", help="FWI steps on each map first")
    parser.add_argument("--refine-tv", type=number(float, 0), default=None, metavar="LAMBDA", help="FWI's TV weight (default 1)")
    parser.add_argument("--refine-lr", type=number(float, 0, strict=True), default=None, metavar="LR", help="FWI's Adam step (default 0.005)")
    parser.add_argument("--max-misfit", type=number(float, 0), default=None, metavar="M",
                        help="keep the maps whose misfit ||F(v) - d|| / ||d|| is at most M (default: all)")
    parser.add_argument("--tta", choices=TTA_MODES, default="none", help="as infer.py's")
    parser.add_argument("--batch-size", type=number(int, 1), default=8)
    parser.add_argument("--num-workers", type=number(int, 0), default=2)
    parser.add_argument("overrides", nargs="*", help="key=value changes to the checkpoint's config")
    args = parser.parse_args(argv)
    try:
        if not args.data.is_dir():
            raise UserError(f"--data {args.data}: not a directory")
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise UserError(f"--out {args.out}: exists and is not empty; remove it or choose another")
        if not args.refine_steps and (args.refine_tv is not None or args.refine_lr is not None):
            raise UserError("--refine-tv / --refine-lr: they only act with --refine-steps N")
        physics = PhysicsOptions(refine_steps=args.refine_steps,
                                 **{k: v for k, v in (("refine_tv", args.refine_tv), ("refine_lr", args.refine_lr)) if v is not None})
        task, _, model = load_ensemble(args.checkpoint, args.overrides)
        # Under accelerate launch every process labels its share of the files; a CPU launch says so by
        # ACCELERATE_USE_CPU, which only Accelerator reads itself.
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        device = state.device
        manifest = label_folder(task, model.to(device), args.data, args.out, source=", ".join(args.checkpoint), tta=args.tta,
                                max_misfit=args.max_misfit, physics=physics, batch_size=args.batch_size,
                                num_workers=args.num_workers, device=device)
    except UserError as err:
        return print_user_error(err)
    if state.is_main_process:
        print_json({key: manifest[key] for key in ("files", "kept", "dropped", "misfit_mean", "misfit_mean_kept")} | {"out": str(args.out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
