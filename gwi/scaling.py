"""Velocity / time scaling: the wave equation's symmetry, as training augmentation and as TTA.

The acoustic wave equation p_tt = v^2 (lap p + s(t) delta) (gwi.physics.acoustic injects
s(it) (v_src dt)^2, so the source term scales with v^2 like the Laplacian) is unchanged by
v -> a v with t -> t / a, except for the source wavelet s, which does not stretch: exactly,
F(a v)(t) = F_g(v)(a t) with g(t) = s(t / a), the simulator's 15 Hz Ricker stretched to 15 / a Hz.
No amplitude factor appears (the damping layer's kappa ~ vmin scales like 1 / time too). The
record is linear in its wavelet, so F_g(v) = F(v) * h for the filter h that shapes s into g:
`scaled_record` filters the record by h (a Wiener filter, G conj(S) / (|S|^2 + eps max |S|^2) over
the sampled wavelets' spectra) and then stretches its time axis:

    F(a v)(t) ~ (F(v) * h_a)(a t),

linearly interpolated, zero beyond the recorded 1 s (for a > 1 the last (1 - 1/a) of the record is
unknown). Left: the grid's numerical dispersion (a v on the same 10 m grid), the regularisation and
the missing tail. Without the filter (the plain stretch) the wavelet's phase is off: stretched about
t = 0 its peak lands about (a - 1) 73 ms off, about the peak (`rescale_time(..., pivot=WAVELET_PEAK_MS)`)
its frequency is still 15 Hz, not 15 / a. bench/velocity_scaling.py measures all three against the
simulator (the README's table). `data.scale_augment` applies `scaled_record` to stored pairs (the
map multiplied by a) and scales online draws' maps before they are simulated (exact); the gwi
task's "scale" TTA predicts from `scaled_record` at SCALE_TTA's factors, divides each prediction by
its a and takes the per-pixel median (20th place's recipe, with the filter added).

Records are sampled at the simulator's dt (1 ms): what files, the simulator and online draws hold.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from gwi.layout import VELOCITY_MAX, VELOCITY_MIN
from gwi.physics.acoustic import DEFAULTS, ricker

# Sample t of a record is the field after the step that injected wavelet sample t (gwi.physics.acoustic,
# "time axis"), so the Ricker's centre sample is its peak's time in samples (of dt = 1 ms).
WAVELET_PEAK_MS = len(ricker(DEFAULTS["freq"], DEFAULTS["dt"])) // 2
# The shaping filter's regularisation, relative to the wavelet's peak power: of 1e-2, 1e-3, 1e-4 and 1e-6
# tried on two real CurveVel_A maps, 1e-6 gave the smallest errors (at a = 0.8: 0.12, 0.060, 0.036, 0.027).
SHAPING_EPS = 1e-6
# The gwi task's test-time augmentations (GwiTask.predict; infer.py / gwi.pseudo --tta, data.pseudo_tta):
# flip (the mean with the mirrored sample's prediction), scale (the median over SCALE_TTA), both.
TTA_MODES = ("none", "flip", "scale", "flip+scale")
# Zero padding of the filtered record (samples): the shaping filter's impulse response (a shift of
# (a - 1) 73 ms and a smoothing or sharpening some 10 ms wide for a in 0.8-1.2) stays far inside it.
SHAPING_PAD = 512
# The "scale" TTA's factors (the approximation's error grows with |a - 1|: README, bench/velocity_scaling.py).
SCALE_TTA = (0.9, 1.0, 1.1)
_SCALE_STREAM = 0x5CA1E  # keeps the scale draws apart from the flip's, which use the same (seed, epoch, index)


def check_scale_range(value) -> tuple[float, float]:
    """A [lo, hi] range of factors a: finite, 0 < lo <= hi, and holding 1, the only factor that keeps a
    map spanning the whole [1500, 4500] m/s inside it (any other a pushes one end out). Raises
    ValueError (the config names the key)."""
    lo, hi = (float(x) for x in value)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0:
        raise ValueError(f"factors must be finite and positive, got [{lo:g}, {hi:g}]")
    if lo > hi:
        raise ValueError(f"[{lo:g}, {hi:g}] has lo > hi")
    if not lo <= 1 <= hi:
        raise ValueError(f"[{lo:g}, {hi:g}] leaves no factor for a map spanning {VELOCITY_MIN:g}-"
                         f"{VELOCITY_MAX:g} m/s (only a = 1 keeps it in range); the range must contain 1")
    return lo, hi


def narrowed(lo: float, hi: float, vmin: float, vmax: float) -> tuple[float, float]:
    """[lo, hi] narrowed so that a map of [vmin, vmax] m/s scaled by any a in it stays in
    [VELOCITY_MIN, VELOCITY_MAX] (the velocity head's range); holds 1 when [lo, hi] does."""
    return max(lo, VELOCITY_MIN / vmin), min(hi, VELOCITY_MAX / vmax)


def scale_factor(rng: np.random.Generator, scale: tuple[float, float], velocity: np.ndarray) -> float:
    """The factor a for `velocity`, uniform in `scale` narrowed to the map's range, from `rng`."""
    lo, hi = narrowed(*scale, float(velocity.min()), float(velocity.max()))
    return float(lo + (hi - lo) * rng.random())


def scale_decision(seed: int, epoch: int, index: int, scale: tuple[float, float], velocity: np.ndarray) -> float:
    """The factor of stored sample `index` in `epoch`: a function of (seed, epoch, index) and the map
    alone, like gwi.data.flip_decision, so a resumed run scales exactly as a straight one."""
    return scale_factor(np.random.default_rng([seed % 2**64, epoch, index, _SCALE_STREAM]), scale, velocity)


def scale_map(velocity, a: float):
    """a v, held to [VELOCITY_MIN, VELOCITY_MAX] (a narrowed a keeps it there up to float rounding)."""
    scaled = velocity * a
    if isinstance(scaled, torch.Tensor):
        return scaled.clamp(VELOCITY_MIN, VELOCITY_MAX)
    return np.clip(scaled, VELOCITY_MIN, VELOCITY_MAX).astype(velocity.dtype)


def rescale_time(seismic: torch.Tensor, a: float, pivot: float = 0.0) -> torch.Tensor:
    """Seismic (..., T, R) with its time axis stretched: out[t] = seismic[a (t - pivot) + pivot] (in
    samples; linear interpolation, zero outside the record). a = 1 returns the input. Any float
    dtype and device; the result keeps both."""
    if a == 1:
        return seismic
    T = seismic.shape[-2]
    # Two gathers of whole time rows (6x faster than grid_sample on a (5, 1000, 70) sample on one CPU
    # thread, and the same numbers: both take the samples outside the record as zeros).
    source = a * (torch.arange(T, device=seismic.device, dtype=torch.float64) - pivot) + pivot
    below = source.floor()
    above_weight = (source - below).float()
    x = seismic.float()
    out = 0
    for index, weight in ((below.long(), 1 - above_weight), (below.long() + 1, above_weight)):
        inside = (index >= 0) & (index < T)
        out = out + x.index_select(-2, index.clamp(0, T - 1)) * (weight * inside)[:, None]
    return out.to(seismic.dtype)


def stretched_wavelet(a: float, length: int) -> np.ndarray:
    """g(t) = s(t / a): the simulator's Ricker (peak WAVELET_PEAK_MS) stretched by a, `length` samples."""
    freq, dt = DEFAULTS["freq"], DEFAULTS["dt"]
    arg = ((WAVELET_PEAK_MS - np.arange(length) / a) * freq * dt * np.pi) ** 2
    return (1.0 - 2.0 * arg) * np.exp(-arg)


@lru_cache(maxsize=64)
def _shaping(a: float, n: int) -> np.ndarray:
    """The shaping filter's spectrum on an n-point FFT (rfft bins)."""
    wavelet = ricker(DEFAULTS["freq"], DEFAULTS["dt"])
    S = np.fft.rfft(wavelet, n=n)
    G = np.fft.rfft(stretched_wavelet(a, n), n=n)
    return (G * np.conj(S) / (np.abs(S) ** 2 + SHAPING_EPS * np.abs(S).max() ** 2)).astype(np.complex64)


def shape_wavelet(seismic: torch.Tensor, a: float) -> torch.Tensor:
    """The record (..., T, R) filtered so that its wavelet s becomes s(t / a) (the same dtype and
    device). Zero-padded by SHAPING_PAD samples, more than the filter's reach either side, so the
    circular convolution of the FFT does not wrap."""
    n = seismic.shape[-2] + SHAPING_PAD
    H = torch.from_numpy(_shaping(float(a), n)).to(seismic.device)[:, None]
    spectrum = torch.fft.rfft(seismic.float(), n=n, dim=-2)
    return torch.fft.irfft(spectrum * H, n=n, dim=-2)[..., :seismic.shape[-2], :].to(seismic.dtype)


def scaled_record(seismic: torch.Tensor, a: float) -> torch.Tensor:
    """The record of the map a v from the record of v (..., T, R): wavelet shaped, time stretched
    (module docstring). a = 1 returns the input."""
    if a == 1:
        return seismic
    return rescale_time(shape_wavelet(seismic, a), a)


def scale_tta(predict, seismic: torch.Tensor, factors=SCALE_TTA) -> torch.Tensor:
    """The per-pixel median over `factors` of predict(scaled_record(seismic, a)) / a, all factors in
    one batch of len(factors) x B samples on the seismic's device. `predict`: seismic -> (B, 1, 70, 70) m/s."""
    batch = torch.cat([scaled_record(seismic, a) for a in factors])
    predictions = predict(batch).float().unflatten(0, (len(factors), len(seismic)))
    divisors = torch.tensor(factors, device=predictions.device, dtype=predictions.dtype).view(-1, 1, 1, 1, 1)
    return (predictions / divisors).median(dim=0).values
