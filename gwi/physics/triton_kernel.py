"""The CUDA fast path's fused update, in Triton: one kernel launch per time step does the whole
update of every field of a batch (all sources of all samples), the damping, the flush of tiny
values, the source injection, and the recording of the previous step's receivers; the time loop is
captured once per shape as a CUDA graph and replayed, so 1,000 launches cost one.

The float operations and their order are those of the torch path and of the C kernel (see
gwi/physics/acoustic.py, "Arithmetic"):
    s1 = ((up1 + down1) + left1) + right1,  s2 likewise at distance 2,
    p = fma(a3, s2, fma(a2, s1, fma(t1, p1, p0 * m2))),  |p| <= tiny -> 0,  p += amp at the source,
the neighbours wrapping around the padded grid's edges (circshift). `tl.fma` is a fused
multiply-add on the GPU, as torch's addcmul and the C kernel's fmaf are, and the kernel is
compiled with `enable_fp_fusion=False` so that nothing else is fused: the GPU gives the C
kernel's bits. Triton's interpreter (the kernel run on CPU tensors, for tests) evaluates
`tl.fma(x, y, z)` as x * y + z in numpy float32, two roundings; a test gives it a correctly
rounded fma and then checks the kernel against the torch path bit for bit.

The fields are unpadded (N, H, W) buffers (N = batch x sources); the wrap is index arithmetic
on a tile's rows and columns (a select per row and per column, not per cell, and no division).
Each program updates a BH x BW tile of one field. In launch order the tiles of one field come
together, row of tiles after row of tiles, and the S fields of one sample one after the other: a
tile's 2-cell border is read again by the next row of tiles a few programs later (from L1 / L2),
and the S fields of a sample read the same coefficients within about S x 2.7 MB of other traffic,
well inside the 50-60 MB of L2 of an H100 / H200. So per update the DRAM traffic is, in the
limit: read p(t-1) and p(t-2), write p(t) (12 bytes), plus the 4 coefficients (16 bytes) read
once per sample (16 / S bytes): 15.2 bytes at S = 5, the model of `bytes_per_update`, which
bench/forward.py's bandwidth bound uses.

The receivers of step it are gathered by the launch of step it + 1 (which reads that field and
does not write it: no race), and those of the last step by one torch gather after the loop.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # triton ships with torch's Linux wheels only; elsewhere the torch path is used
    triton = None

TILE = (16, 64)  # BH x BW cells per program: 16 rows of 64 cells (256 contiguous bytes a row)
MAX_FIELDS = 65535  # CUDA's limit on a grid's third axis, which holds the fields
FIELD_BYTES, COEFFICIENT_BYTES = 12, 16  # per update: p(t-2), p(t-1) read and p(t) written; t1, m2, a2, a3


def bytes_per_update(sources: int) -> float:
    """The bandwidth model above: 12 bytes of fields plus the coefficients shared by `sources` fields."""
    return FIELD_BYTES + COEFFICIENT_BYTES / sources


def _step(P_out, P_in, T1, M2, A2, A3, amp, src, rec, out, it, k, N, S, H, W, R, tiny,
          FLUSH: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_R: tl.constexpr):
    """One step on every field: P_out (p(it-2) in, p(it) out) from P_in (p(it-1)), both (N, H, W);
    coefficients (N / S, H, W); amp (steps, N); src (S,) and rec (R,) flat cell indices; out
    (nt, N, R) receives P_in's receivers as row k when k >= 0. A program: a BH x BW tile of one
    field; the wrapped neighbour rows and columns are computed per row and per column, not per cell."""
    tj = tl.program_id(0)
    ti = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    HW = H * W
    base = n * HW
    cbase = (n // S) * HW
    rows = ti * BH + tl.arange(0, BH)
    cols = tj * BW + tl.arange(0, BW)
    mask = (rows < H)[:, None] & (cols < W)[None, :]
    row = (rows * W)[:, None]
    col = cols[None, :]
    up1 = (tl.where(rows >= 1, rows - 1, rows - 1 + H) * W)[:, None] + col
    down1 = (tl.where(rows + 1 < H, rows + 1, rows + 1 - H) * W)[:, None] + col
    left1 = row + tl.where(cols >= 1, cols - 1, cols - 1 + W)[None, :]
    right1 = row + tl.where(cols + 1 < W, cols + 1, cols + 1 - W)[None, :]
    up2 = (tl.where(rows >= 2, rows - 2, rows - 2 + H) * W)[:, None] + col
    down2 = (tl.where(rows + 2 < H, rows + 2, rows + 2 - H) * W)[:, None] + col
    left2 = row + tl.where(cols >= 2, cols - 2, cols - 2 + W)[None, :]
    right2 = row + tl.where(cols + 2 < W, cols + 2, cols + 2 - W)[None, :]
    centre = row + col
    pin = P_in + base
    s1 = tl.load(pin + up1, mask=mask, other=0.0) + tl.load(pin + down1, mask=mask, other=0.0)
    s1 = s1 + tl.load(pin + left1, mask=mask, other=0.0)
    s1 = s1 + tl.load(pin + right1, mask=mask, other=0.0)
    s2 = tl.load(pin + up2, mask=mask, other=0.0) + tl.load(pin + down2, mask=mask, other=0.0)
    s2 = s2 + tl.load(pin + left2, mask=mask, other=0.0)
    s2 = s2 + tl.load(pin + right2, mask=mask, other=0.0)
    p1 = tl.load(pin + centre, mask=mask, other=0.0)
    p0 = tl.load(P_out + base + centre, mask=mask, other=0.0)
    x = p0 * tl.load(M2 + cbase + centre, mask=mask, other=0.0)
    x = tl.fma(tl.load(T1 + cbase + centre, mask=mask, other=0.0), p1, x)
    x = tl.fma(tl.load(A2 + cbase + centre, mask=mask, other=0.0), s1, x)
    x = tl.fma(tl.load(A3 + cbase + centre, mask=mask, other=0.0), s2, x)
    if FLUSH:
        x = tl.where((x >= -tiny) & (x <= tiny), 0.0, x)  # torch.hardshrink
    cell = tl.load(src + n % S)
    x = tl.where(centre == cell, x + tl.load(amp + (it - 1) * N + n), x)
    tl.store(P_out + base + centre, x, mask=mask)
    if k >= 0:
        if ti + tj == 0:  # the field's first tile records
            r = tl.arange(0, BLOCK_R)
            rmask = r < R
            cells = tl.load(rec + r, mask=rmask, other=0)
            tl.store(out + (k * N + n) * R + r, tl.load(pin + cells, mask=rmask, other=0.0), mask=rmask)


# The same source, compiled for the GPU or run by the interpreter on CPU tensors. `it` and `k`
# change every step: not specialised, so one compiled kernel serves every step (and the graph).
_jit = triton.jit(_step, do_not_specialize=["it", "k"]) if triton is not None else None
_interpreted = InterpretedFunction(_step) if triton is not None else None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on `device` (None: it can). CPU tensors run it under Triton's
    interpreter (slow: for tests)."""
    if triton is None:
        return "triton is not installed"
    if os.environ.get("GWI_PHYSICS_NO_TRITON"):
        return "disabled by GWI_PHYSICS_NO_TRITON"
    if device.type not in ("cuda", "cpu"):
        return f"no Triton kernel for {device.type} tensors"
    return None


def _use_graph(device: torch.device, cuda_graph: bool | None) -> bool:
    if device.type != "cuda":
        return False
    if cuda_graph is None:
        return os.environ.get("GWI_PHYSICS_CUDA_GRAPH", "1") != "0"
    return cuda_graph


class _Run:
    """The buffers and launches of one simulation shape: static tensors a CUDA graph can replay."""

    def __init__(self, B, S, H, W, R, steps, skip, tiny, src, rec, dtype, device):
        N = B * S
        if N > MAX_FIELDS:
            raise ValueError(f"the Triton path runs at most {MAX_FIELDS} fields (samples x sources) at once, got {N}: "
                             "lower forward_model's batch_size")
        self.N, self.H, self.W, self.steps, self.skip = N, H, W, steps, skip
        self.coef = [torch.empty(B, H, W, dtype=dtype, device=device) for _ in range(4)]
        self.amp = torch.empty(steps, N, dtype=dtype, device=device)
        self.src = torch.as_tensor(src, dtype=torch.int32, device=device)
        self.rec = torch.as_tensor(rec, dtype=torch.int32, device=device)
        self.rec_long = self.rec.long()
        self.P = [torch.zeros(N, H, W, dtype=dtype, device=device) for _ in range(2)]
        self.out = torch.empty(steps - skip, N, R, dtype=dtype, device=device)
        self.kernel = _jit if device.type == "cuda" else _interpreted
        BH, BW = TILE
        self.grid = (triton.cdiv(W, BW), triton.cdiv(H, BH), N)  # column tiles fastest, the fields slowest
        self.args = (S, H, W, R, float(tiny))
        self.options = dict(FLUSH=bool(tiny), BH=BH, BW=BW, BLOCK_R=triton.next_power_of_2(R))
        if device.type == "cuda":
            self.options["enable_fp_fusion"] = False  # only the explicit fma are fused
        self.graph = None

    def launch(self, it: int) -> None:
        """Step it (1-based): P[it % 2] (p(it-2)) receives p(it) from P[1 - it % 2] (p(it-1)), whose
        receivers are recorded as row it - skip - 2 when that is a recorded step."""
        P_out, P_in = self.P[it % 2], self.P[1 - it % 2]
        self.kernel[self.grid](P_out, P_in, *self.coef, self.amp, self.src, self.rec, self.out, it, it - self.skip - 2,
                               self.N, *self.args, **self.options)

    def steps_after_the_first(self) -> None:
        for it in range(2, self.steps + 1):
            self.launch(it)
        if self.steps > self.skip:  # the last step's receivers
            torch.index_select(self.P[self.steps % 2].view(self.N, -1), 1, self.rec_long, out=self.out[-1])

    def run(self, coef, amp, graph: bool) -> torch.Tensor:
        for buffer, value in zip(self.coef, coef):
            buffer.copy_(value.reshape(buffer.shape))
        self.amp.copy_(amp.reshape(self.amp.shape))
        for P in self.P:
            P.zero_()
        # Step 1 runs eagerly: the first launch compiles the kernel, which a graph capture cannot.
        self.launch(1)
        if not graph:
            self.steps_after_the_first()
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.steps_after_the_first()
            self.graph.replay()
        return self.out.clone()  # the buffers serve the next call


# The _Runs of the last CACHED shapes on the GPU, least recently used first: their captured graphs
# are replayed while the shapes repeat (two: a generation loop's full batches and a file's last,
# partial one alternate).
CACHED = 2
_cached: dict = {}


def simulate(t1, m2, a2, a3, amp, src, rec, steps: int, skip: int, tiny: float,
             cuda_graph: bool | None = None) -> torch.Tensor:
    """Runs `steps` steps from zero fields. t1, m2, a2, a3: (B, 1, H, W) float32; amp (steps, B, S);
    src (S,) and rec (R,): flat cell indices on the (H, W) grid. Returns the records of the steps
    after `skip`, (steps - skip, B * S, R), as the torch path does.

    cuda_graph (default: on, unless GWI_PHYSICS_CUDA_GRAPH=0): steps 2.. are captured once as one
    CUDA graph and replayed by every later call of the same shapes (a generation loop's batches):
    the buffers of the last two shapes stay allocated for that (1.8 GB at batch 256 with OpenFWI's
    settings). Without it (and on the CPU) every step is one launch."""
    B, _, H, W = t1.shape
    device = t1.device
    graph = _use_graph(device, cuda_graph)
    key = (device, B, len(src), H, W, tuple(int(x) for x in src), tuple(int(x) for x in rec), steps, skip, float(tiny), t1.dtype)
    run = _cached.pop(key, None) if graph else None
    if run is None:
        while len(_cached) >= CACHED:
            _cached.pop(next(iter(_cached)))
        run = _Run(B, len(src), H, W, len(rec), steps, skip, tiny, src, rec, t1.dtype, device)
    if graph:
        _cached[key] = run  # the most recently used last
    return run.run((t1, m2, a2, a3), amp, graph)
