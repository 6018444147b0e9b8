"""OpenFWI-like velocity maps, generated: the families' geometry (flat / curved layers, faults,
smooth textures) and augmentations of existing maps.

Every function returns float32 (n, 1, size, size) maps in m/s within [1500, 4500], is vectorised
over the n maps (numpy, and torch's grid_sample for resampling), and draws its randomness from the
numpy Generator (or seed) it is given, so the same seed gives the same maps.

Families (size 70 unless told; "A" simpler, "B" more and sharper structure):
  FlatVel    horizontal layers. A: 2-4 layers, velocity increasing with depth by moderate steps.
             B: 4-8 layers, velocities in any order with strong contrasts.
  CurveVel   the same layers, bent together by a smooth random curve (sum of sinusoids); B bends
             more, at shorter wavelengths.
  FlatFault  flat layers cut by one dipping fault line; the rocks on one side are shifted up or
             down along it. B: more layers (any order), larger throws.
  CurveFault curved layers cut by a fault.
  Style      smooth random textures (Gaussian random fields) on a depth trend. A: long correlation
             lengths, mild contrast; B: shorter, anisotropic, several scales, strong contrast.
Augmentations: `random_affine` (rotation, shear, scale, shift), `crop_resize` (a random
sub-window stretched back to full size), `blend` (alpha a + (1 - alpha) b, alpha in [0.3, 0.7]),
and `augment` (a random mix of them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gwi.layout import MAP_SIZE, VELOCITY_MAX, VELOCITY_MIN

FAMILIES = ("FlatVel_A", "FlatVel_B", "CurveVel_A", "CurveVel_B", "FlatFault_A", "FlatFault_B",
            "CurveFault_A", "CurveFault_B", "Style_A", "Style_B")


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _finish(v: np.ndarray) -> np.ndarray:
    return np.clip(v, VELOCITY_MIN, VELOCITY_MAX).astype(np.float32)[:, None]


# ---- layered families ------------------------------------------------------------------------------


def _layer_velocities(n: int, layers: int, rng: np.random.Generator, variant: str) -> np.ndarray:
    """(n, layers) velocities, top layer first."""
    if variant == "A":  # increasing with depth, moderate steps
        top = rng.uniform(VELOCITY_MIN, 3000.0, (n, 1))
        steps = rng.uniform(150.0, 700.0, (n, layers - 1))
        return np.concatenate([top, top + np.cumsum(steps, axis=1)], axis=1)
    # B: any order, strong contrasts (consecutive layers differ by at least 300 m/s)
    v = rng.uniform(VELOCITY_MIN, VELOCITY_MAX, (n, layers))
    for k in range(1, layers):
        close = np.abs(v[:, k] - v[:, k - 1]) < 300.0
        v[close, k] = np.where(v[close, k - 1] < 3000.0, v[close, k - 1] + rng.uniform(300, 1500, close.sum()),
                               v[close, k - 1] - rng.uniform(300, 1500, close.sum()))
    return v


def _bend(n: int, size: int, rng: np.random.Generator, variant: str) -> np.ndarray:
    """(n, size) smooth random curves in cells (a sum of 1-3 sinusoids), mean zero-ish."""
    x = np.arange(size) / size
    waves = 2 if variant == "A" else 3
    amp = rng.uniform(2.0, 6.0 if variant == "A" else 10.0, (n, waves, 1)) / np.arange(1, waves + 1)[:, None]
    wavelength = rng.uniform(0.8, 2.5 if variant == "A" else 1.5, (n, waves, 1)) / np.arange(1, waves + 1)[:, None]
    phase = rng.uniform(0, 2 * np.pi, (n, waves, 1))
    return (amp * np.sin(2 * np.pi * x / wavelength + phase)).sum(axis=1)


def _layered(n: int, rng, size: int, variant: str, curved: bool, fault: bool) -> np.ndarray:
    rng = _rng(rng)
    lo, hi = (2, 4) if variant == "A" else (4, 8)
    layers = rng.integers(lo, hi + 1, n)
    max_if = hi - 1
    # Interface depths (cells) at the reference column; unused interfaces at +inf.
    depth = np.sort(rng.uniform(0.08 * size, 0.95 * size, (n, max_if)), axis=1)
    depth = np.where(np.arange(max_if) < (layers - 1)[:, None], depth, np.inf)
    depth = np.sort(depth, axis=1)
    shape = _bend(n, size, rng, variant) if curved else np.zeros((n, size))
    # Deeper interfaces follow the curve a little less (layers thin over crests, as in folds).
    scale = rng.uniform(0.7, 1.0, (n, max_if))
    surfaces = depth[:, :, None] + scale[:, :, None] * shape[:, None, :]  # (n, K, nx)
    z = np.arange(size, dtype=np.float64)[None, :, None]  # (1, nz, 1)

    def layer_index(shift):  # shift: (n, nz, nx) vertical offset of the layering, cells
        zz = z - shift
        return (zz[:, None] >= surfaces[:, :, None, :]).sum(axis=1)  # (n, nz, nx)

    shift = np.zeros((n, size, size))
    if fault:
        # A fault line through (x0, z0) at an angle from the vertical; one side moves by `throw`.
        x0 = rng.uniform(0.25 * size, 0.75 * size, (n, 1, 1))
        angle = np.deg2rad(rng.uniform(-45.0, 45.0, (n, 1, 1)))
        throw_max = 12.0 if variant == "A" else 20.0
        throw = rng.uniform(4.0, throw_max, (n, 1, 1)) * rng.choice([-1.0, 1.0], (n, 1, 1))
        x = np.arange(size, dtype=np.float64)[None, None, :]
        side = (x - x0) * np.cos(angle) - (z - size / 2) * np.sin(angle) > 0
        shift = np.where(side, throw, 0.0)
    idx = layer_index(shift)
    vel = _layer_velocities(n, hi, rng, variant)
    return _finish(np.take_along_axis(vel, idx.reshape(n, -1), axis=1).reshape(n, size, size))


def flat_vel(n: int, rng=None, variant: str = "A", size: int = MAP_SIZE) -> np.ndarray:
    return _layered(n, rng, size, variant, curved=False, fault=False)


def curve_vel(n: int, rng=None, variant: str = "A", size: int = MAP_SIZE) -> np.ndarray:
    return _layered(n, rng, size, variant, curved=True, fault=False)


def flat_fault(n: int, rng=None, variant: str = "A", size: int = MAP_SIZE) -> np.ndarray:
    return _layered(n, rng, size, variant, curved=False, fault=True)


def curve_fault(n: int, rng=None, variant: str = "A", size: int = MAP_SIZE) -> np.ndarray:
    return _layered(n, rng, size, variant, curved=True, fault=True)


# ---- smooth textures ---------------------------------------------------------------------------------


def style(n: int, rng=None, variant: str = "A", size: int = MAP_SIZE) -> np.ndarray:
    """Gaussian random fields (white noise low-passed by a Gaussian of random, per-axis correlation
    lengths; B adds a finer second scale) on a linear depth trend."""
    rng = _rng(rng)
    kz = np.fft.fftfreq(size)[None, :, None]
    kx = np.fft.rfftfreq(size)[None, None, :]

    def field(lz, lx):  # lz, lx: (n,) correlation lengths in cells -> (n, size, size), unit std
        noise = np.fft.rfft2(rng.standard_normal((n, size, size)))
        filt = np.exp(-2 * np.pi**2 * ((kz * lz[:, None, None]) ** 2 + (kx * lx[:, None, None]) ** 2))
        f = np.fft.irfft2(noise * filt, s=(size, size))
        f -= f.mean(axis=(1, 2), keepdims=True)
        return f / (f.std(axis=(1, 2), keepdims=True) + 1e-12)

    if variant == "A":
        length = rng.uniform(6.0, 12.0, n)
        tex = field(length, length * rng.uniform(0.8, 1.5, n))
        contrast = rng.uniform(150.0, 400.0, (n, 1, 1))
    else:
        tex = field(rng.uniform(3.0, 8.0, n), rng.uniform(4.0, 14.0, n))
        tex = tex + rng.uniform(0.2, 0.6, (n, 1, 1)) * field(rng.uniform(1.0, 2.5, n), rng.uniform(1.0, 2.5, n))
        contrast = rng.uniform(300.0, 700.0, (n, 1, 1))
    top = rng.uniform(VELOCITY_MIN + 200.0, 3000.0, (n, 1, 1))
    bottom = top + rng.uniform(300.0, 1500.0, (n, 1, 1))
    trend = top + (bottom - top) * np.linspace(0.0, 1.0, size)[None, :, None]
    return _finish(trend + contrast * tex)


_GENERATORS = {"FlatVel": flat_vel, "CurveVel": curve_vel, "FlatFault": flat_fault, "CurveFault": curve_fault,
               "Style": style}


def generate(family: str, n: int, rng=None, size: int = MAP_SIZE) -> np.ndarray:
    """n maps of `family` ("FlatVel_A", ..., "Style_B"; see FAMILIES): float32 (n, 1, size, size)."""
    kind, _, variant = family.rpartition("_")
    if kind not in _GENERATORS or variant not in ("A", "B"):
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return _GENERATORS[kind](int(n), _rng(rng), variant=variant, size=size)


# ---- augmentations -----------------------------------------------------------------------------------


def _as_torch(maps) -> tuple[torch.Tensor, bool]:
    is_numpy = not isinstance(maps, torch.Tensor)
    t = torch.as_tensor(np.asarray(maps) if is_numpy else maps, dtype=torch.float32)
    if t.ndim == 3:
        t = t[:, None]
    return t, is_numpy


def _back(t: torch.Tensor, is_numpy: bool):
    t = t.clamp(VELOCITY_MIN, VELOCITY_MAX)
    return t.numpy().astype(np.float32) if is_numpy else t


def _resample(maps: torch.Tensor, theta: np.ndarray, mode: str) -> torch.Tensor:
    """grid_sample of (n, 1, h, w) maps through affine matrices theta (n, 2, 3) acting on output
    coordinates in [-1, 1] (x first); outside the map: the nearest edge value."""
    grid = F.affine_grid(torch.as_tensor(theta, dtype=torch.float32), list(maps.shape), align_corners=False)
    return F.grid_sample(maps, grid, mode=mode, padding_mode="border", align_corners=False)


def random_affine(maps, rng=None, max_rotate: float = 10.0, max_shear: float = 0.1, scale=(0.9, 1.15),
                  max_shift: float = 0.1, mode: str = "bilinear"):
    """Each map through its own random affine transform: rotation up to `max_rotate` degrees, shear
    up to `max_shear`, zoom in `scale`, shift up to `max_shift` of the width; edges replicated."""
    rng = _rng(rng)
    t, is_numpy = _as_torch(maps)
    n = len(t)
    a = np.deg2rad(rng.uniform(-max_rotate, max_rotate, n))
    sh = rng.uniform(-max_shear, max_shear, n)
    s = rng.uniform(scale[0], scale[1], n)
    rot = np.stack([np.stack([np.cos(a), -np.sin(a)], -1), np.stack([np.sin(a), np.cos(a)], -1)], -2)
    shear = np.zeros((n, 2, 2))
    shear[:, 0, 0] = shear[:, 1, 1] = 1
    shear[:, 0, 1] = sh
    lin = rot @ shear / s[:, None, None]  # output -> input coordinates (zoom in: s > 1)
    theta = np.concatenate([lin, rng.uniform(-2 * max_shift, 2 * max_shift, (n, 2, 1))], axis=2)
    return _back(_resample(t, theta, mode), is_numpy)


def crop_resize(maps, rng=None, min_size: float = 0.5, mode: str = "bilinear"):
    """A random window of each map (each side a fraction in [min_size, 1] of the map's) stretched
    back to the full size."""
    rng = _rng(rng)
    t, is_numpy = _as_torch(maps)
    n = len(t)
    fx, fz = rng.uniform(min_size, 1.0, n), rng.uniform(min_size, 1.0, n)
    cx, cz = rng.uniform(-1 + fx, 1 - fx), rng.uniform(-1 + fz, 1 - fz)  # window centres in [-1, 1]
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = fx, cx, fz, cz
    return _back(_resample(t, theta, mode), is_numpy)


def blend(a, b, rng=None, alpha=(0.3, 0.7)):
    """alpha a + (1 - alpha) b per pair of maps, alpha uniform in `alpha`."""
    rng = _rng(rng)
    ta, is_numpy = _as_torch(a)
    tb, _ = _as_torch(b)
    if ta.shape != tb.shape:
        raise ValueError(f"blend: shapes differ, {tuple(ta.shape)} and {tuple(tb.shape)}")
    w = torch.as_tensor(rng.uniform(alpha[0], alpha[1], len(ta)), dtype=torch.float32)[:, None, None, None]
    return _back(w * ta + (1 - w) * tb, is_numpy)


def augment(maps, rng=None, p_affine: float = 0.5, p_crop: float = 0.5, p_blend: float = 0.3):
    """A random mix of the augmentations, per map: random_affine with probability p_affine,
    crop_resize with p_crop, then a blend with another map of the batch with p_blend."""
    rng = _rng(rng)
    t, is_numpy = _as_torch(maps)
    n = len(t)
    out = t.clone()
    for p, fn in ((p_affine, random_affine), (p_crop, crop_resize)):
        pick = torch.as_tensor(rng.random(n) < p)
        if pick.any():
            out[pick] = fn(out[pick], rng)
    pick = torch.as_tensor(rng.random(n) < p_blend)
    if pick.any() and n > 1:
        partner = torch.as_tensor((np.arange(n) + rng.integers(1, n, n)) % n)
        out[pick] = blend(out[pick], out[partner[pick]], rng)
    return _back(out, is_numpy)


# ---- picture -----------------------------------------------------------------------------------------


def plot_families(path, per_family: int = 4, seed: int = 0) -> Path:
    """A grid of `per_family` maps per family (one row each) and a row of augmentations, saved as an
    image at `path`."""
    # Imported here: only this picture needs matplotlib, and `python -m gwi.physics.synth` and each of
    # its worker processes would otherwise pay its import.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on rented machines
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    rows = [(family, generate(family, per_family, rng)[:, 0]) for family in FAMILIES]
    base = generate("CurveFault_B", per_family, rng)
    other = generate("Style_B", per_family, rng)
    aug = [random_affine(base[:1], rng), crop_resize(base[1:2], rng), blend(base[2:3], other[2:3], rng),
           augment(base[3:4], rng, p_affine=1, p_crop=1, p_blend=0)]
    names = ["affine", "crop-resize", "blend", "affine+crop"]
    nrows = len(rows) + 1
    fig, axes = plt.subplots(nrows, per_family, figsize=(1.25 * per_family + 1.6, 1.25 * nrows + 0.5), squeeze=False)
    fig.subplots_adjust(left=0.17, right=0.8, top=1 - 0.45 / fig.get_figheight(), bottom=0.05, wspace=0.06, hspace=0.08)
    for r, (family, maps) in enumerate(rows):
        for c in range(per_family):
            im = axes[r, c].imshow(maps[c], vmin=VELOCITY_MIN, vmax=VELOCITY_MAX, cmap="jet")
        axes[r, 0].set_ylabel(family, fontsize=8)
    for c in range(per_family):
        axes[-1, c].imshow(aug[c % len(aug)][0, 0], vmin=VELOCITY_MIN, vmax=VELOCITY_MAX, cmap="jet")
        axes[-1, c].set_xlabel(names[c % len(names)], fontsize=7)
    axes[-1, 0].set_ylabel("augmented", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, cax=fig.add_axes([0.84, 0.35, 0.03, 0.3]), label="velocity (m/s)")
    fig.suptitle("OpenFWI-like velocity maps (gwi.physics.velocity), 70 x 70 cells", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(plot_families(Path(__file__).with_name("families.png")))
