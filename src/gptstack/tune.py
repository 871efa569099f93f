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
``OUT/study.db`` by default, or a server that workers on several machines share, given as a URL:
``postgresql://user@host/dbname``); trials send heartbeats, so after a crash or kill the next run
marks the dead trial failed and retries its parameters, then goes on until ``n_trials`` trials have
finished. Workers asking at once never train one too many: the extra trial ends before it starts, pruned
and marked ``surplus``, and is left out of the results. At the end the best trial's full config is
written as ``OUT/best_config.yaml``, ready for ``gptstack train --config``, with a summary table and
plots of the optimization history and parameter importance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_args

import optuna
import sqlalchemy
import torch
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import URL, make_url

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
EXAMPLE_URLS = "sqlite:///path/to/study.db or postgresql://user@host:5432/dbname"


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
    storage: str = ""                  # "" = sqlite:///OUT/study.db; for several machines postgresql://user@host/db
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
    def storage_shown(self) -> str:
        """The storage URL for messages and study.json: without its password."""
        try:
            return make_url(self.storage_url).render_as_string(hide_password=True)
        except sqlalchemy.exc.ArgumentError:
            return self.storage_url

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


def _storage(cfg: TuneConfig) -> RDBStorage:
    """The study's database; a URL that is not one, or names a database this machine cannot reach, is a
    ConfigError saying what to fix."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)   # heartbeats
    shown = cfg.storage_shown
    try:
        url = make_url(cfg.storage_url)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"--storage {shown!r} is not a database URL; give one like {EXAMPLE_URLS}") from None
    engine_kwargs = _engine_kwargs(url)
    _connect_once(url, engine_kwargs, shown)
    for attempt in range(3):
        try:
            return RDBStorage(cfg.storage_url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat_interval,
                              grace_period=cfg.grace_period, heartbeat_stale_trial_callback=_retry_dead_trial)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            if attempt == 2 or not _lost_table_race(exc):
                raise ConfigError(f"cannot set up the study tables in {shown!r}: {_reason(exc)}") from None
            time.sleep(1 + attempt)
        except RuntimeError as exc:   # tables written by an incompatible Optuna version
            raise ConfigError(f"cannot use the study storage {shown!r}: {exc}") from None


def _lost_table_race(exc: Exception) -> bool:
    """Workers starting at once on an empty database race to create Optuna's tables (optuna#1092): the
    losers get a duplicate key or "already exists", and find the tables there when they try again. Any
    other error (no permission, a full disk) would only come back, so it is not retried."""
    error = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    return isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)


def _engine_kwargs(url: URL) -> dict:
    """SQLite waits for a busy file rather than failing. A server connection is checked before each use
    (one left idle through a long trial may have been dropped), and PostgreSQL through libpq (psycopg,
    psycopg2) gives up connecting after 10 s instead of the system's minutes; other drivers reject
    connect_timeout."""
    if url.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 60}}
    if (url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg2")
            and "connect_timeout" not in url.query):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {"pool_pre_ping": True}


def _connect_once(url: URL, engine_kwargs: dict, shown: str) -> None:
    """Connect before Optuna does, so an unknown kind of database, a missing driver or a server out of
    reach is an error naming the fix, not a traceback from inside SQLAlchemy."""
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs)
    except sqlalchemy.exc.NoSuchModuleError:
        hint = " (SQLAlchemy spells PostgreSQL postgresql://)" if url.drivername.split("+")[0] == "postgres" else ""
        raise ConfigError(f"--storage {shown!r}: unknown kind of database {url.drivername!r}{hint}; "
                          f"give a URL like {EXAMPLE_URLS}") from None
    except ImportError as exc:
        missing = exc.name or str(exc)
        fix = ("pip install 'gptstack[postgres]'" if url.drivername in ("postgresql", "postgresql+psycopg")
               else f"install the package that provides the Python module {missing!r}")
        raise ConfigError(f"--storage {shown!r} needs the database driver {missing!r}, which is not installed: "
                          f"{fix}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as exc:
        check = ("that its folder exists and is writable" if url.get_backend_name() == "sqlite" else
                 "that the server is running and reachable from this machine, and that the URL's user, password "
                 "and database exist")
        raise ConfigError(f"cannot connect to the study database {shown!r}: {_reason(exc)}. Check {check}") from None
    finally:
        engine.dispose()


def _reason(exc: Exception) -> str:
    """The database driver's own message, on one line."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())


def _trial_seed(seed: int, number: int) -> int:
    """A hash of (seed, trial number): seed + number would give seed 3's trial 1 the points of seed 4's trial 0."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "little")


class _SeededPerTrial(optuna.samplers.BaseSampler):
    """Draws each trial's points from a fresh sampler seeded from the study's seed and the trial's number.
    The study numbers its trials, so workers in any number of processes and machines never draw the same
    points (one seed per process would repeat them on every machine), and a one-worker study is reproducible."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._sampler = make(seed)

    def before_trial(self, study, trial) -> None:
        self._sampler = self._make(_trial_seed(self._seed, trial.number))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler.after_trial(study, trial, state, values)


def _sampler(spec: StudySpec):
    if spec.sampler == "grid":   # one seed everywhere: a grid point's number must mean the same point to every worker
        return optuna.samplers.GridSampler(grid(spec.params), seed=spec.seed)
    if spec.sampler == "random":
        return _SeededPerTrial(lambda seed: optuna.samplers.RandomSampler(seed=seed), spec.seed)
    startup = max(2, min(10, spec.n_trials // 3))
    return _SeededPerTrial(lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup), spec.seed)


def _pruner(spec: StudySpec):
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials,
                                           n_warmup_steps=spec.pruner_warmup_steps)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def _open_study(cfg: TuneConfig, spec: StudySpec):
    study = optuna.create_study(storage=_storage(cfg), study_name=cfg.name, direction=spec.direction,
                                sampler=_sampler(spec), pruner=_pruner(spec), load_if_exists=True)
    known = study.user_attrs.get("space_digest")
    if known is None:
        study.set_user_attr("space_digest", spec.digest)
        study.set_user_attr("space", str(Path(cfg.space).resolve()))
    elif known != spec.digest:
        raise ConfigError(f"study {cfg.name!r} in {cfg.storage_shown} was started from another search space; "
                          "give a new --out or --study-name, or restore the original space file")
    return study


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class _Surplus(optuna.TrialPruned):
    """Ends a trial the study does not need (see _surplus) before it trains."""


def _counted(study, states=None) -> list:
    """The study's trials (in ``states``) less the surplus ones, which did no work: counts and summaries
    leave them out."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("surplus")]


def _finished(study) -> int:
    return len(_counted(study, FINISHED))


def _surplus(study, number: int, target: int) -> bool:
    """Whether the study reaches ``target`` without trial ``number``: its finished trials plus those ahead
    in line (running or waiting, with a lower number) make it. The study hands out numbers one at a time,
    so every lower-numbered trial exists when this runs, and of two trials that start together the later
    sees the earlier: however workers interleave, at most ``target`` trials train. One read, so a trial
    finishing meanwhile is counted once."""
    trials = _counted(study)
    ahead = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < number for t in trials)
    return sum(t.state in FINISHED for t in trials) + ahead >= target


def _retry_dead_trial(study, trial) -> None:
    """Retries the parameters of a trial whose worker died; a surplus one had nothing to do."""
    if not trial.user_attrs.get("surplus"):
        RetryHeartbeatStaleTrialCallback(max_retry=2)(study, trial)


def _stop_at(target: int, poll_seconds: float):
    """A worker's check after each trial: stop once the study has ``target`` finished trials. While the
    trials running elsewhere would reach it, wait for them rather than start a surplus trial; if one of
    them fails, or its worker dies (its heartbeat stops), go on and run a trial in its place."""

    def check(study, trial) -> None:
        while (finished := _finished(study)) < target:
            optuna.storages.fail_stale_trials(study)
            if finished + len(_counted(study, (TrialState.RUNNING,))) < target:
                return
            time.sleep(poll_seconds)
        study.stop()

    return check


def _prepared_data(spec: StudySpec, out: Path) -> dict:
    """Pretraining trials share one tokenized copy of raw-text data instead of each preparing its own."""
    if spec.command != "train":
        return {}
    base = spec.trial_config({})
    shared = {"data": str(ensure_prepared(base.data, out / "data", base.tokenizer, progress=False))}
    if base.eval_data:
        shared["eval_data"] = str(ensure_prepared(base.eval_data, out / "data", base.tokenizer, progress=False))
    return shared


def _objective(spec: StudySpec, cfg: TuneConfig, shared: dict, target: int):

    def objective(trial) -> float:
        if _surplus(trial.study, trial.number, target):   # ended here, inside optimize, so its heartbeat runs
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"surplus: the study has its {target} trials, finished or running elsewhere")
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


def _run_worker(cfg: TuneConfig, spec: StudySpec, shared: dict, threads: int) -> None:
    """One process's share of the study: trials until the study has n_trials finished ones."""
    if threads:
        torch.set_num_threads(threads)
    study = _open_study(cfg, spec)
    target = cfg.n_trials or spec.n_trials
    remaining = target - _finished(study)
    if remaining <= 0:
        return
    study.optimize(_objective(spec, cfg, shared, target), n_trials=remaining, catch=(RuntimeError,),
                   callbacks=[_stop_at(target, cfg.heartbeat_interval)],
                   show_progress_bar=cfg.progress and cfg.n_jobs == 1)


def tune(cfg: TuneConfig) -> TuneResult:
    cfg.validate()
    spec = load_spec(cfg.space)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _open_study(cfg, spec)           # create it (or check it) once, before workers race to
    shared = _prepared_data(spec, out)
    if cfg.n_jobs == 1:
        _run_worker(cfg, spec, shared, 0)
    else:
        threads = max(1, (os.cpu_count() or 1) // cfg.n_jobs)
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_run_worker, args=(cfg, spec, shared, threads)) for _ in range(cfg.n_jobs)]
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
    trials = _counted(study)
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
    (out / "study.json").write_text(json.dumps({"study": cfg.name, "storage": cfg.storage_shown,
                                                "objective": spec.objective, "direction": spec.direction,
                                                "best_value": best_value,
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
                  for t in _counted(study, (state,))
                  if t.value is not None or t.intermediate_values]
        if points:
            ax.plot(*zip(*points), style, label=f"{state.name.lower()} (last value)" if state == TrialState.PRUNED
                    else state.name.lower())
    complete = sorted(_counted(study, (TrialState.COMPLETE,)), key=lambda t: t.number)
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
