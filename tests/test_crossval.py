"""k-fold cross-validation: stratified, stable folds; `data.fold=all` trains every fold into fold_<k>,
resumes after a kill skipping the finished folds, writes oof.npy / oof.csv / cv.json with numbers
that follow from the folds' own checkpoints; infer.py averages the folds (cnn and gwi smoke runs
in-process, the kill in a forked child)."""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CNN_FOLDER_ARGS, ROOT, SMOKE_CNN, SMOKE_GWI, accelerate_launch, infer_here, read_metrics, train_here
from gwi.data import build_datasets as gwi_datasets
from gwi.layout import find_pairs, split_pairs
from gwi.task import GwiData
from gwi_files import write_tree
from harness import checkpoint as ckpt
from harness.config import load_config, to_plain_dict
from harness.crossval import fold_config, train
from harness.errors import ConfigError
from harness.folds import NEVER_HELD_OUT, assign_folds, fold_indices
from harness.inference import checkpoint_config, load_ensemble
from harness.rundir import config_changes, flatten, saved_config
from harness.task import get_task
from image_files import write_folder, write_sample_submission, write_test_folder

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 folds of 120 generated images (4 classes): 80 train at batch 16 = 5 updates a fold, one epoch.
CNN_FOLDS = ["data.fold=all", "data.folds=3", "data.num_train=120", "trainer.epochs=1", "trainer.batch_size=16",
             "log.wandb=disabled", "log.plot=false", "log.progress=none"]


def test_folds_are_stratified_complete_and_a_function_of_seed_and_sample_list():
    strata = np.repeat([0, 1, 2], [30, 12, 7])
    names = ["cat", "dog", "emu"]
    assignment = assign_folds(strata, names, 5, seed=3)
    assert sorted(set(assignment)) == [0, 1, 2, 3, 4]
    for stratum, size in enumerate([30, 12, 7]):  # each class dealt evenly over the folds
        counts = np.bincount(assignment[strata == stratum], minlength=5)
        assert counts.sum() == size and counts.max() - counts.min() <= 1
    assert np.array_equal(assignment, assign_folds(strata, names, 5, seed=3))
    assert not np.array_equal(assignment, assign_folds(strata, names, 5, seed=4))
    # A stratum's deal depends on its own name and members only: another class's samples change nothing.
    shorter = assign_folds(np.where(strata[strata != 1] == 2, 1, 0), ["cat", "emu"], 5, seed=3)
    assert np.array_equal(shorter, assignment[strata != 1])
    # The same in a fresh interpreter with another string-hash seed (no Python hash() in the deal).
    code = ("import numpy as np; from harness.folds import assign_folds; "
            "print(assign_folds(np.repeat([0, 1, 2], [30, 12, 7]), ['cat', 'dog', 'emu'], 5, seed=3).tolist())")
    fresh = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(fresh.stdout) == assignment.tolist()

    # Groups stay whole; a stratum of one group is never held out.
    groups = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4])
    grouped = assign_folds(np.array([0, 0, 0, 0, 0, 0, 0, 0, 1]), ["a", "b"], 2, seed=0, groups=groups)
    assert all(len(set(grouped[groups == g])) == 1 for g in range(5))
    assert grouped[-1] == NEVER_HELD_OUT and set(grouped[:-1]) == {0, 1}


def test_cnn_fold_k_trains_on_the_others_and_validates_on_part_k_unaugmented():
    cfg = load_config(SMOKE_CNN, ["data.fold=1", "data.folds=3", "data.augment=[hflip]"])
    task = get_task("cnn", cfg)
    samples = task.fold_samples(cfg)
    train_set, val_set = task.build_datasets(cfg)
    train_index, val_index = fold_indices(samples, 3, 1, cfg.data.split_seed)
    assert len(train_set) + len(val_set) == cfg.data.num_train == len(samples.ids)
    assert np.array_equal(val_set.labels, samples.strata[val_index])  # the val set is part 1, in sample order
    assert np.array_equal(train_set.labels, samples.strata[train_index])
    assert train_set.augment is not None and val_set.augment is None
    assert np.bincount(val_set.labels).min() >= np.bincount(samples.strata).min() // 3
    with pytest.raises(ConfigError, match="key 'data.fold': 3 is not in 0..2"):
        load_config(SMOKE_CNN, ["data.fold=3", "data.folds=3"])
    with pytest.raises(ConfigError, match="data.val_on_test"):
        task.build_datasets(load_config(SMOKE_CNN, ["data.fold=0", "data.val_on_test=true"]))
    with pytest.raises(ConfigError, match="all trains every fold in turn"):
        task.build_datasets(load_config(SMOKE_CNN, ["data.fold=all"]))


def test_gwi_files_folds_keep_files_whole_and_match_the_file_split(tmp_path):
    tree = write_tree(tmp_path / "tree", {"FlatVel_A": ("vel", 3, 2), "CurveFault_A": ("fault", 2, 3)})
    data = GwiData(source="files", roots=[str(tree)], folds=2, fold=1, split_seed=5)
    task = get_task("gwi")
    samples = task.fold_samples(load_config(SMOKE_GWI, ["data.source=files", f"data.roots=[{tree}]", "data.fold=1",
                                                        "data.folds=2", "data.split_seed=5"]))
    _, val = gwi_datasets(data, seed=0)
    _, val_pairs = split_pairs(find_pairs([tree]), 2, 1, 5)
    _, val_index = fold_indices(samples, 2, 1, 5)
    assert [samples.ids[i] for i in val_index] == [f"{p.name}:{row}" for p in val_pairs for row in range(p.samples)]
    assert len(val) == len(val_index) and {samples.ids[i].split("/")[0] for i in val_index} == {"FlatVel_A", "CurveFault_A"}


def kill_at(point: str, *args: str) -> int:
    """Run `train.py ARGS` in a forked child SIGKILLed at `point` (harness.checkpoint's fault points)."""
    def body():
        os.environ[ckpt.KILL_AT_ENV] = point
        ckpt._points_reached.clear()
        train(load_config(args[0], list(args[1:])))

    child = multiprocessing.get_context("fork").Process(target=body)
    child.start()
    child.join(120)
    return child.exitcode


def test_cnn_fold_all_writes_folds_oof_and_cv_resumes_after_a_kill_and_infer_averages_the_folds(tmp_path, capsys):
    root = tmp_path / "cv"
    args = [str(SMOKE_CNN), f"output_dir={root}", *CNN_FOLDS]
    # Killed at fold 1's best save (the second best save of the run): fold 0 is finished, fold 1 half done.
    assert kill_at("best:done:2", *args) == -9
    assert ckpt.read_meta(root / "fold_0" / "checkpoints" / "last")["reason"] == "finished"
    assert not (root / "fold_2").exists() and not (root / "cv.json").exists()
    fold0_metrics = (root / "fold_0" / "metrics.jsonl").read_bytes()

    result = train_here(capsys, *args)
    assert result.returncode == 0, result.stderr
    assert f"fold 0: finished already ({root / 'fold_0'}), skipped" in result.stdout
    assert "fold 1 of 3: training into" in result.stdout and "fold 2 of 3: training into" in result.stdout
    assert (root / "fold_0" / "metrics.jsonl").read_bytes() == fold0_metrics  # not trained again

    cfg = load_config(*args[:1], args[1:])
    bests = [ckpt.read_meta(ckpt.resolve(root / f"fold_{k}")) for k in range(3)]
    assert [ckpt.read_meta(root / f"fold_{k}" / "checkpoints" / "last")["config"]["data"]["fold"] for k in range(3)] == [0, 1, 2]
    cv = json.loads((root / "cv.json").read_text())
    values = [b["monitor_value"] for b in bests]
    assert cv["monitor"] == "val/acc" and [f["value"] for f in cv["per_fold"]] == values
    assert cv["mean"] == pytest.approx(np.mean(values)) and cv["std"] == pytest.approx(np.std(values))
    assert (cv["min"], cv["max"]) == (min(values), max(values))

    samples = get_task("cnn", cfg).fold_samples(fold_config(cfg, 0))
    assignment = assign_folds(samples.strata, samples.names, 3, cfg.data.split_seed)
    oof = np.load(root / "oof.npy")
    assert oof.shape == (120, 4) and np.allclose(oof.sum(1), 1, atol=1e-5)
    rows = list(csv.DictReader((root / "oof.csv").open()))
    assert [r["id"] for r in rows] == samples.ids and [int(r["fold"]) for r in rows] == assignment.tolist()
    assert [r["label"] for r in rows] == [samples.names[s] for s in samples.strata]
    correct = oof.argmax(1) == samples.strata
    assert [float(r["acc"]) for r in rows] == correct.astype(float).tolist()
    assert np.allclose(oof, [[float(r[f"p_{n}"]) for n in samples.names] for r in rows], atol=1e-5)
    # The out-of-fold predictions are the best checkpoints': each fold's part scores its monitored value.
    for k in range(3):
        assert correct[assignment == k].mean() == pytest.approx(values[k], abs=1e-6)
    assert cv["oof"]["acc"] == pytest.approx(correct.mean())
    for s, name in enumerate(samples.names):
        per_class = cv["acc_by_label"][name]
        assert per_class["oof"] == pytest.approx(correct[samples.strata == s].mean())
        assert per_class["mean"] == pytest.approx(np.mean([correct[(samples.strata == s) & (assignment == k)].mean()
                                                           for k in range(3)]))

    # Finished: a third run trains nothing and writes the same CV.
    logs = [read_metrics(root / f"fold_{k}") for k in range(3)]
    again = train_here(capsys, *args)
    assert again.returncode == 0 and again.stdout.count("finished already") == 3
    assert [read_metrics(root / f"fold_{k}") for k in range(3)] == logs
    assert json.loads((root / "cv.json").read_text()) == cv

    # infer.py: the folds run is the ensemble of its 3 folds: the mean of their class probabilities.
    _, _, ensemble = load_ensemble([str(root)])
    assert len(ensemble.members) == 3
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        mean = torch.stack([m(images).softmax(1) for m in ensemble.members]).mean(0)
        assert torch.allclose(ensemble(images).softmax(1), mean, atol=1e-6)
    # Probabilities are averaged, not logits: softmax([4, 0]) and softmax([0, 0]) average to 0.741, not softmax([2, 0]).
    combined = get_task("cnn", cfg).combine_outputs([torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 0.0]])])
    assert combined.softmax(1)[0, 0].item() == pytest.approx((torch.tensor([4.0, 0.0]).softmax(0)[0].item() + 0.5) / 2)
    refused = infer_here(capsys, "--checkpoint", root)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"error: --checkpoint {root}: a k-fold run (data.fold=all); its cross-validated score "
                                     f"is in {root / 'cv.json'}")


def test_a_second_fold_all_run_on_the_same_folder_is_refused(tmp_path, capsys):
    root = tmp_path / "cv"
    root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                               str(root / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = train_here(capsys, SMOKE_CNN, f"output_dir={root}", *CNN_FOLDS)
    finally:
        holder.communicate("")
    assert result.returncode == 2 and f"error: output_dir {str(root)!r} is in use by another run" in result.stderr
    assert not (root / "fold_0").exists()
    for bad, named in ((["resume=/some/checkpoint"], "key 'resume'"), (["checkpoint.keep_top_k=0"], "key 'checkpoint.keep_top_k'")):
        result = train_here(capsys, SMOKE_CNN, f"output_dir={tmp_path / 'other'}", *CNN_FOLDS, *bad)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {named}")


def test_gwi_fold_all_by_family_and_the_fold_ensemble_predicts_the_mean_of_the_folds(tmp_path, capsys):
    root = tmp_path / "cv"
    args = [SMOKE_GWI, f"output_dir={root}", "data.fold=all", "data.folds=2", "data.num_train=16", "trainer.epochs=1",
            "trainer.batch_size=4", "data.time_steps=64", "log.wandb=disabled", "log.plot=false", "log.progress=none"]
    result = train_here(capsys, *args)
    assert result.returncode == 0, result.stderr
    cv = json.loads((root / "cv.json").read_text())
    values = [ckpt.read_meta(ckpt.resolve(root / f"fold_{k}"))["monitor_value"] for k in range(2)]
    assert [f["value"] for f in cv["per_fold"]] == values and cv["mean"] == pytest.approx(np.mean(values))
    assert list(cv["mae_by_family"]) == ["synthetic"] and cv["held_out"] == 16
    oof = np.load(root / "oof.npy")
    assert oof.shape == (16, 1, 70, 70) and np.isfinite(oof).all()
    rows = list(csv.DictReader((root / "oof.csv").open()))
    assert [r["family"] for r in rows] == ["synthetic"] * 16 and "p_0" not in rows[0]
    assert np.mean([float(r["mae"]) for r in rows]) == pytest.approx(cv["oof"]["mae"], rel=1e-5)

    labelled = write_tree(tmp_path / "labelled", {"FlatVel_A": ("vel", 2, 1)})
    saved = []
    for name, checkpoint in (("ensemble", root), ("fold_0", root / "fold_0"), ("fold_1", root / "fold_1")):
        out = tmp_path / f"{name}.npy"
        run = infer_here(capsys, "--checkpoint", checkpoint, "--data", labelled, "--save-predictions", out, "--num-workers", "0")
        assert run.returncode == 0, run.stderr
        saved.append(np.load(out))
    np.testing.assert_allclose(saved[0], (saved[1] + saved[2]) / 2, atol=1e-3)


@pytest.mark.slow
def test_fold_all_under_two_processes_trains_each_fold_across_both(tmp_path):
    """Every fold is one run of both processes (gloo): half the updates of one process, one CV at the end,
    and out-of-fold predictions gathered without the padding duplicates."""
    root = tmp_path / "cv"
    args = [SMOKE_CNN, f"output_dir={root}", "data.fold=all", "data.folds=2", "data.num_train=64", "trainer.epochs=1",
            "trainer.batch_size=8", "sched.name=cosine", "log.wandb=disabled", "log.plot=false", "log.progress=none"]
    result = accelerate_launch(2, "train.py", *args, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("done: ") == 1 and result.stdout.count("cross-validation: ") == 1
    cfg = load_config(SMOKE_CNN, [str(a) for a in args[1:]])
    samples = get_task("cnn", cfg).fold_samples(fold_config(cfg, 0))
    assignment = assign_folds(samples.strata, samples.names, 2, cfg.data.split_seed)
    oof = np.load(root / "oof.npy")
    for k in range(2):
        best = ckpt.read_meta(ckpt.resolve(root / f"fold_{k}"))
        assert best["step"] == int((assignment != k).sum()) // (8 * 2)  # batches of 8 on each of 2 processes
        assert (oof[assignment == k].argmax(1) == samples.strata[assignment == k]).mean() == pytest.approx(best["monitor_value"])


def test_a_folder_of_images_runs_its_folds_and_submits_the_fold_ensemble(tmp_path, capsys):
    """The Kaggle image workflow: class folders, data.fold=all, the CV by class, then a submission of
    the fold ensemble's probabilities: the mean of the folds' own."""
    write_folder(tmp_path / "train", per_class=6)
    root = tmp_path / "cv"
    result = train_here(capsys, SMOKE_CNN, *CNN_FOLDER_ARGS, f"data.root={tmp_path / 'train'}", f"output_dir={root}",
                        "data.fold=all", "data.folds=3", "trainer.epochs=1", "sched.name=cosine")
    assert result.returncode == 0, result.stderr
    cv = json.loads((root / "cv.json").read_text())
    assert sorted(cv["acc_by_label"]) == ["cat", "dog", "owl"] and cv["held_out"] == 18
    assert all(f["samples"] == 6 for f in cv["per_fold"])  # 2 images of each class per fold
    rows = list(csv.DictReader((root / "oof.csv").open()))
    assert sorted(r["id"] for r in rows) == sorted(str(p.relative_to(tmp_path / "train"))
                                                   for p in (tmp_path / "train").rglob("*.*"))
    assert all(r["id"].split("/")[0] == r["label"] for r in rows) and "p_owl" in rows[0]

    ids, _ = write_test_folder(tmp_path / "test", count=4)
    write_sample_submission(tmp_path / "sample.csv", ids, header=("id", "cat", "dog", "owl"))
    answers = []
    for name, checkpoint in (("ensemble", root), *((f"fold_{k}", root / f"fold_{k}") for k in range(3))):
        out = tmp_path / f"{name}.csv"
        run = infer_here(capsys, "--checkpoint", checkpoint, "--data", tmp_path / "test", "--out", out,
                         "--sample-submission", tmp_path / "sample.csv", "--probabilities", "--num-workers", "0")
        assert run.returncode == 0, run.stderr
        answers.append(np.array([row[1:] for row in csv.reader(out.open())][1:], dtype=float))
    np.testing.assert_allclose(answers[0], np.mean(answers[1:], axis=0), atol=2e-5)


def test_a_gwi_run_saved_before_kfold_resumes_without_a_change(tmp_path):
    """Such a run wrote data.fold 0, which meant what null means now; a run of this release that
    wrote 0 (k-fold part 0) against null is a real change."""
    saved = to_plain_dict(load_config(SMOKE_GWI))
    saved["data"]["fold"] = 0
    del saved["optim"]["layer_decay"]  # the keys of that release's schema
    defaults = flatten(to_plain_dict(load_config()))
    now = to_plain_dict(load_config(SMOKE_GWI))
    assert config_changes(saved, now, defaults) == {}
    assert config_changes(saved, to_plain_dict(load_config(SMOKE_GWI, ["data.fold=1"])), defaults) == {"data.fold": (None, 1)}
    assert config_changes(saved, to_plain_dict(load_config(SMOKE_GWI, ["data.fold=0"])), defaults) == {"data.fold": (None, 0)}
    assert saved_config(saved)["data"]["fold"] is None and saved["data"]["fold"] == 0  # a copy
    (tmp_path / ckpt.META).write_text(json.dumps({"config": saved, "files": {}}))
    assert checkpoint_config(tmp_path).data.fold is None  # infer.py validates where that run did
    since = to_plain_dict(load_config(SMOKE_GWI, ["data.fold=0"]))
    assert config_changes(since, now, defaults) == {"data.fold": (0, None)}
