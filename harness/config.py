"""Run configuration: a typed schema (pydantic), YAML files, `key=value` / `--key=value` overrides.

The schema is the harness's own sections (trainer, optim, sched, ema, checkpoint, log) plus the
sections the chosen task declares (`Task.sections`, e.g. data/model/loss). Every mistake becomes a
`ConfigError` whose message names the key; `train.py` prints it and exits 2 without a traceback.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from harness.errors import ConfigError
from harness.optim import betas_problem, name_problem, opt_args_problem
from harness.task import Section, get_task

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class Trainer(Section):
    epochs: int = Field(10, ge=1, description="passes over the training set (trainer.max_steps, when set, decides instead)")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer updates (overrides epochs)")
    batch_size: int = Field(32, ge=1, description="per process")
    eval_batch_size: Optional[int] = Field(None, ge=1, description="per process; default batch_size")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer update")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast dtype (fp16 uses a grad scaler; on CPU only bf16 acts)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false
    grad_clip: Optional[float] = Field(None, gt=0, description="max global grad norm; null = no clipping")
    eval_every_epochs: int = Field(1, ge=0, description="0 = only by steps / at the end")
    eval_every_steps: Optional[int] = Field(None, ge=1, description="also evaluate every N updates")
    compile: bool = Field(False, description="torch.compile the model")
    channels_last: bool = Field(False, description="channels_last memory format for model and 4-D inputs")
    deterministic: bool = Field(False, description="deterministic algorithms: bit-identical reruns")
    max_minutes: Optional[float] = Field(None, gt=0, description="save `last` and stop after this wall time")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="NaN/inf loss: stop the run, or skip the batch")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    save_every_steps: Optional[int] = Field(None, ge=1, description="also write `last` every N updates")
    batch_replays: int = Field(1, ge=1, description="train on each batch this many times in a row (free adversarial training's m); the number of updates stays epochs x batches, so the data is seen epochs / m times")


class Optim(Section):
    name: str = Field("adamw", description="any optimizer in timm.optim.list_optimizers(): adamw, sgd (Nesterov momentum), momentum (classical), lion, lamb, muon, adamuon, ...")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="as the optimizer applies it: decoupled (adamw, lion, muon) or L2 (sgd)")
    betas: Optional[list[float]] = Field(None, description="optimizers with betas (adamw, lion, muon's AdamW part, ...); null = the optimizer's own (adamw 0.9/0.999, lion 0.9/0.99, muon 0.9/0.95)")
    eps: Optional[float] = Field(None, gt=0, description="optimizers with an epsilon; null = the optimizer's own")
    momentum: float = Field(0.9, ge=0, description="optimizers with momentum (sgd, muon, lars, ...); 0.9 for each, as timm's factory does (its Muon class defaults to 0.95)")
    nesterov: Optional[bool] = Field(None, description="optimizers with a Nesterov switch; null = the name's own (sgd on, momentum off, muon off, nmuon on)")
    layer_decay: Optional[float] = Field(None, gt=0, le=1, description="layer-wise lr decay: each block's lr x layer_decay per block above it, by the model's group_matcher(); null = off")
    opt_args: dict[str, Any] = Field({}, description="further keyword arguments of the optimizer's class, e.g. {ns_steps: 6} for muon; for Muon also fallback_list: parameter name patterns it leaves to its AdamW")
    no_decay_bias_norm: bool = Field(True, description="no weight decay on biases and norm weights")
    sam_rho: Optional[float] = Field(None, gt=0, description="Sharpness-Aware Minimization around the optimizer: radius of the weight perturbation (SAM ~0.05, ASAM ~0.5-2); null = off")
    sam_adaptive: bool = Field(False, description="ASAM: perturbation scaled per weight by |w| + sam_eta")
    sam_eta: float = Field(0.01, ge=0, description="ASAM: added to |w| so zero weights are perturbed too")

    @field_validator("name")
    @classmethod
    def _known_to_timm(cls, value: str) -> str:
        value = value.lower()  # as timm's factory reads it: AdamW is adamw
        if problem := name_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("betas")
    @classmethod
    def _as_many_as_it_takes(cls, value, info: ValidationInfo):
        if "name" in info.data and (problem := betas_problem(info.data["name"], value)):
            raise ValueError(problem)
        return value

    @field_validator("opt_args")
    @classmethod
    def _its_arguments(cls, value: dict, info: ValidationInfo) -> dict:
        if "name" in info.data and (problem := opt_args_problem(info.data["name"], value)):
            raise ValueError(problem)
        return value


class Sched(Section):
    name: Literal["onecycle", "cosine", "constant", "plateau"] = Field("cosine", description="stepped per optimizer update; plateau per evaluation")
    warmup_steps: int = Field(0, ge=0, description="cosine/constant: linear warm-up updates")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: final lr / peak lr")
    pct_start: float = Field(0.25, gt=0, lt=1, description="onecycle: fraction of updates spent rising")
    div_factor: float = Field(25.0, gt=0, description="onecycle: initial lr = lr / div_factor")
    final_div_factor: float = Field(1e4, gt=0, description="onecycle: final lr = initial lr / final_div_factor")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="plateau: lr multiplier on a plateau")
    plateau_patience: int = Field(2, ge=0, description="plateau: evaluations without improvement")


class Ema(Section):
    enabled: bool = Field(False, description="keep an EMA of the weights; it is evaluated as val/*, saved, and picks best")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per optimizer update")
    warmup: bool = Field(True, description="ramp the decay up early in training (timm ModelEmaV3)")


class Checkpoint(Section):
    monitor: str = Field("val/loss", description="logged metric that chooses `best`")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher monitor is better")
    keep_top_k: int = Field(1, ge=0, description="best checkpoints kept; 0 = none")


class Log(Section):
    wandb: Literal["online", "offline", "disabled"] = Field("offline", description="online falls back to offline without an API key")
    project: str = Field("kagglerig", description="W&B project")
    entity: Optional[str] = Field(None, description="W&B entity (user or team)")
    name: Optional[str] = Field(None, description="run name; default the output_dir's name")
    group: Optional[str] = Field(None, description="W&B group")
    tags: list[str] = Field([], description="W&B tags")
    every_steps: int = Field(10, ge=1, description="train metrics are averaged and logged this often")
    plot: bool = Field(True, description="draw metrics.png (learning curves) at the end of the run")
    progress: Literal["auto", "bar", "plain", "none"] = Field("auto", description="auto: bar on a terminal, lines otherwise")
    upload_checkpoints: Literal["best", "last", "none"] = Field(
        "none", description="W&B model artifacts: best = each new best checkpoint; last = also every `last` (full state)")

    @model_validator(mode="after")
    def _uploads_need_wandb(self):
        if self.upload_checkpoints != "none" and self.wandb == "disabled":
            raise ValueError(f"log.upload_checkpoints={self.upload_checkpoints} logs W&B artifacts: "
                             "set log.wandb to online or offline, or log.upload_checkpoints=none")
        return self


class BaseRunConfig(Section):
    task: str = Field("gwi", description="the task package: gwi, cnn")
    seed: int = Field(0, description="seeds every RNG and the data order")
    output_dir: str = Field("outputs/run", description="run directory: config.yaml, metrics.jsonl, checkpoints/, wandb/")
    resume: str = Field("auto", description="auto: continue from output_dir/checkpoints/last if present; never (an earlier run in output_dir is moved aside to .previous-<time>/); or a checkpoint path")
    resume_changes: Literal["refuse", "allow"] = Field(
        "refuse", description="resuming a checkpoint whose config differs in a key that shapes the run (seed, model, data, optimizer, schedule, batch): refuse, or allow; length, lr, evaluation and logging keys may always change (every change is printed)")
    init_from: Optional[str] = Field(None, description="a run folder (its best) or checkpoint directory whose weights start this run (weights only: not the optimizer or step; a ViT's position embeddings are resampled to this run's side); ignored when resuming")
    trainer: Trainer = Trainer()
    optim: Optim = Optim()
    sched: Sched = Sched()
    ema: Ema = Ema()
    checkpoint: Checkpoint = Checkpoint()
    log: Log = Log()

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():  # an empty path is the current directory: the run would write all over it
            raise ValueError("empty; give a folder for the run (use '.' to mean the current directory)")
        return value


def schema_for(task_name: str) -> type[BaseRunConfig]:
    """The full schema: the harness's sections plus the ones the task declares."""
    task = get_task(task_name)
    fields = {name: (section, section()) for name, section in task.sections.items()}
    return create_model(f"RunConfig_{task_name}", __base__=BaseRunConfig, **fields)


# ---------------------------------------------------------------------------------------------------
# Loading and overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=3e-4` or `--optim.lr=3e-4` (a W&B sweep agent's form) -> ("optim.lr", 0.0003)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected key=value or --key=value")
    key, raw = body.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key, _parse_value(raw)


def _parse_value(raw: str) -> Any:
    if raw.strip() in ("None", "null", "~"):  # Python's None as a W&B agent writes it; "none" stays a word
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # YAML 1.1 reads "3e-4" as a string; the schema's float fields coerce it, and "" stays "".
    return raw if value is None else value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `key=value` / `--key=value` strings to a nested config dict, in place."""
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return tree


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of keys at the top, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> BaseRunConfig:
    """YAML file (default `configs/default.yaml`) + overrides -> validated config."""
    return validate(apply_overrides(read_yaml(path or DEFAULT_CONFIG), overrides))


def validate(tree: dict) -> BaseRunConfig:
    task_name = tree.get("task", BaseRunConfig.model_fields["task"].default)
    if not isinstance(task_name, str):
        raise ConfigError(f"key 'task': expected a task name (str), got {task_name!r}")
    schema = schema_for(task_name)
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, schema)) from None


def dotted_keys(schema: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a schema -> its field info, e.g. {"optim.lr": FieldInfo, ...}."""
    keys = {}
    for name, field in schema.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.update(dotted_keys(annotation, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = field
    return keys


def _explain(err: ValidationError, schema: type[BaseModel]) -> str:
    valid = dotted_keys(schema)
    lines = []
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            section = key.rsplit(".", 1)[0] + "." if "." in key else ""
            near = difflib.get_close_matches(key, valid, n=3, cutoff=0.6) or difflib.get_close_matches(
                key, [k for k in valid if k.startswith(section)], n=3, cutoff=0.0
            )
            hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
            lines.append(f"unknown key {key!r}{hint}")
            continue
        if problem["type"] == "value_error":  # a validator's own message already says what is wrong
            lines.append(f"key {key!r}: {problem['msg'].removeprefix('Value error, ')}")
            continue
        field = valid.get(key) or valid.get(key.rsplit(".", 1)[0])
        expected = type_name(field.annotation) if field is not None else problem["type"]
        lines.append(f"key {key!r}: expected {expected}, got {problem.get('input')!r} ({problem['msg']})")
    return "config error: " + "\n  ".join(lines)


def type_name(annotation: Any) -> str:
    """A short human name for a field's type: `int`, `int or null`, `one of no/fp16/bf16`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + "/".join(str(a) for a in args)
    if origin in (Union, UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def to_plain_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")
