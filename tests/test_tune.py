"""Hyperparameter search: space checking, and a study killed mid-trial then resumed to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from sqlalchemy.engine import make_url

from conftest import free_port, run_cli
from gptstack.config import ConfigError
from gptstack.tune import (Param, TuneConfig, _engine_kwargs, _finished, _objective, _surplus, _trial_seed, grid,
                           load_spec, tune)


def tiny_space(data, **changes) -> dict:
    space = {
        "command": "train",
        "fixed": {"data": str(data), "preset": "tiny", "batch_size": 4, "max_steps": 8, "eval_interval": 2,
                  "eval_iters": 2, "eval_batch_size": 4, "log_interval": 4, "dtype": "fp32", "peak_flops": 1e12,
                  "warmup_steps": 2},
        "objective": "val_loss", "sampler": "tpe", "pruner": "median", "pruner_startup_trials": 2,
        "n_trials": 8, "seed": 3,
        "space": {"learning_rate": {"low": 1e-5, "high": 3e-2, "log": True}, "model.n_layer": {"values": [1, 2]}},
    }
    space.update(changes)
    return space


def write(path, space) -> str:
    path.write_text(yaml.safe_dump(space))
    return str(path)


def counted(study) -> list:
    """The study's trials less the surplus ones a worker ended before training (see tune._surplus)."""
    return [t for t in study.get_trials() if not t.user_attrs.get("surplus")]


@pytest.mark.parametrize("space_change, message", [
    ({"learning_rat": {"low": 1e-4, "high": 1e-3}}, "'learning_rat' is not a config field"),
    ({"model.n_layers": {"values": [1, 2]}}, "'model.n_layers' is not a config field"),
    ({"learning_rate": {"low": 1e-3, "high": 1e-4}}, "is empty"),
    ({"warmup_steps": {"low": 5, "high": 5}}, "is empty"),
    ({"learning_rate": {"low": 0.0, "high": 1e-3, "log": True}}, "log scale needs low > 0"),
    ({"weight_decay": {"low": -1.0, "high": 1.0, "log": True}}, "log scale needs low > 0"),
    ({"warmup_steps": {"low": 0.5, "high": 10}}, "integer field"),
    ({"model.resid_pdrop": {"low": 0.0, "high": 1.5}}, "gives an invalid config"),
    ({"dtype": {"low": 0, "high": 1}}, "give its choices as values"),
    ({"learning_rate": {"values": []}}, "non-empty list"),
    ({"learning_rate": {"low": 1e-4, "high": 1e-3, "scale": "log"}}, "unknown keys ['scale']"),
])
def test_bad_spaces_are_rejected_before_any_trial(shakespeare, tmp_path, space_change, message):
    space = tiny_space(shakespeare)
    space["space"] = space_change
    path = write(tmp_path / "space.yaml", space)
    with pytest.raises(ConfigError, match=None) as info:
        load_spec(path)
    assert message in str(info.value)
    proc = run_cli("tune", "--space", path, "--out", str(tmp_path / "study"), "--quiet")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "study" / "trials").exists()


@pytest.mark.parametrize("change, message", [
    ({"objective": "accuracy"}, "objective 'accuracy' is not reported by train"),
    ({"sampler": "grid"}, "needs a finite grid"),
    ({"pruner": "sometimes"}, "pruner must be one of"),
    ({"base_config": "nowhere.yaml"}, "does not exist"),
])
def test_bad_study_settings(shakespeare, tmp_path, change, message):
    with pytest.raises(ConfigError) as info:
        load_spec(write(tmp_path / "space.yaml", tiny_space(shakespeare, **change)))
    assert message in str(info.value)


def test_study_killed_mid_trial_resumes_and_its_best_config_trains(shakespeare, tmp_path):
    space = write(tmp_path / "space.yaml", tiny_space(shakespeare))
    out = tmp_path / "study"
    args = [sys.executable, "-m", "gptstack.cli", "tune", "--space", space, "--out", str(out), "--quiet",
            "--heartbeat-interval", "1", "--grace-period", "3"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "trials" / "trial_0002" / "trial.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)                      # the third trial is now training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in study.get_trials()]
    assert optuna.trial.TrialState.RUNNING in states and len(states) < 8

    time.sleep(3.5)                      # past the grace period: the killed trial is now stale
    resumed = run_cli("tune", "--space", space, "--out", str(out), "--quiet", "--heartbeat-interval", "1",
                      "--grace-period", "3", check=True)
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}")
    by_state = {}
    for t in counted(study):
        by_state.setdefault(t.state.name, []).append(t)
    finished = by_state.get("COMPLETE", []) + by_state.get("PRUNED", [])
    assert len(finished) == 8
    assert by_state.get("PRUNED"), "the median pruner stopped no trial"
    assert all(t.intermediate_values and max(t.intermediate_values) < 8 for t in by_state["PRUNED"])
    (killed,) = by_state["FAIL"]
    assert any(t.params == killed.params for t in finished), "the killed trial's parameters were not retried"
    for t in finished:
        assert (out / "trials" / f"trial_{t.number:04d}" / "metrics.jsonl").exists()
    assert "| trial | state | val_loss |" in resumed.stdout
    for name in ("best_config.yaml", "summary.md", "study.json", "optimization_history.png", "param_importances.png"):
        assert (out / name).exists(), name

    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["learning_rate"] == pytest.approx(study.best_params["learning_rate"])
    assert best["model"]["n_layer"] == study.best_params["model.n_layer"]
    run_cli("train", "--config", str(out / "best_config.yaml"), "--max_steps", "2", "--out_dir", str(tmp_path / "again"),
            "--progress", "false", check=True)
    assert (tmp_path / "again" / "best" / "model.safetensors").exists()


def test_finetune_study_with_grid_sampler(tiny_checkpoint, tmp_path):
    from conftest import tiny_finetune_overrides, write_sentiment
    data = write_sentiment(tmp_path / "s.tsv", 200)
    fixed = tiny_finetune_overrides(tiny_checkpoint, data, tmp_path / "unused", max_steps=6, eval_interval=3)
    fixed.pop("out_dir")
    space = {"command": "finetune", "fixed": fixed, "objective": "accuracy", "sampler": "grid", "pruner": "none",
             "n_trials": 4, "space": {"learning_rate": {"values": [1e-3, 1e-2]}, "lora_rank": {"values": [0, 4]}}}
    out = tmp_path / "study"
    run_cli("tune", "--space", write(tmp_path / "space.yaml", space), "--out", str(out), "--quiet", check=True)
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert sorted((t.params["learning_rate"], t.params["lora_rank"]) for t in study.trials) == \
        [(1e-3, 0), (1e-3, 4), (1e-2, 0), (1e-2, 4)]
    assert "gptstack finetune --config" in (out / "best_config.yaml").read_text()
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["best_metric"] == "accuracy"           # trials kept the checkpoint their value came from
    kept = json.loads((out / "trials" / f"trial_{study.best_trial.number:04d}" / "best" / "config.json").read_text())
    assert kept["meta"]["metrics"]["accuracy"] == pytest.approx(study.best_value)


def test_two_worker_processes_share_one_study(shakespeare, tmp_path):
    space = write(tmp_path / "space.yaml", tiny_space(shakespeare, n_trials=4, pruner="none", sampler="random"))
    out = tmp_path / "study"
    run_cli("tune", "--space", space, "--out", str(out), "--n-jobs", "2", "--quiet", check=True)
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}")
    trials = counted(study)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.params["learning_rate"] for t in trials}) == 4                 # the workers drew different points
    assert sorted(d.name for d in (out / "trials").iterdir()) == [f"trial_{t.number:04d}" for t in trials]


def test_a_trial_the_study_does_not_need_is_surplus():
    study = optuna.create_study()
    for _ in range(3):
        study.tell(study.ask(), 1.0)
    elsewhere = study.ask()                        # trial 3 runs on another machine as a worker joins
    assert not _surplus(study, elsewhere.number, 4)
    study.optimize(_objective(None, None, {}, target=4), n_trials=1)     # no spec: it ends before training
    late = study.trials[-1]
    assert late.state == optuna.trial.TrialState.PRUNED and late.user_attrs == {"surplus": True}
    study.tell(elsewhere, 2.0)
    assert _finished(study) == 4                   # the surplus trial is not one of them

    study = optuna.create_study()
    first, second = study.ask(), study.ask()       # two workers ask at once for the one trial left
    assert not _surplus(study, first.number, 1) and _surplus(study, second.number, 1)


def test_each_trial_has_its_own_reproducible_seed():
    assert _trial_seed(3, 1) != _trial_seed(4, 0) and _trial_seed(3, 1) == _trial_seed(3, 1)
    assert len({_trial_seed(seed, number) for seed in range(20) for number in range(50)}) == 1000


@pytest.mark.parametrize("url, timeout", [("postgresql://me@db/optuna", 10), ("postgresql+psycopg2://me@db/optuna", 10),
                                          ("postgresql://me@db/optuna?connect_timeout=3", None),
                                          ("postgresql+pg8000://me@db/optuna", None),
                                          ("postgresql+asyncpg://me@db/optuna", None)])
def test_only_libpq_drivers_get_a_connect_timeout(url, timeout):
    assert _engine_kwargs(make_url(url)).get("connect_args", {}).get("connect_timeout") == timeout


def test_a_study_grows_with_more_trials_but_not_with_another_space(shakespeare, tmp_path):
    out = tmp_path / "study"
    space = tiny_space(shakespeare, n_trials=2, pruner="none")
    run_cli("tune", "--space", write(tmp_path / "space.yaml", space), "--out", str(out), "--quiet", check=True)
    space["n_trials"] = 3          # a bigger budget for the same search continues the study
    run_cli("tune", "--space", write(tmp_path / "space.yaml", space), "--out", str(out), "--quiet", check=True)
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3
    space["space"]["learning_rate"]["high"] = 1e-1
    proc = run_cli("tune", "--space", write(tmp_path / "space.yaml", space), "--out", str(out), "--quiet")
    assert proc.returncode == 2 and "another search space" in proc.stderr


@pytest.mark.parametrize("storage, message", [
    ("study.db", "'study.db' is not a database URL; give one like sqlite:///"),
    ("notadb://nowhere", "unknown kind of database 'notadb'"),
    ("postgres://me@db/optuna", "SQLAlchemy spells PostgreSQL postgresql://"),
    ("postgresql://me:secret@db/optuna", "needs the database driver 'psycopg', which is not installed: "
                                         "pip install 'gptstack[postgres]'"),
])
def test_a_storage_url_that_cannot_work_says_how_to_fix_it(shakespeare, tmp_path, monkeypatch, storage, message):
    monkeypatch.setitem(sys.modules, "psycopg", None)      # as on a machine without the postgres extra
    with pytest.raises(ConfigError) as info:
        tune(TuneConfig(space=write(tmp_path / "space.yaml", tiny_space(shakespeare)), out_dir=str(tmp_path / "s"),
                        storage=storage))
    assert message in str(info.value) and "secret" not in str(info.value)


def test_an_unreachable_database_server_is_a_clear_error(shakespeare, tmp_path):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is not installed: pip install -e '.[test]'")
    space = write(tmp_path / "space.yaml", tiny_space(shakespeare))
    storage = f"postgresql://me@127.0.0.1:{free_port()}/optuna"          # nothing listens there
    proc = run_cli("tune", "--space", space, "--out", str(tmp_path / "s"), "--storage", storage, "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot connect to the study database '{storage}'" in proc.stderr and "Connection refused" in proc.stderr
    assert "Check that the server is running" in proc.stderr


def test_grid_lists_every_step_of_a_range():
    params = [Param("weight_decay", float, 0.0, 0.3, step=0.1), Param("warmup_steps", int, 0, 40, step=10),
              Param("model.n_layer", object, values=[2, 4])]
    assert grid(params) == {"weight_decay": [0.0, 0.1, 0.2, 0.3], "warmup_steps": [0, 10, 20, 30, 40],
                            "model.n_layer": [2, 4]}
