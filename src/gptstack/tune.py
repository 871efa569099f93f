"""Hyperparameter search: Optuna studies over any training or fine-tuning config field.

A study is described by a YAML file (see ``configs/tune-demo.yaml``)::

    command: train                 # or finetune
    base_config: demo.yaml         # relative to this file; every trial starts from it
    fixed: {max_steps: 60}         # overrides for every trial
    objective: val_loss            # or accuracy / f1_macro / ... for a classification fine-tune
    sampler: tpe                   # tpe | random | grid
    pruner: median                 # median | hyperband | none
    n_trials: 8
    space:
      learning_rate: {low: 3.0e-4, high: 3.0e-3, log: true}
      warmup_steps: {low: 0, high: 60, step: 20}
      model.resid_pdrop: {values: [0.0, 0.1]}

The whole file is checked before any trial runs: unknown fields, empty ranges, log scales with a
non-positive bound, and values the config itself rejects are errors that say what to change.

Each trial trains in ``OUT/trials/trial_NNNN`` and reports its validation results to Optuna at
every evaluation, so the pruner can stop it early. The study lives in a database (SQLite file
``OUT/study.db`` by default, or any URL Optuna accepts, for workers on several machines); trials
send heartbeats, so after a crash or kill the next run marks the dead trial failed and retries its
parameters, then goes on until ``n_trials`` trials have finished. At the end the best trial's full
config is written as ``OUT/best_config.yaml``, ready for ``gptstack train --config``, with a summary
table and plots of the optimization history and parameter importance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import optuna
import torch
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from .adapt.finetune import TASK_METRICS, FinetuneConfig, finetune
from .config import (ConfigError, ModelConfig, TrainConfig, build_train_config, field_hint, load_config_file,
                     normalise_keys, to_dict)
from .data.prepare import ensure_prepared
from .train.loop import LOWER_IS_BETTER
from .train.pretrain import train

COMMANDS = ("train", "finetune")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = {"train": TrainConfig().available_metrics(), **TASK_METRICS}
SPEC_KEYS = {"command", "base_config", "fixed", "objective", "direction", "sampler", "pruner", "n_trials",
             "seed", "space", "pruner_startup_trials", "pruner_warmup_steps"}
PARAM_KEYS = {"low", "high", "log", "step", "values"}


@dataclass
class Param:
    name: str                 # a config key: "learning_rate", "model.n_layer", ...
    kind: type                # float, int or "categorical" (object)
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    values: list | None = None


@dataclass
class StudySpec:
    command: str
    config_class: type
    base_config: Path | None
    fixed: dict
    objective: str
    direction: str
    sampler: str
    pruner: str
    n_trials: int
    seed: int
    params: list[Param]
    pruner_startup_trials: int = 3
    pruner_warmup_steps: int = 0
    digest: str = ""          # a resumed study must search the same space (see _digest)

    def trial_config(self, overrides: dict) -> TrainConfig:
        return build_train_config(self.base_config, {**self.fixed, **overrides}, cls=self.config_class)


def _config_class(command: str) -> type:
    return FinetuneConfig if command == "finetune" else TrainConfig


def _field_type(cls: type, name: str) -> type:
    """The Python type of config key ``name`` (aliases and ``model.`` keys resolved)."""
    key, value = next(iter(normalise_keys({name: None}).items()))
    if key == "model":
        target, owner = next(iter(value)), ModelConfig
    else:
        target, owner = key, cls
    names = {f.name for f in dataclasses.fields(owner)}
    if target not in names:
        allowed = sorted({f.name for f in dataclasses.fields(cls)} - {"model"}) + ["model.<field>"]
        raise ConfigError(f"space: {name!r} is not a config field of `gptstack {'finetune' if cls is not TrainConfig else 'train'}`; "
                          f"fields are: {', '.join(allowed)}")
    hint = field_hint(owner, target)
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _param(cls: type, name: str, spec: Any) -> Param:
    where = f"space.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping like {{low: 1e-4, high: 1e-2, log: true}} or {{values: [...]}}")
    unknown = set(spec) - PARAM_KEYS
    if unknown:
        raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(PARAM_KEYS)}")
    kind = _field_type(cls, name)
    if "values" in spec:
        if set(spec) != {"values"}:
            raise ConfigError(f"{where}: give either values or low/high, not both")
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"{where}.values must be a non-empty list")
        return Param(name, object, values=list(spec["values"]))
    if kind not in (int, float):
        raise ConfigError(f"{where}: {name} is a {kind.__name__} field; give its choices as values: [...]")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where} needs low and high (or values: [...])")
    try:
        low, high = float(spec["low"]), float(spec["high"])
        step = float(spec["step"]) if spec.get("step") is not None else None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: low, high and step must be numbers, got {spec}") from None
    log = bool(spec.get("log", False))
    if not low < high:
        raise ConfigError(f"{where}: the range [{spec['low']}, {spec['high']}] is empty; low must be below high "
                          "(a single value belongs in fixed:)")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {spec['low']}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}: step must be > 0 and cannot be combined with log: true")
    if kind is int and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise ConfigError(f"{where}: {name} is an integer field; low, high and step must be whole numbers")
    return Param(name, kind, low, high, step, log)


def load_spec(path: str | Path) -> StudySpec:
    """Read and check a search-space file; raises ConfigError before anything runs."""
    path = Path(path)
    raw = load_config_file(path)
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    command = raw.get("command", "train")
    if command not in COMMANDS:
        raise ConfigError(f"{path}: command must be one of {COMMANDS}, got {command!r}")
    cls = _config_class(command)
    base = (path.parent / raw["base_config"]) if raw.get("base_config") else None
    if base is not None and not base.is_file():
        raise ConfigError(f"{path}: base_config {base} does not exist (it is read relative to the space file)")
    fixed = raw.get("fixed") or {}
    space = raw.get("space") or {}
    if not isinstance(fixed, dict) or not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: fixed must be a mapping and space a non-empty mapping of field -> range")
    params = [_param(cls, str(name), spec) for name, spec in space.items()]

    base_cfg = build_train_config(base, fixed, cls=cls)
    task = getattr(base_cfg, "task", "train")
    objective = raw.get("objective", "val_loss")
    if objective not in OBJECTIVES[task]:
        raise ConfigError(f"{path}: objective {objective!r} is not reported by {command} ({task}); "
                          f"choose one of {OBJECTIVES[task]}")
    if "best_metric" not in fixed:
        fixed = {**fixed, "best_metric": objective}    # each trial keeps the checkpoint its value comes from
    direction = raw.get("direction") or ("minimize" if objective in LOWER_IS_BETTER else "maximize")
    sampler, pruner = raw.get("sampler", "tpe"), raw.get("pruner", "median")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"{path}: direction must be minimize or maximize, got {direction!r}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"{path}: sampler must be one of {SAMPLERS}, got {sampler!r}")
    if pruner not in PRUNERS:
        raise ConfigError(f"{path}: pruner must be one of {PRUNERS}, got {pruner!r}")
    if sampler == "grid":
        loose = [p.name for p in params if p.kind is float and p.step is None]
        if loose:
            raise ConfigError(f"{path}: the grid sampler needs a finite grid; give {loose} a step or values")
    n_trials = raw.get("n_trials", 20)
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"{path}: n_trials must be a positive integer, got {n_trials!r}")
    for p in params:   # every corner of the space must make a valid config
        for value in (p.values or [p.low, p.high]):
            try:
                build_train_config(base, {**fixed, p.name: _cast(p, value)}, cls=cls)
            except ConfigError as exc:
                raise ConfigError(f"{path}: space.{p.name} = {value!r} gives an invalid config: {exc}") from None
    return StudySpec(command, cls, base, fixed, objective, direction, sampler, pruner, n_trials,
                     int(raw.get("seed", 0)), params, int(raw.get("pruner_startup_trials", 3)),
                     int(raw.get("pruner_warmup_steps", 0)), _digest(raw, base))


def _digest(raw: dict, base: Path | None) -> str:
    """What a study's results depend on: the command, base config, fixed values, objective and space.
    The trial budget, sampler and pruner may change between runs of the same study."""
    defining = {k: raw.get(k) for k in ("command", "fixed", "objective", "direction", "space")}
    defining["base_config"] = base.read_text() if base else None
    return hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cast(p: Param, value):
    """A value of the field's type; grid floats rounded so 0.1 * 3 is 0.3."""
    if p.kind is int:
        return int(value)
    return round(value, 12) if isinstance(value, float) else value


def grid(params: list[Param]) -> dict[str, list]:
    """Every value of each parameter, for the grid sampler."""
    out = {}
    for p in params:
        if p.values is not None:
            out[p.name] = p.values
        else:
            n = int(math.floor((p.high - p.low) / (p.step or 1) + 1e-9)) + 1
            out[p.name] = [_cast(p, p.low + i * (p.step or 1)) for i in range(n)]
    return out


def suggest(trial, p: Param):
    if p.values is not None:
        return trial.suggest_categorical(p.name, p.values)
    if p.kind is int:
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


# --- running a study ------------------------------------------------------------------------------

@dataclass
class TuneConfig:
    space: str = ""                    # the YAML search-space file
    out_dir: str = "runs/tune"
    storage: str = ""                  # "" = sqlite:///OUT/study.db; any SQLAlchemy URL Optuna accepts
    study_name: str = ""               # "" = the out_dir's folder name
    n_trials: int = 0                  # 0 = the space file's n_trials
    n_jobs: int = 1                    # worker processes on this machine (the cores are split between them)
    heartbeat_interval: int = 5        # seconds between a running trial's heartbeats
    grace_period: int = 20             # a trial silent this long is dead: failed and retried
    keep_last: bool = False            # keep each trial's last/ (optimizer state) as well as best/
    progress: bool = True

    def validate(self) -> "TuneConfig":
        if not self.space:
            raise ConfigError("space is required: a YAML search-space file (see configs/tune-demo.yaml)")
        for name in ("n_trials",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.n_jobs < 1:
            raise ConfigError(f"n_jobs must be >= 1, got {self.n_jobs}")
        if self.heartbeat_interval < 1 or self.grace_period <= self.heartbeat_interval:
            raise ConfigError("heartbeat_interval must be >= 1 and grace_period longer than it")
        return self

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out_dir).resolve() / 'study.db'}"

    @property
    def name(self) -> str:
        return self.study_name or Path(self.out_dir).resolve().name


@dataclass
class TuneResult:
    out_dir: Path
    best_config: Path | None
    best_value: float | None
    best_params: dict
    trials: list[dict] = field(default_factory=list)


def _storage(cfg: TuneConfig):
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)   # heartbeats
    url = cfg.storage_url
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=cfg.heartbeat_interval,
                          grace_period=cfg.grace_period,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    except (optuna.exceptions.OptunaError, ValueError, ImportError) as exc:
        raise ConfigError(f"cannot open the study storage {url!r}: {exc}") from None
    except Exception as exc:   # SQLAlchemy's own errors: a bad URL, an unreachable server, no driver
        raise ConfigError(f"cannot open the study storage {url!r}: {type(exc).__name__}: {exc}") from None


def _sampler(spec: StudySpec, worker: int):
    seed = spec.seed + worker     # workers draw different points
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(grid(spec.params), seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.n_trials // 3)))


def _pruner(spec: StudySpec):
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials,
                                           n_warmup_steps=spec.pruner_warmup_steps)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def _open_study(cfg: TuneConfig, spec: StudySpec, worker: int = 0):
    study = optuna.create_study(storage=_storage(cfg), study_name=cfg.name, direction=spec.direction,
                                sampler=_sampler(spec, worker), pruner=_pruner(spec), load_if_exists=True)
    known = study.user_attrs.get("space_digest")
    if known is None:
        study.set_user_attr("space_digest", spec.digest)
        study.set_user_attr("space", str(Path(cfg.space).resolve()))
    elif known != spec.digest:
        raise ConfigError(f"study {cfg.name!r} in {cfg.storage_url} was started from another search space; "
                          "give a new --out or --study-name, or restore the original space file")
    return study


def _finished(study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _prepared_data(spec: StudySpec, out: Path) -> dict:
    """Pretraining trials share one tokenized copy of raw-text data instead of each preparing its own."""
    if spec.command != "train":
        return {}
    base = spec.trial_config({})
    shared = {"data": str(ensure_prepared(base.data, out / "data", base.tokenizer, progress=False))}
    if base.eval_data:
        shared["eval_data"] = str(ensure_prepared(base.eval_data, out / "data", base.tokenizer, progress=False))
    return shared


def _objective(spec: StudySpec, cfg: TuneConfig, shared: dict):

    def objective(trial) -> float:
        params = {p.name: suggest(trial, p) for p in spec.params}
        trial_dir = Path(cfg.out_dir) / "trials" / f"trial_{trial.number:04d}"
        overrides = {**shared, **params, "out_dir": str(trial_dir), "resume": False, "progress": False,
                     "tensorboard": False}
        run_cfg = spec.trial_config(overrides)
        seen: list[float] = []
        better = min if spec.direction == "minimize" else max

        def on_eval(step: int, total_steps: int, results: dict) -> None:
            value = float(results[spec.objective])
            seen.append(value)
            trial.report(value, step)
            if step < total_steps and trial.should_prune():   # a finished run is never pruned
                raise optuna.TrialPruned(f"pruned at step {step} ({spec.objective} {value:.4f})")

        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "trial.json").write_text(json.dumps({"number": trial.number, "params": params}, indent=2))
        try:
            if spec.command == "finetune":
                finetune(run_cfg, on_eval=on_eval)
            else:
                train(run_cfg, on_eval=on_eval)
        finally:
            if not cfg.keep_last:
                shutil.rmtree(trial_dir / "last", ignore_errors=True)
        if not seen:
            raise ConfigError("the run reported no validation results; it needs validation data and eval_interval "
                              "<= max_steps")
        return better(seen)

    return objective


def _run_worker(cfg: TuneConfig, spec: StudySpec, shared: dict, worker: int, threads: int) -> None:
    """One process's share of the study: trials until the study has n_trials finished ones."""
    if threads:
        torch.set_num_threads(threads)
    study = _open_study(cfg, spec, worker)
    target = cfg.n_trials or spec.n_trials
    remaining = target - _finished(study)
    if remaining <= 0:
        return
    study.optimize(_objective(spec, cfg, shared), n_trials=remaining, catch=(RuntimeError,),
                   callbacks=[MaxTrialsCallback(target, states=(TrialState.COMPLETE, TrialState.PRUNED))],
                   show_progress_bar=cfg.progress and cfg.n_jobs == 1)


def tune(cfg: TuneConfig) -> TuneResult:
    cfg.validate()
    spec = load_spec(cfg.space)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _open_study(cfg, spec)           # create it (or check it) once, before workers race to
    shared = _prepared_data(spec, out)
    if cfg.n_jobs == 1:
        _run_worker(cfg, spec, shared, 0, 0)
    else:
        threads = max(1, (os.cpu_count() or 1) // cfg.n_jobs)
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_run_worker, args=(cfg, spec, shared, w, threads)) for w in range(cfg.n_jobs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        failed = [w.exitcode for w in workers if w.exitcode]
        if failed:
            raise RuntimeError(f"{len(failed)} tuning worker(s) exited with codes {failed}; see their output above")
    return summarize(cfg, spec)


# --- results ----------------------------------------------------------------------------------------

def summarize(cfg: TuneConfig, spec: StudySpec) -> TuneResult:
    """Write best_config.yaml, summary.md, study.json and the plots from the study as it stands."""
    out = Path(cfg.out_dir)
    study = _open_study(cfg, spec)
    trials = study.get_trials(deepcopy=False)
    rows = [{"number": t.number, "state": t.state.name.lower(), "value": t.value,
             "last_reported": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
             "steps": max(t.intermediate_values) if t.intermediate_values else 0,
             "seconds": round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
             if t.datetime_complete and t.datetime_start else None, "params": t.params} for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best_config, best_value, best_params = None, None, {}
    if complete:
        best = study.best_trial
        best_value, best_params = best.value, best.params
        run = spec.trial_config({**best.params, "out_dir": str(out / "best_run"), "resume": False})
        best_config = out / "best_config.yaml"
        header = (f"# Best of study {cfg.name!r}: trial {best.number}, {spec.objective} {best.value:.6g}.\n"
                  f"# Use it: gptstack {spec.command} --config {best_config}\n")
        best_config.write_text(header + yaml.safe_dump(to_dict(run), sort_keys=False))
    (out / "study.json").write_text(json.dumps({"study": cfg.name, "storage": cfg.storage_url, "objective": spec.objective,
                                                "direction": spec.direction, "best_value": best_value,
                                                "best_params": best_params, "trials": rows}, indent=2, default=str))
    (out / "summary.md").write_text(summary_table(rows, spec))
    _plots(study, spec, out)
    return TuneResult(out, best_config, best_value, best_params, rows)


def summary_table(rows: list[dict], spec: StudySpec) -> str:
    """Trials as a Markdown table, best first; pruned and failed trials after the complete ones."""
    names = [p.name for p in spec.params]
    order = {"complete": 0, "pruned": 1}
    sign = 1 if spec.direction == "minimize" else -1

    def key(r):
        value = r["value"] if r["value"] is not None else r["last_reported"]
        return order.get(r["state"], 2), sign * value if value is not None else math.inf

    lines = [f"| trial | state | {spec.objective} | steps | seconds | " + " | ".join(names) + " |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(names)]
    for r in sorted(rows, key=key):
        value = r["value"] if r["value"] is not None else r["last_reported"]
        shown = f"{value:.4f}" if value is not None else ""
        params = " | ".join(_fmt(r["params"].get(n)) for n in names)
        lines.append(f"| {r['number']} | {r['state']} | {shown} | {r['steps']} | {r['seconds'] or ''} | {params} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _plots(study, spec: StudySpec, out: Path) -> None:
    """optimization_history.png and, with enough finished trials, param_importances.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for state, style in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
        points = [(t.number, t.value if t.value is not None else t.intermediate_values[max(t.intermediate_values)])
                  for t in study.get_trials(deepcopy=False, states=(state,))
                  if t.value is not None or t.intermediate_values]
        if points:
            ax.plot(*zip(*points), style, label=f"{state.name.lower()} (last value)" if state == TrialState.PRUNED
                    else state.name.lower())
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    if complete:
        pick = min if spec.direction == "minimize" else max
        best_so_far, running = [], None
        for t in complete:
            running = t.value if running is None else pick(running, t.value)
            best_so_far.append((t.number, running))
        ax.step(*zip(*best_so_far), where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(spec.objective)
    ax.set_title("Optimization history")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "optimization_history.png", dpi=100)
    plt.close(fig)

    if len(complete) < 2 or not spec.params:
        return
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):   # too few distinct points to fit the importance model
        return
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(importances) + 1.5))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    ax.set_title("Parameter importance")
    fig.tight_layout()
    fig.savefig(out / "param_importances.png", dpi=100)
    plt.close(fig)
