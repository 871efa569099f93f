"""A study shared by workers through a real PostgreSQL server, as on several machines.

The test starts its own server (Debian's `postgresql` package) in a temporary directory on a free local
port, and skips when the server binaries are not installed."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from conftest import free_port
from gptstack.config import ConfigError
from gptstack.tune import TuneConfig, tune
from test_tune import counted, tiny_space, write

pytest.importorskip("psycopg", reason="the PostgreSQL driver is not installed: pip install -e '.[test]'")


def server_bin_dir() -> Path | None:
    """Debian keeps the server programs off PATH, one directory per major version: the newest wins."""
    debian = sorted(Path("/usr/lib/postgresql").glob("[0-9]*/bin/pg_ctl"), key=lambda p: float(p.parts[-3]))
    found = debian[-1] if debian else shutil.which("pg_ctl")
    return Path(found).parent if found else None


BIN = server_bin_dir()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(BIN is None, reason="the PostgreSQL server is not installed "
                                                   "(Debian: apt-get install postgresql)")]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway server on 127.0.0.1 with an empty database; yields its URL."""
    root = Path(tempfile.mkdtemp(prefix="gptstack-pg-", dir="/tmp"))   # not under pytest's tmp or $TMPDIR, which
    as_user = []                                                       # may keep out the unprivileged user below
    if os.geteuid() == 0:        # PostgreSQL refuses to run as root
        user = _unprivileged_user()
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", user.pw_name, "--"]
    port, data = free_port(), root / "data"

    def run(*command) -> None:
        proc = subprocess.run([*as_user, *map(str, command)], cwd=root, capture_output=True, text=True, timeout=120)
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        assert proc.returncode == 0, f"{command[0]} failed:\n{proc.stdout}{proc.stderr}{log}"

    run(BIN / "initdb", "-D", data, "-U", "gptstack", "--auth", "trust", "--no-sync")
    run(BIN / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -F", "start")   # -F: no fsync, for speed
    try:
        run(BIN / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "gptstack", "studies")
        yield f"postgresql://gptstack@127.0.0.1:{port}/studies"
    finally:
        try:
            run(BIN / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        except (AssertionError, subprocess.TimeoutExpired) as exc:   # logged: raised, it would hide a test's error
            logging.getLogger(__name__).warning("could not stop the test server: %s", exc)
        shutil.rmtree(root, ignore_errors=True)


def _unprivileged_user() -> pwd.struct_passwd:
    """The account Debian's package creates for the server, else nobody."""
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return pwd.getpwnam("nobody")


def sql(url: str, *statements: str) -> None:
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")   # CREATE DATABASE runs outside a transaction
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(sqlalchemy.text(statement))
    finally:
        engine.dispose()


def database(server: str, name: str, user: str = "gptstack") -> str:
    """The URL of database ``name`` on the server at ``server`` (the fixture's URL), as ``user``."""
    return server.rsplit("/", 1)[0].replace("gptstack@", f"{user}@") + "/" + name


def start_worker(space: str, storage: str, out: Path) -> subprocess.Popen:
    """`gptstack tune` as one machine runs it, its output in OUT.log. The grace period outlasts the pause
    of the test below, so that no trial is taken for dead."""
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen([sys.executable, "-m", "gptstack.cli", "tune", "--space", space, "--out", str(out),
                                 "--storage", storage, "--study-name", "shared", "--quiet",
                                 "--heartbeat-interval", "1", "--grace-period", "600"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_trial(worker: subprocess.Popen, out: Path) -> None:
    """Until the worker is training a trial: it writes trial.json once the trial is running in the study."""
    deadline = time.time() + 300
    while not any((out / "trials").glob("*/trial.json")):
        assert worker.poll() is None and time.time() < deadline, out.with_suffix(".log").read_text()[-3000:]
        time.sleep(0.1)


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_workers_on_two_machines_share_one_study(shakespeare, postgres, tmp_path):
    space = write(tmp_path / "space.yaml", tiny_space(shakespeare, n_trials=4, pruner="none"))
    machines = [tmp_path / "machine_a", tmp_path / "machine_b"]   # each its own --out, as on its own disk
    b = start_worker(space, postgres, machines[1])
    workers = [b]
    try:
        wait_for_trial(b, machines[1])
        b.send_signal(signal.SIGSTOP)     # B holds its first trial, so A must train one of the others
        workers.insert(0, start_worker(space, postgres, machines[0]))
        wait_for_trial(workers[0], machines[0])
        b.send_signal(signal.SIGCONT)
        for worker, out in zip(workers, machines):
            worker.wait(timeout=600)
            output = out.with_suffix(".log").read_text()
            assert worker.returncode == 0 and "Traceback" not in output, output[-3000:]
            assert "| trial | state | val_loss |" in output
    finally:
        stop(workers)

    study = optuna.load_study(study_name="shared", storage=postgres)
    trials = counted(study)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.params["learning_rate"] for t in trials}) == 4              # no point drawn twice
    ran = [{int(d.name.removeprefix("trial_")) for d in (out / "trials").iterdir()} for out in machines]
    assert ran[0] and ran[1] and not ran[0] & ran[1]                        # each trial ran once, somewhere
    assert ran[0] | ran[1] == {t.number for t in trials}
    assert study.best_value == min(t.value for t in trials)
    for out in machines:                 # each machine's summary covers the whole study
        summary = json.loads((out / "study.json").read_text())
        assert summary["best_value"] == pytest.approx(study.best_value) and len(summary["trials"]) == 4
        assert summary["storage"] == postgres and (out / "best_config.yaml").exists()


OPEN_STORAGE = """
import sys, time
from pathlib import Path
from gptstack.tune import TuneConfig, _storage
print("ready", flush=True)
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
_storage(TuneConfig(space="-", storage=sys.argv[2]))
"""


def test_workers_starting_together_on_an_empty_database_all_get_in(postgres, tmp_path):
    sql(postgres, "CREATE DATABASE race")
    go = tmp_path / "go"
    workers = [subprocess.Popen([sys.executable, "-c", OPEN_STORAGE, str(go), database(postgres, "race")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    try:
        assert all(w.stdout.readline() == "ready\n" for w in workers)
        go.touch()                       # all at once: they race to create Optuna's tables
        outputs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        stop(workers)
    assert all(w.returncode == 0 for w in workers), "\n".join(outputs)


def test_a_user_without_rights_is_told_at_once(shakespeare, postgres, tmp_path, monkeypatch):
    sql(postgres, "CREATE ROLE visitor LOGIN", "CREATE DATABASE locked")
    sql(database(postgres, "locked"), "REVOKE CREATE ON SCHEMA public FROM PUBLIC")   # PostgreSQL 15's default
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    with pytest.raises(ConfigError, match="cannot set up the study tables .*permission denied for schema public"):
        tune(TuneConfig(space=write(tmp_path / "space.yaml", tiny_space(shakespeare)), out_dir=str(tmp_path / "s"),
                        storage=database(postgres, "locked", user="visitor")))
    assert not slept                     # a permanent error is not retried


def test_a_database_that_does_not_exist_is_a_clear_error(shakespeare, postgres, tmp_path):
    missing = postgres.rsplit("/", 1)[0] + "/nosuchdb"
    space = write(tmp_path / "space.yaml", tiny_space(shakespeare))
    with pytest.raises(ConfigError, match='cannot connect to the study database .*database "nosuchdb" does not exist'):
        tune(TuneConfig(space=space, out_dir=str(tmp_path / "study"), storage=missing))
