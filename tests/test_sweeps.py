"""The W&B sweeps in configs/sweeps/: valid for W&B, every parameter a real config key with values of the
right type, and one trial of each run offline exactly as `wandb agent` starts it (wandb's own agent code
builds the command line, the environment and the parameter file)."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, clean_env, read_metrics, run_entry, wandb_log, wandb_records, wandb_run
from harness import checkpoint as ckpt
from harness.config import dotted_keys, load_config, schema_for, to_plain_dict
from harness.errors import ConfigError
from harness.runs import find_run_dirs, flatten
from harness.tracking import choose_run_id

SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
SWEEP_ID, RUN_ID = "sweep01x", "trial01x"
# A trial is a real `accelerate launch` (two interpreters and W&B: the slowest tests here). The sam
# sweep's runs the same base config as the cnn sweep's with SAM on (tests/test_sam.py trains SAM in
# the loop), so its trial runs under make test-all.
# The cnn trial runs by default; gwi's and sam's (the same agent path with other configs) under test-all.
TRIAL_SWEEPS = [path if path.stem == "cnn" else pytest.param(path, marks=pytest.mark.slow) for path in SWEEPS]
# Small data and one epoch so a trial takes seconds on a CPU; the agent passes them like constant parameters.
# gwi: the surrogate data, not the base config's simulated demo set (a minute to simulate on first use;
# tests/test_gwi_simulated.py covers it).
FAST = {
    "cnn": {"trainer.epochs": 1},
    "gwi": {"trainer.epochs": 1, "data.source": "synthetic", "data.num_train": 64, "data.num_val": 16, "trainer.batch_size": 8},
}


def load_sweep(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def base_config(sweep: dict) -> Path:
    """The config file the sweep's command hands train.py."""
    command = sweep["command"]
    return ROOT / command[command.index("train.py") + 1]


def candidate_values(spec: dict) -> list:
    """Values the sweep controller may hand a trial: every listed value, or a distribution's ends."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if spec.get("distribution") in ("uniform", "log_uniform_values", "int_uniform", "q_uniform", "q_log_uniform_values"):
        return [spec["min"], spec["max"]]
    raise AssertionError(f"parameter spec {spec}: a form this test does not know; add it here")


def trial_value(spec: dict, base_value):
    """One value a trial could get, other than the base config's where the sweep allows (so the test
    sees the override arrive): the first such listed value, or a distribution's middle."""
    if spec.get("distribution") == "log_uniform_values":
        return math.sqrt(spec["min"] * spec["max"])
    if spec.get("distribution") == "uniform":
        return (spec["min"] + spec["max"]) / 2
    values = candidate_values(spec)
    return next((value for value in values if value != base_value), values[0])


def same(a, b) -> bool:
    """Equal, floats up to rounding (a value makes a round trip through text on its way)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return math.isclose(a, b, rel_tol=1e-12) if numbers else a == b


def agent_argument(name: str, value) -> str:
    """How the agent writes one parameter on the command line (wandb's create_sweep_command_args)."""
    return f"--{name}={value}"


def test_the_sweeps_exist():
    assert {path.stem for path in SWEEPS} >= {"gwi", "cnn"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_passes_wandbs_own_validator(path):
    # The installed wandb (0.31) validates sweep files only on the server (`wandb sweep` uploads them);
    # its local controller imports the validator from the optional `sweeps` package (wandb[sweeps]),
    # which pins numpy<2, so it is not in the project's environment.
    sweeps = pytest.importorskip("sweeps", reason="W&B's sweep validator is the optional package `sweeps` (wandb[sweeps])")
    config = load_sweep(path)
    assert sweeps.schema_violations_from_proposed_config(config) == []  # what `wandb sweep --controller` checks
    sweeps.SweepConfig(config)  # and what its controller then builds the sweep from


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_runs_train_py_through_accelerate_and_ranks_by_the_monitored_metric(path):
    sweep = load_sweep(path)
    assert sweep["program"] == "train.py" and sweep["method"] in ("bayes", "random", "grid")
    command = sweep["command"]
    assert command[:4] == ["${env}", "accelerate", "launch", "train.py"] and command[-1] == "${args}", command
    assert base_config(sweep).is_file(), f"{path.name}: base config {base_config(sweep)} does not exist"
    # The metric the controller ranks (and hyperband counts) is the one the loop logs once per
    # evaluation and that picks each trial's `best` checkpoint.
    cfg = load_config(base_config(sweep), [agent_argument(k, spec["value"]) for k, spec in sweep["parameters"].items() if "value" in spec])
    assert sweep["metric"]["name"] == cfg.checkpoint.monitor and cfg.checkpoint.monitor.startswith("val/")
    assert sweep["metric"]["goal"] == {"min": "minimize", "max": "maximize"}[cfg.checkpoint.mode]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_parameter_is_a_config_key_and_every_value_loads(path):
    sweep = load_sweep(path)
    config_path = base_config(sweep)
    task = load_config(config_path).task
    keys = dotted_keys(schema_for(task))
    for name, spec in sweep["parameters"].items():
        assert name in keys, f"{path.name}: parameter {name!r} is not a config key of task {task!r}"
        for value in candidate_values(spec):
            # load_config raises a ConfigError naming the key for a value of the wrong type or range.
            resolved = flatten(to_plain_dict(load_config(config_path, [agent_argument(name, value)])))[name]
            assert same(resolved, value), f"{path.name}: {name}={value!r} resolved to {resolved!r}"


def accelerate_config(home: Path) -> Path:
    """An `accelerate config` for one CPU process, as a CPU machine's default config would say."""
    from accelerate.utils import write_basic_config

    config = home / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    write_basic_config(mixed_precision="no", save_location=str(config))
    return config


def agent_trial(sweep: dict, values: dict, monkeypatch, tmp_path: Path) -> tuple[list[str], dict]:
    """The command line and environment wandb's agent builds for a trial with these parameter values,
    writing the parameter file on the way (W&B's `Agent._command_run`, with the process start caught)."""
    from wandb import wandb_agent

    for name in [k for k in os.environ if k.startswith(("WANDB_", "ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))]:
        monkeypatch.delenv(name)
    venv_bin = str(Path(sys.executable).parent)  # where `accelerate` is installed
    for name, value in dict(WANDB_SWEEP_ID=SWEEP_ID, WANDB_DIR=str(tmp_path / "agent"), WANDB_MODE="offline",
                            WANDB_SILENT="true", WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
                            WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), HF_HOME=str(tmp_path / "hf"),
                            OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                            PATH=venv_bin + os.pathsep + os.environ.get("PATH", "")).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_RUN_ID", "")  # the agent sets these two; monkeypatch restores them afterwards
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "")
    accelerate_config(tmp_path / "hf")

    started = {}

    class StartedProcess:  # stands in for wandb's AgentProcess: keep what it would have started
        def __init__(self, command=None, env=None, **_):
            started.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", StartedProcess)
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id=SWEEP_ID)
    agent._sweep_command = list(sweep["command"])  # as Agent.run takes it from the sweep's config
    agent._command_run({"type": "run", "run_id": RUN_ID, "program": sweep["program"],
                        "args": {name: {"value": value} for name, value in values.items()}})
    return started["command"], started["env"]


@pytest.mark.parametrize("path", TRIAL_SWEEPS, ids=lambda p: p.stem)
def test_a_trial_started_as_the_agent_does_applies_logs_and_names_its_parameters(path, monkeypatch, tmp_path):
    sweep = load_sweep(path)
    config_path = base_config(sweep)
    base = to_plain_dict(load_config(config_path))
    task = base["task"]
    flat_base = flatten(base)
    swept = {name: trial_value(spec, flat_base[name]) for name, spec in sweep["parameters"].items()}
    sweep_dir = tmp_path / "sweep"
    values = {**swept, **FAST[task]}
    # The sweep's own output folder is a fixed argument of its command (a swept parameter would be
    # locked by W&B at the value given, while each trial resolves it to its own subfolder).
    sweep["command"] = [f"--output_dir={sweep_dir}" if part.startswith("--output_dir=") else part for part in sweep["command"]]

    command, env = agent_trial(sweep, values, monkeypatch, tmp_path)
    assert command[:6] == ["/usr/bin/env", "accelerate", "launch", "train.py", str(config_path.relative_to(ROOT)),
                           f"--output_dir={sweep_dir}"]
    assert command[6:] == [agent_argument(name, value) for name, value in values.items()]  # ${args}, e.g. --data.flip=False
    assert Path(env["WANDB_SWEEP_PARAM_PATH"]).is_file() and (env["WANDB_RUN_ID"], env["WANDB_SWEEP_ID"]) == (RUN_ID, SWEEP_ID)

    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Applied: the resolved config the trial saved (in its folder under the sweep's output_dir) has
    # every value the agent passed.
    (run_dir,) = find_run_dirs(sweep_dir)
    saved = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved["output_dir"] == str(run_dir)
    for name, value in values.items():
        assert same(saved[name], value), f"{name}: passed {value!r}, resolved {saved[name]!r}"

    # Logged: W&B holds the resolved config (nested, as config.yaml) plus the swept keys wandb.init
    # itself adds from the parameter file, with the same values; the run is the agent's.
    run, logged = wandb_run(run_dir)
    assert (run["run_id"], run["sweep_id"]) == (RUN_ID, SWEEP_ID)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {key: logged[key] for key in resolved} == resolved
    assert all(same(logged[name], value) for name, value in values.items()), {name: logged.get(name) for name in values}

    # Hyperband counts the metric's history entries: exactly one per evaluation.
    metric = sweep["metric"]["name"]
    evaluations = [row for row in read_metrics(run_dir) if metric in row]
    history, _ = wandb_log(run_dir)
    assert len(evaluations) >= 1
    assert [row[metric] for row in history if metric in row] == pytest.approx([row[metric] for row in evaluations])


# The default run keeps the preempted trial's exit-code test; this full requeue runs under test-all.
@pytest.mark.slow
def test_a_requeued_trial_resumes_its_checkpoint_and_keeps_its_wandb_run(tmp_path):
    """W&B requeues a preempted trial under the same run id: it continues its own checkpoint and run."""
    cnn = load_sweep(ROOT / "configs" / "sweeps" / "cnn.yaml")
    env = clean_env(WANDB_SWEEP_ID=SWEEP_ID, WANDB_RUN_ID=RUN_ID, WANDB_MODE="offline",
                    WANDB_DATA_DIR=str(tmp_path / "wandb-data"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"))
    args = [base_config(cnn), f"--output_dir={tmp_path / 'sweep'}", "--trainer.epochs=1"]
    first = run_entry("train.py", *args, "--trainer.max_minutes=0.0001", env=env)  # a lost night, in miniature
    assert first.returncode == 0, first.stderr
    (run_dir,) = find_run_dirs(tmp_path / "sweep")
    stopped = ckpt.read_meta(run_dir / "checkpoints" / "last")
    assert stopped["reason"] == "max_minutes"
    requeued = run_entry("train.py", *args, env=env)
    assert requeued.returncode == 0, requeued.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'last'} at step {stopped['step']}" in requeued.stdout
    assert ckpt.read_meta(run_dir / "checkpoints" / "last")["reason"] == "finished"
    assert {wandb_run_id(folder) for folder in (run_dir / "wandb").glob("offline-run-*")} == {RUN_ID}


def test_a_trial_stopped_by_sigterm_is_marked_preempting_and_exits_non_zero_so_the_sweep_requeues_it(tmp_path):
    env = clean_env(WANDB_SWEEP_ID=SWEEP_ID, WANDB_RUN_ID=RUN_ID, WANDB_MODE="offline",
                    WANDB_DATA_DIR=str(tmp_path / "wandb-data"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"))
    args = [base_config(load_sweep(ROOT / "configs" / "sweeps" / "cnn.yaml")), f"--output_dir={tmp_path / 'sweep'}",
            "--trainer.epochs=40", "--log.every_steps=1"]
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_dir = tmp_path / "sweep" / RUN_ID
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((run_dir / "metrics.jsonl").exists() and read_metrics(run_dir)):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # the machine goes away
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert ckpt.read_meta(run_dir / "checkpoints" / "last")["reason"] == "SIGTERM"
    kinds = [record.WhichOneof("record_type") for record in wandb_records(run_dir)]
    assert "preempting" in kinds


def wandb_run_id(offline_run_folder: Path) -> str:
    return offline_run_folder.name.rsplit("-", 1)[1]


@pytest.mark.parametrize("from_env, stored, sweep, resume, expected", [
    (None, None, False, "auto", None),  # a fresh run: W&B makes an id
    (None, "run1", False, "auto", "run1"),  # a resumed run continues its W&B run
    ("run2", None, True, "auto", "run2"),  # a sweep trial
    ("run2", "run2", True, "auto", "run2"),  # a requeued sweep trial
    ("run2", "run1", False, "auto", "run2"),  # WANDB_RUN_ID set by hand wins, with a note
    ("run2", "run1", True, "outputs/x/checkpoints/last", "run2"),  # a trial told to continue another's state
])
def test_the_wandb_run_id_comes_from_the_agent_else_the_checkpoint(from_env, stored, sweep, resume, expected, monkeypatch):
    for name, value in (("WANDB_RUN_ID", from_env), ("WANDB_SWEEP_ID", SWEEP_ID if sweep else None)):
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name, raising=False)
    notes = []
    cfg = load_config(base_config(load_sweep(SWEEPS[0])), [f"resume={resume}"])
    assert choose_run_id(stored, cfg, say=notes.append) == expected
    assert bool(notes) == (from_env is not None and stored is not None and from_env != stored)


def test_a_sweep_trial_does_not_take_over_another_trials_checkpoint(monkeypatch):
    """Resuming the output_dir's checkpoint (resume=auto) would train this trial's parameters from
    another trial's weights: exit 2 (ConfigError) naming both runs."""
    monkeypatch.setenv("WANDB_SWEEP_ID", SWEEP_ID)
    monkeypatch.setenv("WANDB_RUN_ID", "trialBBB")
    cfg = load_config(base_config(load_sweep(SWEEPS[0])))
    with pytest.raises(ConfigError, match="trial trialBBB: output_dir .* holds the checkpoint of run trialAAA, another trial"):
        choose_run_id("trialAAA", cfg)
