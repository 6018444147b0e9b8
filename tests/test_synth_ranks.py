"""`python -m gwi.physics.synth` split over the processes of a launcher (RANK / WORLD_SIZE): the same
files, bit for bit, as one process; each process resumes its own shards.

Tiny shards (one sample each, 12 time steps); the `accelerate launch` run starts two interpreters."""
from __future__ import annotations

import pytest

from conftest import accelerate_launch
from gwi.physics.synth import launcher_ranks, main as synth_main

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--family", "CurveVel_A", "--n", "5", "--per-file", "1", "--nt", "12", "--seed", "7"]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def as_rank(monkeypatch, rank: int, world: int) -> None:
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in LAUNCHER_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        assert synth_main([*ARGS, "--out", str(out)]) == 0
    written = files(out)
    assert len(written) == 10  # 5 shards x (data, model)
    return written


def test_ranks_split_the_shards_and_write_the_same_bits(tmp_path, monkeypatch, capsys, one_process):
    """Rank 1 of 2 writes shards 2 and 4, rank 0 shards 1, 3, 5, whichever runs first; together
    the same bytes as one process. Then rank 1 is "interrupted": one of its shards lost its data
    file, the other has a truncated one; its rerun redoes exactly those, leaving rank 0's alone."""
    out = tmp_path / "two"
    as_rank(monkeypatch, 1, 2)
    assert synth_main([*ARGS, "--out", str(out)]) == 0
    assert "CurveVel_A (process 1 of 2, cpu): 0 of 2 shards already written" in capsys.readouterr().err
    assert sorted(files(out)) == ["CurveVel_A/data/data2.npy", "CurveVel_A/data/data4.npy",
                                  "CurveVel_A/model/model2.npy", "CurveVel_A/model/model4.npy"]
    as_rank(monkeypatch, 0, 2)
    assert synth_main([*ARGS, "--out", str(out)]) == 0
    assert files(out) == one_process

    data = out / "CurveVel_A" / "data"
    (data / "data2.npy").unlink()
    (data / "data4.npy").write_bytes(one_process["CurveVel_A/data/data4.npy"][:200])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    as_rank(monkeypatch, 1, 2)
    assert synth_main([*ARGS, "--out", str(out)]) == 0
    assert "0 of 2 shards already written; simulating 2 samples" in capsys.readouterr().err
    changed = sorted(p.name for p in out.rglob("*.npy") if before.get(p) != p.stat().st_mtime_ns)
    assert changed == ["data2.npy", "data4.npy", "model2.npy", "model4.npy"]
    assert files(out) == one_process
    assert synth_main([*ARGS, "--out", str(out)]) == 0  # finished: nothing to do
    assert "2 of 2 shards already written" in capsys.readouterr().err


def test_launcher_environment(monkeypatch, capsys):
    as_rank(monkeypatch, 3, 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launcher_ranks() == (3, 4, 1, 2)
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name)
    assert launcher_ranks() == (0, 1, 0, 1)
    # Refused with exit code 2; rank 0 says why in one line (the others stay quiet, as every entry point's).
    for rank, world, message in (("0", "0", "variables RANK=0, WORLD_SIZE=0: expected 0 <= RANK < WORLD_SIZE"),
                                 ("0", "two", "variable WORLD_SIZE='two': expected an integer"),
                                 ("2", "2", None)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        assert synth_main([*ARGS, "--out", "unused"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == ([f"error: environment {message}"] if message else []), lines


def test_accelerate_launch_two_processes_write_the_same_bits(tmp_path, one_process):
    """`accelerate launch --multi_gpu --num_processes 2 -m gwi.physics.synth` with
    ACCELERATE_USE_CPU=true: two processes, the one-process run's files."""
    out = tmp_path / "launched"
    result = accelerate_launch(2, "gwi.physics.synth", *ARGS, "--out", out, module=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "process 0 of 2" in result.stderr and "process 1 of 2" in result.stderr
    assert files(out) == one_process
