"""The CPU fast path's fused update, in C: one pass over the region instead of ~12 elementwise torch
ops (each of which reads and writes whole fields), and it reports the box of nonzero cells it wrote
for free.

Compiled on first use with the system C compiler (`cc`, or $CC) into a per-machine cache
($GWI_PHYSICS_CACHE, else $XDG_CACHE_HOME/kagglerig or ~/.cache/kagglerig), loaded with ctypes;
threads are Python threads (ctypes releases the GIL), each taking a band of rows. Without a
compiler `available()` is False and the caller uses the torch path, which computes the same float
operations in the same order: torch's addcmul is a fused multiply-add, written here as fmaf, and
`-ffp-contract=off` keeps the compiler from fusing anything else, so both give the same bits (a
test checks it).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* One step of the update for the interior rows [ra, rb) and columns [c0, c1) of every field.
   P0, P1: fields (B, S, H + 4, W + 4) with a 2-cell halo; P0 holds p(it-2) and receives p(it).
   t1, m2, a2, a3: (B, H, W). The float operations and their order are those of the torch path:
   s1 = ((up1 + down1) + left1) + right1, s2 likewise, p = fma(a3, s2, fma(a2, s1, fma(t1, p1, p0 m2)))
   (torch's addcmul is a fused multiply-add), then |p| <= tiny -> 0 (torch.hardshrink).
   box: first / last+1 nonzero row and column written (rows r0 = INT64_MAX when none). */
void gwi_step_f32(int64_t B, int64_t S, int64_t H, int64_t W, float *P0, const float *P1,
                  const float *t1, const float *m2, const float *a2, const float *a3,
                  int64_t ra, int64_t rb, int64_t c0, int64_t c1, float tiny, int64_t *box)
{
    const int64_t Wp = W + 4, plane = (H + 4) * Wp;
    int64_t rmin = INT64_MAX, rmax = -1, cmin = INT64_MAX, cmax = -1;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t i = ra; i < rb; i++) {
            const float *T1 = t1 + (b * H + i) * W, *M2 = m2 + (b * H + i) * W;
            const float *A2 = a2 + (b * H + i) * W, *A3 = a3 + (b * H + i) * W;
            for (int64_t s = 0; s < S; s++) {
                const int64_t off = (b * S + s) * plane + (i + 2) * Wp + 2;
                const float *restrict p = P1 + off;
                float *restrict q = P0 + off;
                int any = 0;
                for (int64_t j = c0; j < c1; j++) {
                    float s1 = p[j - Wp] + p[j + Wp];
                    s1 = s1 + p[j - 1];
                    s1 = s1 + p[j + 1];
                    float s2 = p[j - 2 * Wp] + p[j + 2 * Wp];
                    s2 = s2 + p[j - 2];
                    s2 = s2 + p[j + 2];
                    float x = q[j] * M2[j];
                    x = fmaf(T1[j], p[j], x);
                    x = fmaf(A2[j], s1, x);
                    x = fmaf(A3[j], s2, x);
                    x = (x >= -tiny && x <= tiny) ? 0.0f : x;  /* torch.hardshrink */
                    q[j] = x;
                    any |= (x != 0.0f);
                }
                if (any) {
                    if (i < rmin) rmin = i;
                    if (i > rmax) rmax = i;
                    int64_t j = c0;
                    while (q[j] == 0.0f) j++;
                    if (j < cmin) cmin = j;
                    j = c1 - 1;
                    while (q[j] == 0.0f) j--;
                    if (j > cmax) cmax = j;
                }
            }
        }
    }
    box[0] = rmin; box[1] = rmax + 1; box[2] = cmin; box[3] = cmax + 1;
}

/* One step of the adjoint sweep (gwi.physics.adjoint) for the rows [ra, rb), every column, the grid
   wrapping around. Per cell of field n = (b, s):
       lam = m2 mu2 + t1 mu1 + sum_d1 a2 mu1 + sum_d2 a3 mu1 (at the neighbours) + G
       gsrc[n] = lam at the field's source cell; mu = lam where pj != 0 (or everywhere: mask 0)
       gm2 += mu p0, gt1 += mu p1, ga2 += mu S1(p1), ga3 += mu S2(p1)   (summed over s: (B, H, W))
   mu is written over mu2 (each cell reads only its own mu2). mu1, mu2, G: (B, S, H, W) contiguous;
   pj, p1, p0: strided (plane and row strides, columns contiguous); t1 .. a3, gt1 .. ga3: (B, H, W).
   A thread owns whole rows of every field of a map, so the sums over s do not race. Each row is
   done in two passes over a row buffer (lam, then the mask and the sums), each in three column
   ranges (the wrapped edges and the contiguous middle, which the compiler vectorises). */
#define ADJ_LAM(j, jm1, jp1, jm2, jp2) do { \
        float s1 = A2u1[j] * Mu1[j] + A2d1[j] * Md1[j]; \
        s1 = s1 + A2c[jm1] * Mc[jm1]; \
        s1 = s1 + A2c[jp1] * Mc[jp1]; \
        float s2 = A3u2[j] * Mu2[j] + A3d2[j] * Md2[j]; \
        s2 = s2 + A3c[jm2] * Mc[jm2]; \
        s2 = s2 + A3c[jp2] * Mc[jp2]; \
        float l = M2[j] * out[j] + T1[j] * Mc[j]; \
        lam[j] = l + s1 + s2 + g[j]; } while (0)
#define ADJ_ACC(j, jm1, jp1, jm2, jp2) do { \
        const float mu = (!mask || R[j] != 0.0f) ? lam[j] : 0.0f; \
        out[j] = mu; \
        float q1 = Pu1[j] + Pd1[j]; \
        q1 = q1 + Pc[jm1]; \
        q1 = q1 + Pc[jp1]; \
        float q2 = Pu2[j] + Pd2[j]; \
        q2 = q2 + Pc[jm2]; \
        q2 = q2 + Pc[jp2]; \
        Gm2[j] += mu * Q[j]; \
        Gt1[j] += mu * Pc[j]; \
        Ga2[j] += mu * q1; \
        Ga3[j] += mu * q2; } while (0)
#define ADJ_ROW(OP) do { \
        for (int64_t j = 0; j < 2 && j < W; j++) \
            OP(j, (j - 1 + W) % W, (j + 1) % W, (j - 2 + 2 * W) % W, (j + 2) % W); \
        for (int64_t j = 2; j < W - 2; j++) OP(j, j - 1, j + 1, j - 2, j + 2); \
        for (int64_t j = (W - 2 > 2 ? W - 2 : 2); j < W; j++) \
            OP(j, (j - 1 + W) % W, (j + 1) % W, (j - 2 + 2 * W) % W, (j + 2) % W); } while (0)

void gwi_adjoint_f32(int64_t B, int64_t S, int64_t H, int64_t W, float *mu2, const float *mu1, const float *G,
                     const float *pj, const float *p1, const float *p0, int64_t sn, int64_t sr,
                     const float *t1, const float *m2, const float *a2, const float *a3,
                     const int64_t *src, float *gsrc, float *gt1, float *gm2, float *ga2, float *ga3,
                     int64_t ra, int64_t rb, int64_t mask)
{
    float lam[W > 0 ? W : 1];
    for (int64_t b = 0; b < B; b++) {
        const float *A2 = a2 + b * H * W, *A3 = a3 + b * H * W;
        for (int64_t i = ra; i < rb; i++) {
            const int64_t rm1 = (i - 1 + H) % H, rp1 = (i + 1) % H, rm2 = (i - 2 + 2 * H) % H, rp2 = (i + 2) % H;
            const int64_t row = (b * H + i) * W;
            const float *T1 = t1 + row, *M2 = m2 + row;
            float *restrict Gt1 = gt1 + row, *restrict Gm2 = gm2 + row, *restrict Ga2 = ga2 + row, *restrict Ga3 = ga3 + row;
            const float *A2u1 = A2 + rm1 * W, *A2d1 = A2 + rp1 * W, *A2c = A2 + i * W;
            const float *A3u2 = A3 + rm2 * W, *A3d2 = A3 + rp2 * W, *A3c = A3 + i * W;
            for (int64_t s = 0; s < S; s++) {
                const int64_t n = b * S + s;
                const float *M = mu1 + n * H * W;
                const float *Mu1 = M + rm1 * W, *Md1 = M + rp1 * W, *Mu2 = M + rm2 * W, *Md2 = M + rp2 * W, *Mc = M + i * W;
                const float *P = p1 + n * sn;
                const float *Pu1 = P + rm1 * sr, *Pd1 = P + rp1 * sr, *Pu2 = P + rm2 * sr, *Pd2 = P + rp2 * sr, *Pc = P + i * sr;
                const float *Q = p0 + n * sn + i * sr, *R = pj + n * sn + i * sr;
                float *restrict out = mu2 + n * H * W + i * W;
                const float *g = G + n * H * W + i * W;
                ADJ_ROW(ADJ_LAM);
                if (src[n] / W == i) gsrc[n] = lam[src[n] % W];
                ADJ_ROW(ADJ_ACC);
            }
        }
    }
}
"""

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-std=c99"]
MIN_CELLS_PER_THREAD = 60_000  # below this a region is done by one thread (dispatch costs more)

_lock = threading.Lock()
_lib = None
_error: str | None = None
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    root = os.environ.get("GWI_PHYSICS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kagglerig"
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"kagglerig-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _cpu_fingerprint() -> str:
    """-march=native code only runs on CPUs with the same features: key the cache by them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) found")
    key = hashlib.sha256("\n".join([SOURCE, *FLAGS, compiler, _cpu_fingerprint(), sys.platform]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gwi_physics_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "kernel.c"
            src.write_text(SOURCE)
            out = Path(tmp) / "kernel.so"
            result = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(out, target)
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gwi_step_f32.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_float,
                                 ctypes.POINTER(ctypes.c_int64)]
    lib.gwi_step_f32.restype = None
    lib.gwi_adjoint_f32.argtypes = [i64, i64, i64, i64, *[ptr] * 6, i64, i64, *[ptr] * 4, ptr, ptr, *[ptr] * 4, i64, i64, i64]
    lib.gwi_adjoint_f32.restype = None
    return lib


def available() -> bool:
    """Whether the kernel is compiled and loaded (builds it on the first call)."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("GWI_PHYSICS_NO_C"):
                _error = "disabled by GWI_PHYSICS_NO_C"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError) as err:
                    _error = str(err)
    return _lib is not None


def unavailable_reason() -> str | None:
    available()
    return _error


class Stepper:
    """Applies the update to fields P0 / P1 (B, S, H+4, W+4) float32 contiguous with coefficients
    (B, 1, H, W) float32 contiguous, over a region, on `threads` threads."""

    def __init__(self, P0, P1, t1, m2, a2, a3, tiny: float, threads: int | None = None):
        assert available()
        B, S, Hp, Wp = P0.shape
        self.dims = (B, S, Hp - 4, Wp - 4)
        self.coef = [x.data_ptr() for x in (t1, m2, a2, a3)]
        self.ptrs = {id(P0): P0.data_ptr(), id(P1): P1.data_ptr()}
        self.keep = (P0, P1, t1, m2, a2, a3)  # alive while stepping
        self.tiny = ctypes.c_float(tiny)
        self.threads = max(1, threads or torch.get_num_threads())
        self.boxes = [(ctypes.c_int64 * 4)() for _ in range(self.threads)]

    def _call(self, k, out_ptr, in_ptr, ra, rb, c0, c1):
        _lib.gwi_step_f32(*self.dims, out_ptr, in_ptr, *self.coef, ra, rb, c0, c1, self.tiny, self.boxes[k])
        return tuple(self.boxes[k])

    def step(self, out: torch.Tensor, inp: torch.Tensor, region):
        """Writes the update over `region` (r0, r1, c0, c1) into `out` (P0) reading `inp` (P1);
        returns the box of nonzero cells written, or None."""
        r0, r1, c0, c1 = region
        out_ptr, in_ptr = self.ptrs[id(out)], self.ptrs[id(inp)]
        cells = (r1 - r0) * (c1 - c0) * self.dims[0] * self.dims[1]
        boxes = _in_bands(lambda k, ra, rb: self._call(k, out_ptr, in_ptr, ra, rb, c0, c1), r0, r1, cells, self.threads)
        boxes = [b for b in boxes if b[1] > 0]
        if not boxes:
            return None
        return (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))


def _in_bands(call, r0: int, r1: int, cells: int, threads: int) -> list:
    """call(k, ra, rb) for bands k of the rows [r0, r1) on up to `threads` threads (one when the
    region is small); their results in order."""
    global _pool
    n = max(1, min(threads, cells // MIN_CELLS_PER_THREAD, r1 - r0))
    if n == 1:
        return [call(0, r0, r1)]
    with _lock:
        if _pool is None or _pool._max_workers < n - 1:
            _pool = ThreadPoolExecutor(max_workers=max(n, threads) - 1, thread_name_prefix="gwi-physics")
        pool = _pool
    edges = [r0 + (r1 - r0) * k // n for k in range(n + 1)]
    futures = [pool.submit(call, k, edges[k], edges[k + 1]) for k in range(1, n)]
    return [call(0, edges[0], edges[1])] + [f.result() for f in futures]  # the first band on this thread


def adjoint_step(mu2, mu1, G, pj, p1, p0, t1, m2, a2, a3, src, gsrc, gt1, gm2, ga2, ga3, mask: bool,
                 threads: int | None = None) -> None:
    """One step of the adjoint sweep (the C source's gwi_adjoint_f32), float32 CPU tensors: mu2, mu1,
    G contiguous (B, S, H, W); pj, p1, p0 (B, S, H, W) views with contiguous rows and one common
    stride; t1 .. a3 and gt1 .. ga3 contiguous (B, 1, H, W); src int64 (B S,); gsrc float32 (B S,)."""
    assert available()
    B, S, H, W = mu2.shape
    assert pj.stride() == p1.stride() == p0.stride() and pj.stride(-1) == 1 and pj.stride(0) == S * pj.stride(1)
    sn, sr = pj.stride(1), pj.stride(2)
    ptrs = [x.data_ptr() for x in (mu2, mu1, G, pj, p1, p0)]
    rest = [x.data_ptr() for x in (t1, m2, a2, a3, src, gsrc, gt1, gm2, ga2, ga3)]
    _in_bands(lambda k, ra, rb: _lib.gwi_adjoint_f32(B, S, H, W, *ptrs, sn, sr, *rest, ra, rb, int(mask)),
              0, H, B * S * H * W, max(1, threads or torch.get_num_threads()))
