"""The fused Triton kernel (gwi/physics/triton_kernel.py) against the torch path, the reference.

On the CPU the kernel runs under Triton's interpreter (numpy), tiny grids and few steps (the
interpreter runs every program of every step in Python). The interpreter evaluates tl.fma(x, y, z)
as x * y + z in float32, two roundings, where the GPU, torch's addcmul and the C kernel round
once; with a correctly rounded fma given to the interpreter (`exact_fma`) the kernel must give the
torch path's bits, and without it it stays within a few float32 roundings per step (the bound
below). On a GPU (tests marked gpu) the compiled kernel must give the CPU C kernel's bits on
real-size maps, with and without the CUDA graph.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from gwi.physics import _ckernel, triton_kernel
from gwi.physics import velocity as vmaps
from gwi.physics.acoustic import forward_model

ROOT = Path(__file__).resolve().parent.parent
REAL = [root / "shared" / "data" / "openfwi-velocity" / "CurveVel_A" / "model" / "model1.npy" for root in (ROOT, ROOT.parent)]
# Receivers in every cell of the map (and one twice), where the stencil's numerical precursor, far
# ahead of the wave, is small enough for a flush to act.
TINY = dict(nbc=4, nt=20, sources=[(0, 1), (7, 3)], receivers=[(x, z) for z in range(12) for x in range(12)] + [(5, 10)])


def fma32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x * y + z rounded once to float32 (numpy has no fma): the product is exact in float64
    (48 significant bits), the sum's float64 rounding error e is recovered exactly (TwoSum), and
    rounding the float64 sum s to float32 is then correct unless s lies exactly halfway between two
    float32 values with e != 0, where the true sum lies on e's side of the tie."""
    p = x.astype(np.float64) * y.astype(np.float64)
    zz = z.astype(np.float64)
    s = p + zz
    bp = s - zz
    e = (p - bp) + (zz - (s - bp))
    r = s.astype(np.float32)
    d = s - r.astype(np.float64)  # exact (Sterbenz): which side of r the sum lies on
    other = np.nextafter(r, np.where(d > 0, np.float32(np.inf), np.float32(-np.inf)))
    tie = (d != 0) & (e != 0) & (s == (r.astype(np.float64) + other.astype(np.float64)) / 2)
    return np.where(tie & (np.sign(e) == np.sign(d)), other, r)


@pytest.fixture
def one_tile(monkeypatch):
    """The whole 20 x 20 padded grid in one tile: the interpreter runs every program in Python,
    so fewer, larger programs are faster."""
    monkeypatch.setattr(triton_kernel, "TILE", (32, 32))


@pytest.fixture
def exact_fma(monkeypatch):
    """The interpreter's tl.fma, correctly rounded as on the GPU."""
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma",
                        lambda self, x, y, z: interpreter.TensorHandle(fma32(x.data, y.data, z.data), z.dtype.scalar))


def tiny_maps() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.tensor(np.stack([1800 + 1400 * rng.random((12, 12)), 3000 + 1400 * rng.random((12, 12))]), dtype=torch.float32)


def test_fma32_is_correctly_rounded():
    """Against exact rational arithmetic, including products that need the tie correction."""
    from fractions import Fraction  # only this test needs exact rationals

    rng = np.random.default_rng(1)
    x = rng.standard_normal(3000).astype(np.float32)
    y = rng.standard_normal(3000).astype(np.float32)
    z = (rng.standard_normal(3000) * 10.0 ** rng.integers(-8, 2, 3000)).astype(np.float32)
    # A float64 sum exactly halfway between two float32 (1 + 3 2^-24) whose exact value is below it:
    # rounding that sum to float32 (to even) would give 1 + 2^-22, the correct result is 1 + 2^-23.
    x[:50], y[:50], z[:50] = 1 + 2.0 ** -15, 2.0 ** -24 - 2.0 ** -39, 1 + 2.0 ** -23
    assert (x[0].astype(np.float64) * y[0] + z[0]).astype(np.float32) == np.float32(1 + 2.0 ** -22)
    got = fma32(x, y, z)
    for a, b, c, g in zip(x, y, z, got):
        exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
        near = np.float32(float(exact))
        candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
        best = min(candidates, key=lambda q: (abs(Fraction(float(q)) - exact), int(q.view(np.uint32)) & 1))
        assert g == best, (a, b, c)
    assert not np.array_equal(got, x * y + z)  # the check can fail: plain float32 rounds twice


def test_kernel_equals_the_torch_path_bit_for_bit(exact_fma, one_tile):
    """2 maps x 2 sources in one launch per step, the wave wrapping around the 20 x 20 padded grid
    (a source 4 cells from its edge), duplicate and deep receivers, the flush on and off, both time
    alignments."""
    v = tiny_maps()
    # A flush threshold high enough to act on this small grid (the default 1e-30 acts only on
    # larger ones, where the precursor decays further); the test checks that it does act.
    kw = {**TINY, "flush_below": 1e-12}
    ref = forward_model(v, backend="torch", skip_zeros=False, **kw)
    assert not torch.equal(ref, forward_model(v, backend="torch", **{**kw, "flush_below": 0.0}))
    fused = forward_model(v, backend="triton", **kw)
    assert fused.shape == (2, 2, 20, 145) and float(fused.abs().max()) > 0.1
    assert torch.equal(fused, ref)
    kw = {**TINY, "nt": 8, "skip_steps": 1, "flush_below": 0.0}
    assert torch.equal(forward_model(v, backend="triton", **kw), forward_model(v, backend="torch", **kw))


def test_tiles_meet_exactly(exact_fma, monkeypatch):
    """Several tiles per field (3 x 2 tiles of 8 x 16 cells, the last ones part outside the grid):
    the same bits as one tile, i.e. as the torch path."""
    monkeypatch.setattr(triton_kernel, "TILE", (8, 16))
    v = tiny_maps()[:1]
    kw = {**TINY, "nt": 6}
    assert torch.equal(forward_model(v, backend="triton", **kw), forward_model(v, backend="torch", **kw))


def test_plain_interpreter_is_within_rounding_of_the_torch_path(one_tile):
    """Without the correctly rounded fma the interpreter's kernel rounds three more times per
    update: differences of a few float32 ulps of the peak, growing slowly with the steps."""
    v = tiny_maps()
    kw = {**TINY, "nt": 10}
    ref = forward_model(v, backend="torch", **kw)
    fused = forward_model(v, backend="triton", **kw)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    assert not torch.equal(fused, ref)  # the double rounding shows: the other test needs its exact fma


def test_triton_backend_refuses_what_it_cannot_do():
    v = tiny_maps()
    with pytest.raises(ValueError, match="backend='triton': needs the no-grad path in float32"):
        forward_model(v, backend="triton", dtype=torch.float64, **TINY)
    with pytest.raises(ValueError, match="backend='triton': needs the no-grad path"):
        forward_model(v.clone().requires_grad_(True), backend="triton", **TINY)


def real_size_maps(count: int) -> tuple[torch.Tensor, str]:
    for path in REAL:
        if path.exists():
            return torch.from_numpy(np.array(np.load(path, mmap_mode="r")[:count, 0], dtype=np.float32)), f"real {path}"
    return torch.from_numpy(vmaps.generate("CurveVel_A", count, 0)[:, 0]), "generated CurveVel_A"


@pytest.mark.gpu
@pytest.mark.parametrize("graph", ["1", "0"])
def test_cuda_kernel_equals_the_c_kernel_at_openfwi_size(graph, monkeypatch):
    """OpenFWI's full geometry and 1000 samples: the compiled kernel (true fma, nothing else fused)
    gives the C kernel's bits, on a shape's first call and when its graph is replayed; the torch
    ops on CUDA stay within rounding."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _ckernel.available():
        pytest.skip(f"C kernel unavailable: {_ckernel.unavailable_reason()}")
    monkeypatch.setenv("GWI_PHYSICS_CUDA_GRAPH", graph)
    maps, _ = real_size_maps(4)
    cpu = forward_model(maps, backend="c")
    fused = forward_model(maps.cuda(), backend="triton")
    assert fused.device.type == "cuda"
    assert torch.equal(fused.cpu(), cpu)
    # The same shapes again with other maps: the captured graph is replayed on the new inputs.
    other = maps.flip(-1).contiguous()
    assert torch.equal(forward_model(other.cuda(), backend="triton").cpu(), forward_model(other, backend="c"))
    ops = forward_model(maps.cuda(), backend="torch")
    torch.testing.assert_close(ops.cpu(), cpu, rtol=0, atol=1e-5 * float(cpu.abs().max()))
