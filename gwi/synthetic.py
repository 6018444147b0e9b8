"""Synthetic seismic data for smoke runs and most tests (`data.source=synthetic`): layered velocity
maps and a cheap surrogate of the seismic shot gathers they would produce.

This is NOT a wave-equation simulator (that is `gwi.physics`, which the demo's `data.source=simulated`
uses). `reflection_seismic` is a cheap surrogate of it, so that the whole pipeline, from data to a
trained InversionNet, runs on a laptop in seconds. Its data have OpenFWI's layout and
roughly its amplitude range (a direct wave of a few tens near the source, reflections of order
one), and they carry real information about the velocity map, so a model can learn from them; but
their waveforms differ from OpenFWI's, so nothing trained on them transfers to the real data.

Geometry (OpenFWI's, as gwi.layout states it): a 70 x 70 grid of 10 m cells; 5 sources at x cells
0, 17, 34, 52, 69 and 70 receivers (one per column), all at depth cell 1; 1000 time samples at
dt = 1 ms; a 15 Hz Ricker wavelet.
"""
from __future__ import annotations

import numpy as np
import torch

from gwi.layout import MAP_SIZE, SENSOR_DEPTH, SOURCE_X, TIME_STEPS, VELOCITY_MAX, VELOCITY_MIN

# The direct wave's amplitude is 1 / max(travel time, this): about 50 next to the source, which
# keeps the data in the range OpenFWI's normalisation constants expect.
_NEAR_FIELD_TIME = 0.02  # s


def layered_velocity(
    n: int,
    rng: np.random.Generator,
    size: int = MAP_SIZE,
    min_layers: int = 2,
    max_layers: int = 5,
    max_dip: float = 0.1,
) -> np.ndarray:
    """`n` FlatVel-like velocity maps, float32 (n, 1, size, size), in m/s within [1500, 4500].

    Each map has `min_layers`..`max_layers` layers whose velocity mostly increases with depth
    (each step is drawn from [-250, +900] m/s, so an occasional slower layer occurs). The
    interfaces are straight lines with a common dip of at most `max_dip` cells per column, plus a
    little jitter per interface, so that columns differ and the lateral position matters.
    """
    max_interfaces = max_layers - 1
    num_interfaces = rng.integers(min_layers - 1, max_interfaces + 1, size=n)

    # Interface depths (in cells) at the centre column; the unused ones go to +inf so that no cell
    # lies below them, then sorting puts the used ones first.
    depth_at_centre = rng.uniform(6, size - 4, size=(n, max_interfaces))
    unused = np.arange(max_interfaces) >= num_interfaces[:, None]
    depth_at_centre = np.sort(np.where(unused, np.inf, depth_at_centre), axis=1)
    dip = rng.uniform(-max_dip, max_dip, size=(n, 1)) + rng.uniform(-0.02, 0.02, size=(n, max_interfaces))

    # A cell's layer is the number of interfaces above it.
    z = np.arange(size)[None, :, None]
    x_from_centre = np.arange(size)[None, None, :] - (size - 1) / 2
    layer = np.zeros((n, size, size), dtype=np.int64)
    for i in range(max_interfaces):
        interface_depth = depth_at_centre[:, i, None, None] + dip[:, i, None, None] * x_from_centre
        layer += z >= interface_depth

    top = rng.uniform(VELOCITY_MIN, 3000.0, size=(n, 1))
    steps = rng.uniform(-250.0, 900.0, size=(n, max_interfaces))
    layer_velocity = np.clip(np.cumsum(np.concatenate([top, steps], axis=1), axis=1), VELOCITY_MIN, VELOCITY_MAX)
    velocity = np.take_along_axis(layer_velocity, layer.reshape(n, -1), axis=1).reshape(n, 1, size, size)
    return velocity.astype(np.float32)


def ricker(freq: float, dt: float, peak_time: float) -> np.ndarray:
    """Ricker wavelet sampled at 0, dt, 2 dt, ... up to (not including) twice its peak time, which
    is its effective support (beyond it, |w| < 1e-8 for a peak at 1.5 / freq)."""
    t = np.arange(int(round(2 * peak_time / dt))) * dt - peak_time
    arg = (np.pi * freq * t) ** 2
    return (1 - 2 * arg) * np.exp(-arg)


def reflection_seismic(
    vel: np.ndarray,
    nt: int = TIME_STEPS,
    dt: float = 1e-3,
    freq: float = 15.0,
    dx: float = 10.0,
    src_x=SOURCE_X,
) -> np.ndarray:
    """Surrogate shot gathers for velocity maps `vel` (n, 1, nz, nx) in m/s -> float32 (n, S, nt, nx).

    For source s at column x_s (may be fractional) and the receiver in column x_r, with offset
    h = |x_r - x_s| * dx, the trace is a sum of spikes convolved with a `freq` Hz Ricker wavelet
    that peaks 1.5 / freq after each arrival:

    - the direct wave, at the travel time along the receiver row (depth cell 1), i.e. the integral
      of 1 / v from x_s to x_r, with amplitude 1 / max(t, 0.02 s);
    - one reflection per interface under the common midpoint (x_s + x_r) / 2, where an interface
      is a depth cell z whose velocity differs from the cell above. Its amplitude is the reflection
      coefficient (v_z - v_{z-1}) / (v_z + v_{z-1}) times 1 / t spreading; it arrives at the
      hyperbolic moveout time t = sqrt(t0^2 + (h / v_rms)^2), where t0 is the two-way vertical time
      from the receiver row down to the interface and v_rms the RMS velocity of the cells between
      (Dix; for a single layer this is sqrt(h^2 + (2 depth)^2) / v). A midpoint between two
      columns takes both columns' reflections, weighted by proximity.

    Not modelled: refractions and head waves, multiples, transmission losses, mode conversions,
    diffractions, dip-dependent moveout. The model is mirror-equivariant: mirroring the map's
    columns and the source positions (x -> nx - 1 - x) mirrors the data. With OpenFWI's sources
    (0, 17, 34, 52, 69) the mirrored positions are (0, 17, 35, 52, 69): for the four outer
    sources mirroring the map is the same as reversing the source order and the receivers, and
    for the middle one it is so up to a one-cell (10 m) shift of the source, as in OpenFWI itself.
    """
    velocity = np.asarray(vel, dtype=np.float64)[:, 0]  # (n, nz, nx)
    n, _, nx = velocity.shape
    receiver_row = SENSOR_DEPTH
    receivers = np.arange(nx, dtype=np.float64)
    wavelet = ricker(freq, dt, peak_time=1.5 / freq)
    # Room for the last arrival's wavelet, so the circular convolution never wraps around.
    fft_length = _fft_length_at_least(nt + len(wavelet) - 1)

    # Direct wave: cumulative slowness along the receiver row, trapezoid between cell centres,
    # read at any (fractional) column by linear interpolation.
    row_slowness = 1.0 / velocity[:, receiver_row, :]
    surface_time = np.concatenate(
        [np.zeros((n, 1)), np.cumsum((row_slowness[:, 1:] + row_slowness[:, :-1]) * dx / 2, axis=1)], axis=1
    )

    # Reflectors: every (sample, depth, column) where the velocity changes downwards; depth index j
    # is the interface between depth cells j+1 and j+2, whose cells above start at the receiver row.
    upper, lower = velocity[:, receiver_row:-1, :], velocity[:, receiver_row + 1:, :]
    one_way_time = np.cumsum(dx / upper, axis=1)
    rms_velocity_squared = np.cumsum(dx * upper, axis=1) / one_way_time
    sample, depth, column = np.nonzero(lower != upper)
    reflectivity = ((lower - upper) / (lower + upper))[sample, depth, column]
    zero_offset_time = 2 * one_way_time[sample, depth, column]
    rms_velocity_squared = rms_velocity_squared[sample, depth, column]

    seismic = np.empty((n, len(src_x), nt, nx), dtype=np.float32)
    for s, source in enumerate(src_x):
        spikes = _Spikes(n, nx, fft_length, nt, dt)

        direct_time = np.abs(_interp_rows(surface_time, receivers) - _interp_rows(surface_time, np.full(nx, source)))
        spikes.add(np.arange(n)[:, None], np.arange(nx)[None, :], direct_time, 1.0 / np.maximum(direct_time, _NEAR_FIELD_TIME))

        # A reflector under column c is seen by each receiver whose midpoint (x_s + x_r) / 2 lies
        # within one column of c, weighted 1 - |midpoint - c|: at most 4 receivers around 2c - x_s.
        centre = 2 * column - source
        receiver = np.floor(centre)[:, None].astype(np.int64) + np.arange(-1, 3)  # (reflectors, 4)
        weight = 1 - np.abs(receiver - centre[:, None]) / 2
        seen = (weight > 0) & (receiver >= 0) & (receiver < nx)
        offset = np.abs(receiver - source) * dx
        arrival = np.sqrt(zero_offset_time[:, None] ** 2 + offset**2 / rms_velocity_squared[:, None])
        amplitude = reflectivity[:, None] * weight / np.maximum(arrival, _NEAR_FIELD_TIME)
        spikes.add(np.broadcast_to(sample[:, None], seen.shape)[seen], receiver[seen], arrival[seen], amplitude[seen])

        seismic[:, s] = spikes.convolve(wavelet).transpose(0, 2, 1)
    return seismic


class _Spikes:
    """Spike traces (n, nx, fft_length): arrivals placed at fractional time samples by splitting
    each between its two neighbouring samples, then convolved with a wavelet in one FFT."""

    def __init__(self, n: int, nx: int, fft_length: int, nt: int, dt: float):
        self.shape, self.nt, self.dt = (n, nx, fft_length), nt, dt
        self.flat = np.zeros(n * nx * fft_length, dtype=np.float32)

    def add(self, sample, receiver, time, amplitude) -> None:
        sample, receiver, time, amplitude = (a.ravel() for a in np.broadcast_arrays(sample, receiver, time, amplitude))
        position = time / self.dt
        inside = position < self.nt - 1  # later arrivals fall outside the record
        position, amplitude = position[inside], amplitude[inside]
        trace_start = (sample[inside] * self.shape[1] + receiver[inside]) * self.shape[2]
        first = np.floor(position).astype(np.int64)
        fraction = position - first
        np.add.at(self.flat, trace_start + first, (amplitude * (1 - fraction)).astype(np.float32))
        np.add.at(self.flat, trace_start + first + 1, (amplitude * fraction).astype(np.float32))

    def convolve(self, wavelet: np.ndarray) -> np.ndarray:
        """The traces convolved with `wavelet`, cut to the record length: float32 (n, nx, nt)."""
        # torch's FFT, not numpy's: this is most of the generation time, and torch's is 3-5x faster.
        length = self.shape[2]
        traces = torch.from_numpy(self.flat.reshape(self.shape))
        wavelet_spectrum = torch.fft.rfft(torch.from_numpy(wavelet.astype(np.float32)), length)
        convolved = torch.fft.irfft(torch.fft.rfft(traces, dim=-1) * wavelet_spectrum, length, dim=-1)
        return convolved[..., : self.nt].numpy()


def _interp_rows(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Linear interpolation of each row of `table` (n, m), sampled at 0..m-1, at positions x (k,)."""
    left = np.clip(np.floor(x).astype(np.int64), 0, table.shape[1] - 2)
    fraction = x - left
    return table[:, left] * (1 - fraction) + table[:, left + 1] * fraction


def _fft_length_at_least(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: a length FFTs handle fast (1000 + 199 -> 1200)."""
    while True:
        rest = n
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return n
        n += 1
