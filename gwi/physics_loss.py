"""Physics-informed training (`loss.physics_weight`): the training loss gains

    w x mean over a sub-batch of  ||F(v_pred) - d||_2 / ||d||_2

F the OpenFWI forward model (gwi.physics.forward_model), v_pred the network's map (m/s, held to
[1500, 4500] so the simulator is stable), d the sample's own seismic as the dataset serves it: raw,
unnormalised amplitudes (the models normalise inside, `gwi.data.SeismicInput`), so d and F(v) are
on the same scale. The term is differentiated through the simulator by the adjoint-state method
(gwi.physics.adjoint: the fast forward keeping two fields every ~sqrt(2 T) steps, then one
time-reversed sweep), so memory stays at ~100 fields per map whatever the record length.

It needs no velocity map, so it also trains on unlabelled seismic: `data.unlabelled_roots` adds
folders in the Kaggle test layout (`<id>.npy`, (5, 1000, 70)) to the training set; their samples
carry a map of NaN and contribute only this term (the supervised loss averages over the labelled
samples of a batch). Fine-tuning on the test set itself is then one config key.

Cost bounds (a simulation with its gradient is ~10 s per map on one CPU core at full length, a few
ms on a GPU): `loss.physics_every` (the term joins every N-th update only), `loss.physics_batch_size`
(at most this many samples of a batch, unlabelled ones first) and `loss.physics_time_steps` (only
the first T samples of each trace are simulated and compared: cost ~T; the early record holds the
direct wave and the shallow reflections).

Mirrored samples (`data.flip`): the flip maps the middle source (x = 34) to x = 35, so a mirrored
5-source gather is not exactly F(mirrored map) for that shot; the term uses OpenFWI's geometry, so
such samples carry that one-cell error in their middle shot. With `data.exact_flip` (6-source
files) and online data the mirrored gather is exact. Unlabelled samples are never mirrored.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gwi.layout import SEISMIC_SAMPLE_SHAPE, TIME_STEPS, VELOCITY_MAX, VELOCITY_MIN, VELOCITY_SAMPLE_SHAPE
from gwi.online import sample_format
from gwi.physics.acoustic import forward_model
from gwi.physics.fwi import relative_misfit
from gwi.submission import TestFiles
from harness.errors import ConfigError

UNLABELLED_FAMILY_INDEX = -1  # the family index of an unlabelled sample: none of the run's families


def physics_misfit(velocity: torch.Tensor, seismic: torch.Tensor, time_steps: int = TIME_STEPS, **simulator) -> torch.Tensor:
    """||F(v) - d|| / ||d|| per sample, (B,), differentiable with respect to `velocity` (B, 1, nz, nx)
    m/s by the adjoint-state method; `seismic` (B, S, >= time_steps, R) raw amplitudes, compared on
    its first `time_steps` samples. float64 maps are simulated in float64 (the gradient tests);
    everything else in float32, outside any autocast. `simulator`: forward_model's options."""
    dtype = torch.float64 if velocity.dtype == torch.float64 else torch.float32
    with torch.autocast(velocity.device.type, enabled=False):
        v = velocity.to(dtype).clamp(VELOCITY_MIN, VELOCITY_MAX)
        observed = seismic[:, :, :time_steps].to(dtype)
        steps = time_steps + simulator.get("skip_steps", 0)
        simulated = forward_model(v, nt=time_steps, dtype=dtype, gradient="adjoint",
                                  checkpoint_steps=max(1, math.ceil(math.sqrt(2 * steps))), **simulator)
        return relative_misfit(simulated, observed).to(dtype)


class PhysicsLoss:
    """The gwi loss with the physics term (module docstring): `__call__(outputs, batch, step)` with
    the per-sample supervised loss `supervised(outputs, velocity)`; `step` is the number of updates
    done, so the term joins updates step + 1 = 1, 1 + every, 1 + 2 every, ... (a function of the
    step: a resumed run adds it at the same updates)."""

    def __init__(self, loss, supervised):
        self.weight, self.every, self.batch_size = loss.physics_weight, loss.physics_every, loss.physics_batch_size
        self.time_steps, self.supervised = loss.physics_time_steps, supervised
        self.last_misfit: float | None = None  # the latest term's mean misfit, logged as train/physics_misfit

    def __call__(self, outputs: torch.Tensor, batch, step: int) -> torch.Tensor:
        seismic, velocity = batch[0], batch[1]
        labelled = ~torch.isnan(velocity.flatten(1)).any(dim=1)
        # Connected to the graph even when nothing below contributes, so the backward (and DDP's
        # all-reduce) runs the same way on every batch.
        loss = outputs.sum() * 0.0
        if labelled.any():
            loss = loss + self.supervised(outputs[labelled], velocity[labelled]).mean()
        if self.weight and step % self.every == 0:
            if seismic.shape[2] < self.time_steps:
                raise ConfigError(f"key 'loss.physics_time_steps': the batches hold {seismic.shape[2]} time samples, fewer "
                                  f"than {self.time_steps}; the physics term needs the simulator's raw seismic")
            order = torch.argsort(labelled.int(), stable=True)  # unlabelled samples first: they have no other loss
            chosen = order[:self.batch_size] if self.batch_size else order
            misfit = physics_misfit(outputs[chosen], seismic[chosen], self.time_steps)
            self.last_misfit = float(misfit.detach().mean())
            loss = loss + self.weight * misfit.mean().to(loss.dtype)
        return loss


def check_physics_config(data, loss) -> None:
    """Refuse combinations that would silently do nothing or compare against the wrong seismic."""
    if data.unlabelled_roots and not loss.physics_weight:
        raise ConfigError("key 'data.unlabelled_roots': unlabelled samples only train through the physics term; "
                          "set loss.physics_weight > 0")
    if loss.physics_weight and data.source == "synthetic":
        raise ConfigError("key 'loss.physics_weight': data.source=synthetic's seismic is a cheap surrogate, not the "
                          "simulator's; use data.source=simulated or files")
    if loss.physics_weight and data.source == "online" and data.online_nt < loss.physics_time_steps:
        raise ConfigError(f"key 'loss.physics_time_steps': {loss.physics_time_steps} time samples compared, but the online "
                          f"draws simulate data.online_nt={data.online_nt}")


class UnlabelledFiles(Dataset):
    """Test-layout folders (`<id>.npy` seismic, no maps) as training samples (seismic float32, a
    NaN map, UNLABELLED_FAMILY_INDEX), read and checked by gwi.submission.TestFiles."""

    def __init__(self, roots: list[str]):
        self.files = []
        for root in map(Path, roots):
            if not root.is_dir() or not any(root.glob("*.npy")):
                raise ConfigError(f"key 'data.unlabelled_roots': {str(root)!r} is not a folder of <id>.npy test files "
                                  f"{SEISMIC_SAMPLE_SHAPE}")
            self.files.append(TestFiles(root))
        self.offsets = np.cumsum([0] + [len(f) for f in self.files])
        self._no_map = torch.full(VELOCITY_SAMPLE_SHAPE, torch.nan)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int):
        folder = int(np.searchsorted(self.offsets, index, side="right")) - 1
        seismic, _ = self.files[folder][index - int(self.offsets[folder])]
        return seismic, self._no_map, UNLABELLED_FAMILY_INDEX


class WithUnlabelled(Dataset):
    """A training set followed by unlabelled samples in its sample format (gwi.online.sample_format:
    a batch stacks one dtype and one tuple length); `set_epoch` reaches the training set."""

    def __init__(self, labelled: Dataset, unlabelled: UnlabelledFiles):
        self.labelled, self.unlabelled = labelled, unlabelled
        self.format = sample_format(labelled)

    def set_epoch(self, epoch: int) -> None:
        self.labelled.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.labelled) + len(self.unlabelled)

    def __getitem__(self, index: int):
        if index < len(self.labelled):
            return self.labelled[index]
        seismic, velocity, family = self.unlabelled[index - len(self.labelled)]
        return self.format.stored(seismic, velocity, family)
