"""Pseudo-labels (gwi/pseudo.py): `python -m gwi.pseudo` writes re-simulated (F(map), map) pairs in the
OpenFWI layout with a manifest, filters by misfit, refuses bad input in one line and leaves nothing
half-written; in training, data.pseudo_dir refreshes the set and a resumed run reuses the round on disk
and ends with the same weights as a straight run."""
from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SMOKE_GWI, accelerate_launch, read_metrics
from gwi import online as online_sim
from gwi.layout import MANIFEST, find_pairs
from gwi.physics.acoustic import forward_model
from gwi.physics.fwi import seismic_misfit
from gwi.physics.velocity import generate
from gwi.data import ArrayPair, SeismicPairs
from gwi.pseudo import PSEUDO_FAMILY, PSEUDO_FAMILY_INDEX, PseudoMix, main
from gwi.task import GwiTask
from gwi_files import write_tree
from harness import checkpoint as ckpt
from harness.config import load_config
from harness.errors import ConfigError
from harness.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def smoke_files(tree, run, *extra) -> list[str]:
    return ["data.source=files", f"data.roots=[{tree}]", f"data.val_roots=[{tree}]", f"output_dir={run}", "trainer.batch_size=4",
            "log.wandb=disabled", "log.plot=false", "data.time_steps=64", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(a tiny trained run on random pairs, a test folder: two simulated FlatVel_A files and one of noise)."""
    root = tmp_path_factory.mktemp("pseudo")
    tree = write_tree(root / "tree", {"FlatVel_A": ("vel", 4, 2)}, dtype=np.float16)
    train(load_config(SMOKE_GWI, smoke_files(tree, root / "run", "trainer.epochs=1")))
    test = root / "test"
    test.mkdir()
    seismic = forward_model(generate("FlatVel_A", 2, rng=3).astype(np.float32))
    for name, sample in zip(("a", "b"), seismic):
        np.save(test / f"{name}.npy", sample)
    np.save(test / "c.npy", np.random.default_rng(0).normal(0, 3, (5, 1000, 70)).astype(np.float32))
    return tree, root / "run", test


def test_pseudo_writes_resimulated_pairs_with_a_manifest_and_filters_by_misfit(setup, tmp_path, capsys):
    _, run, test = setup
    out = tmp_path / "all"
    assert main(["--checkpoint", str(run), "--data", str(test), "--out", str(out), "--tta", "flip", "--num-workers", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"] == printed["kept"] == 3 and printed["dropped"] == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["checkpoint"] == str(run) and manifest["tta"] == "flip"
    assert [r["source"] for r in manifest["samples"]] == ["a.npy", "b.npy", "c.npy"]
    (pair,) = find_pairs([out])  # a data root like any other
    assert pair.family == PSEUDO_FAMILY and pair.samples == 3
    seismic, velocity = (np.load(p) for p in (pair.seismic, pair.velocity))
    assert seismic.dtype == np.float16 and velocity.dtype == np.float32
    # The seismic is the simulation of the stored map (to float16's rounding), and the recorded misfit
    # is that map's misfit against the test file's own seismic.
    np.testing.assert_allclose(seismic, forward_model(velocity), rtol=2e-3, atol=2e-3)
    observed = np.stack([np.load(test / r["source"]) for r in manifest["samples"]])
    np.testing.assert_allclose([r["misfit"] for r in manifest["samples"]], seismic_misfit(velocity, observed), rtol=1e-4)

    misfits = sorted(r["misfit"] for r in manifest["samples"])
    kept_out = tmp_path / "kept"
    assert main(["--checkpoint", str(run), "--data", str(test), "--out", str(kept_out), "--tta", "flip",
                 "--max-misfit", str(misfits[1]), "--num-workers", "0"]) == 0
    kept = json.loads((kept_out / MANIFEST).read_text())
    assert kept["kept"] == 2 and kept["dropped"] == 1
    rows = [r for r in kept["samples"] if r["kept"]]
    assert all(r["misfit"] <= misfits[1] for r in rows) and [r["row"] for r in rows] == [0, 1]
    kept_velocity = np.load(find_pairs([kept_out])[0].velocity)
    positions = [[r["source"] for r in manifest["samples"]].index(r["source"]) for r in rows]
    np.testing.assert_array_equal(kept_velocity, velocity[positions])


def test_pseudo_bad_input_is_one_line_and_leaves_nothing(setup, tmp_path, capsys):
    _, run, test = setup
    taken = tmp_path / "taken"
    (taken / "x").mkdir(parents=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    np.save(broken / "a.npy", np.zeros((5, 999, 70), np.float32))
    cases = [
        (["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o1")], f"error: --data {tmp_path / 'none'}: not a directory"),
        (["--data", str(test), "--out", str(taken)], f"error: --out {taken}: exists and is not empty; remove it or choose another"),
        (["--data", str(test), "--out", str(tmp_path / "o2"), "--refine-tv", "2"],
         "error: --refine-tv / --refine-lr: they only act with --refine-steps N"),
        (["--data", str(test), "--out", str(tmp_path / "o3"), "--max-misfit", "-1"], "error: argument --max-misfit: expected a value >= 0"),
        (["--data", str(broken), "--out", str(tmp_path / "o4")], f"error: {broken / 'a.npy'}: shape (5, 999, 70), expected (5, 1000, 70)"),
    ]
    for args, message in cases:
        try:
            code = main(["--checkpoint", str(run), "--num-workers", "0", *args])
        except SystemExit as exit:  # argparse's errors exit directly
            code = exit.code
        err = capsys.readouterr().err  # the progress bar may come first
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and errors[0].startswith(message) and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken"]  # no output, no temporary folder


def stopped_after_update(update: int, cfg, monkeypatch) -> dict:
    """The run of `cfg` stopped by SIGTERM after update `update` (the loop's handler saves `last`)."""
    original = GwiTask.after_update

    def stop(self, model, step):
        if step == update - 1:
            signal.raise_signal(signal.SIGTERM)  # the loop stops after the next update
        return original(self, model, step)

    with monkeypatch.context() as patch:
        patch.setattr(GwiTask, "after_update", stop)
        return train(cfg)


def test_in_training_rounds_resume_exactly_from_the_round_on_disk(setup, tmp_path, monkeypatch):
    tree, _, test = setup
    # 8 samples in batches of 2: 4 updates an epoch; a round at the start of epoch 2 (k = 2), after
    # update 8; a stop after update 10 (mid-epoch 2, after the round was made), and a resume.
    common = ["trainer.epochs=3", f"data.pseudo_dir={test}", "data.pseudo_every_epochs=2", "data.pseudo_fraction=0.5",
              "sched.name=constant", "trainer.deterministic=true", "trainer.batch_size=2"]
    straight = train(load_config(SMOKE_GWI, smoke_files(tree, tmp_path / "straight", *common)))
    assert straight["stopped"] == "finished" and straight["step"] == 12
    manifest = json.loads((tmp_path / "straight" / "pseudo" / "epoch0002" / MANIFEST).read_text())
    assert manifest["files"] == 3 and manifest["tta"] == "flip"

    interrupted = tmp_path / "interrupted"
    stopped = stopped_after_update(10, load_config(SMOKE_GWI, smoke_files(tree, interrupted, *common)), monkeypatch)
    assert stopped["stopped"] == "SIGTERM" and ckpt.read_meta(interrupted / "checkpoints" / "last")["step"] == 10
    round_file = interrupted / "pseudo" / "epoch0002" / MANIFEST
    made = round_file.stat().st_mtime_ns
    resumed = train(load_config(SMOKE_GWI, smoke_files(tree, interrupted, *common)))
    assert resumed["stopped"] == "finished" and resumed["step"] == 12
    assert round_file.stat().st_mtime_ns == made  # read back, not made again
    for name in ("model.safetensors", "weights.safetensors"):
        a, b = (load_file(str(d / "checkpoints" / "last" / name)) for d in (tmp_path / "straight", interrupted))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_pseudo_mix_replaces_a_fraction_of_samples_by_seed_epoch_and_index():
    def pairs(value: float, count: int) -> SeismicPairs:
        seismic = np.zeros((count, 5, 8, 70), np.float32)
        return SeismicPairs([ArrayPair("X", seismic, np.full((count, 1, 70, 70), value, np.float32))], ["X"])

    def replaced(mix: PseudoMix) -> list[bool]:
        return [bool(mix[i][1][0, 0, 0] == 4000) for i in range(len(mix))]

    mix = PseudoMix(pairs(2000, 200), fraction=0.5, seed=0)
    assert not any(replaced(mix))  # no round yet
    mix.use(pairs(4000, 5))
    first = replaced(mix)
    assert 70 < sum(first) < 130 and replaced(mix) == first and mix[first.index(True)][2] == PSEUDO_FAMILY_INDEX
    assert mix[0][0].dtype == torch.float32 and len(mix) == 200
    mix.set_epoch(1)
    assert replaced(mix) != first
    assert replaced(PseudoMix(pairs(2000, 200), fraction=0.5, seed=1)) == [False] * 200  # nothing until use()
    for fraction, expected in ((0.0, 0), (1.0, 200)):
        other = PseudoMix(pairs(2000, 200), fraction=fraction, seed=0)
        other.use(pairs(4000, 5))
        assert sum(replaced(other)) == expected


# ---- with online draws ------------------------------------------------------------------------------------

# 4 draws an epoch plus the 3 unlabelled test files, in full batches of 2: 3 updates an epoch; a round at
# the start of epoch 1; the physics term on one sample of every update (its first 10 time samples).
ONLINE_WITH_TEST = ["data.source=online", "data.num_train=4", "data.num_val=2", "data.families=[FlatVel_A]",
                    "data.time_steps=64", "trainer.batch_size=2", "trainer.epochs=2", "sched.name=constant",
                    "trainer.deterministic=true", "log.wandb=disabled", "log.plot=false", "log.progress=none",
                    "log.every_steps=1", "data.pseudo_every_epochs=1", "data.pseudo_fraction=0.5", "loss.physics_weight=0.1",
                    "loss.physics_batch_size=1", "loss.physics_time_steps=10"]


def online_with_test(test, run_dir) -> list[str]:
    return [*ONLINE_WITH_TEST, f"data.pseudo_dir={test}", f"data.unlabelled_roots=[{test}]", f"output_dir={run_dir}"]


def test_pseudo_labels_and_unlabelled_files_mix_with_online_draws(setup, tmp_path):
    _, _, test = setup
    cfg = load_config(SMOKE_GWI, online_with_test(test, tmp_path / "run"))
    train_set, _ = GwiTask(cfg).build_datasets(cfg)
    assert len(train_set) == 4 + 3
    train_set.use(SeismicPairs([ArrayPair("X", np.ones((1, 5, 1000, 70), np.float16), np.full((1, 1, 70, 70), 4000, np.float32))], ["X"]))
    samples = [train_set[i] for i in range(len(train_set))]
    assert all(len(s) == 4 for s in samples)  # every sample carries the online flag: one batch format
    draw = next(s for s in samples if s[3])
    pseudo = next(s for s in samples if s[2] == PSEUDO_FAMILY_INDEX and not torch.isnan(s[1]).any())
    unlabelled = train_set.base[6]  # the wrapped set: the draws, then the test files
    assert len(unlabelled) == 4 and torch.isnan(unlabelled[1]).all()
    assert pseudo[0].dtype == unlabelled[0].dtype == torch.float32  # the simulator's dtype: draws come first
    seismic, velocity, family, online = online_sim.collate([draw, pseudo, unlabelled])
    assert online.tolist() == [True, False, False]
    seismic = online_sim.OnlineSimulator(1000)((seismic, velocity, family, online), torch.device("cpu"))[0]
    assert torch.equal(seismic[0], forward_model(draw[1][None])[0])
    assert torch.equal(seismic[1], torch.ones(5, 1000, 70)) and torch.equal(seismic[2], unlabelled[0])

    summary = train(cfg)
    assert summary["stopped"] == "finished" and summary["step"] == 6
    manifest = json.loads((tmp_path / "run" / "pseudo" / "epoch0001" / MANIFEST).read_text())
    assert manifest["files"] == 3
    rows = read_metrics(tmp_path / "run")
    assert len([r for r in rows if "train/physics_misfit" in r]) == 6
    assert all(0 < r["train/simulation_share"] < 1 for r in rows if "train/simulation_share" in r)


def test_mixing_with_online_draws_needs_their_full_record(setup, tmp_path):
    _, _, test = setup
    cfg = load_config(SMOKE_GWI, [*online_with_test(test, tmp_path), "data.online_nt=100"])
    with pytest.raises(ConfigError, match="key 'data.online_nt': online draws mixed with the test files of data.pseudo_dir "
                                          "must simulate their 1000 time samples, got 100"):
        GwiTask(cfg).build_datasets(cfg)


@pytest.mark.slow
def test_online_draws_with_pseudo_labels_resume_exactly(setup, tmp_path, monkeypatch):
    _, _, test = setup
    straight = train(load_config(SMOKE_GWI, online_with_test(test, tmp_path / "straight")))
    assert straight["step"] == 6
    interrupted = tmp_path / "interrupted"  # stopped mid-epoch 1, after its round
    assert stopped_after_update(5, load_config(SMOKE_GWI, online_with_test(test, interrupted)), monkeypatch)["stopped"] == "SIGTERM"
    assert ckpt.read_meta(interrupted / "checkpoints" / "last")["step"] == 5
    assert train(load_config(SMOKE_GWI, online_with_test(test, interrupted)))["step"] == 6
    for name in ("model.safetensors", "weights.safetensors"):
        a, b = (load_file(str(d / "checkpoints" / "last" / name)) for d in (tmp_path / "straight", interrupted))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_two_processes_share_a_round_and_write_one_manifest_in_file_order(setup, tmp_path):
    tree, _, test = setup
    run = tmp_path / "run"
    result = accelerate_launch(2, "train.py", SMOKE_GWI, *smoke_files(tree, run, "trainer.epochs=2", f"data.pseudo_dir={test}",
                                                                       "data.pseudo_every_epochs=1", "trainer.batch_size=2"))
    assert result.returncode == 0, result.stderr
    folder = run / "pseudo" / "epoch0001"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert [row["source"] for row in manifest["samples"]] == ["a.npy", "b.npy", "c.npy"] and manifest["kept"] == 3
    # a.npy and c.npy went to process 0, b.npy to process 1: each wrote its own shard
    assert [row["file"] for row in manifest["samples"]] == [f"{PSEUDO_FAMILY}/data/data{r}_1.npy" for r in (1, 2, 1)]
    assert [row["row"] for row in manifest["samples"]] == [0, 0, 1]
    assert sorted(p.name for p in run.joinpath("pseudo").iterdir()) == ["epoch0001"]  # no parts folder left
    pairs = find_pairs([folder])
    assert sum(p.samples for p in pairs) == 3
    # each row's misfit is that of the map stored where the row says, against its own test file
    velocity = np.stack([np.load(folder / row["file"].replace("/data/data", "/model/model"))[row["row"]]
                         for row in manifest["samples"]])
    observed = np.stack([np.load(test / row["source"]) for row in manifest["samples"]])
    np.testing.assert_allclose([r["misfit"] for r in manifest["samples"]], seismic_misfit(velocity, observed), rtol=1e-4)


@pytest.mark.slow
def test_accelerate_launch_splits_the_cli_over_processes_with_the_same_labels(setup, tmp_path):
    _, run, test = setup
    assert main(["--checkpoint", str(run), "--data", str(test), "--out", str(tmp_path / "one"), "--num-workers", "0"]) == 0
    result = accelerate_launch(2, "gwi.pseudo", "--checkpoint", run, "--data", test, "--out", tmp_path / "two",
                               "--num-workers", "0", module=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('"kept": 3') == 1  # one summary, from the main process
    one, two = (json.loads((tmp_path / name / MANIFEST).read_text()) for name in ("one", "two"))
    assert [r["source"] for r in one["samples"]] == [r["source"] for r in two["samples"]]
    np.testing.assert_allclose([r["misfit"] for r in two["samples"]], [r["misfit"] for r in one["samples"]], rtol=1e-5)
    maps = [np.stack([np.load(tmp_path / name / r["file"].replace("/data/data", "/model/model"))[r["row"]] for r in m["samples"]])
            for name, m in (("one", one), ("two", two))]
    np.testing.assert_allclose(maps[1], maps[0], atol=1e-2)  # m/s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no temporary folder left

    # a malformed file in process 1's share (b.npy): both processes stop with its one-line error, nothing written
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a", "b", "c"):
        (broken / f"{name}.npy").write_bytes((test / f"{name}.npy").read_bytes())
    (broken / "b.npy").write_text("not an array")
    result = accelerate_launch(2, "gwi.pseudo", "--checkpoint", run, "--data", broken, "--out", tmp_path / "three",
                               "--num-workers", "0", module=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and errors[0].startswith(f"error: {broken / 'b.npy'}: not a readable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "one", "two"]
