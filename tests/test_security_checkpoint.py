"""Checkpoints at rest: encryption (AES-256-GCM) through the real CLI, and what faults during saves
and corruption afterwards leave behind (docs/security.md)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from gptstack.checkpoint import (CheckpointError, is_encrypted, load_model, load_train_state, recover_interrupted_save,
                                 save_checkpoint, save_failure, verify)
from gptstack.config import ModelConfig
from gptstack.crypto import KEY_ENV, KEY_FILE_ENV, EncryptionError, FileCipher, write_new_key
from gptstack.files import sha256_file
from gptstack.model import GPT
from gptstack.tokenizer import train_bpe

from conftest import CORPUS, cli_args, run_cli, tiny_overrides

SMALL = ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    return write_new_key(tmp_path_factory.mktemp("keys") / "checkpoint.key")


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    return train_bpe([CORPUS], 300, tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


def rewrite_checksums(directory: Path) -> None:
    """checksums.json made to match the files again: what someone who edits files on purpose does."""
    sums = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.name != "checksums.json"}
    (directory / "checksums.json").write_text(json.dumps(sums))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- encryption through the CLI -------------------------------------------------------------------

@pytest.fixture(scope="module")
def encrypted_run(shakespeare, key_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("encrypted") / "run"
    run_cli("train", "--key-file", str(key_file),
            *cli_args(tiny_overrides(shakespeare, out, max_steps=6, eval_interval=3, encrypt="true")),
            env={"OMP_NUM_THREADS": "1"}, check=True)
    return out


def test_an_encrypted_run_stores_no_file_in_the_clear(encrypted_run):
    for name in ("best", "last"):
        directory = encrypted_run / name
        assert is_encrypted(directory)
        public = json.loads((directory / "encryption.json").read_text())
        assert public["cipher"] == "AES-256-GCM" and len(bytes.fromhex(public["scope"])) == 16
        sealed = [p for p in directory.iterdir() if p.name not in ("checksums.json", "encryption.json")]
        assert "config.json" in {p.name for p in sealed}
        checksums = json.loads((directory / "checksums.json").read_text())
        for path in sealed:   # safetensors, JSON and DCP's pickle all start otherwise
            assert path.read_bytes()[:7] == b"GPTSENC", path
            assert checksums[path.name] == sha256_file(path)   # of the ciphertext: checked without the key


def test_generate_and_eval_read_an_encrypted_checkpoint(encrypted_run, key_file, shakespeare):
    best = str(encrypted_run / "best")
    prompt = ["--prompt", "ROMEO:", "--max-new-tokens", "8", "--seed", "3", "--temperature", "0.7"]
    by_file = run_cli("generate", "--checkpoint", best, "--key-file", str(key_file), *prompt, check=True)
    by_env = run_cli("generate", "--checkpoint", best, *prompt, check=True,
                     env={KEY_ENV: key_file.read_text().strip()})
    assert by_file.stdout.startswith("ROMEO:") and by_file.stdout == by_env.stdout
    scored = run_cli("eval", "--checkpoint", best, "--data", str(shakespeare), "--max-tokens", "2000", "--quiet",
                     "--key-file", str(key_file), check=True)
    assert "perplexity" in scored.stdout


def test_without_the_right_key_the_cli_says_how_to_give_it(encrypted_run, tmp_path):
    best = str(encrypted_run / "best")
    missing = run_cli("generate", "--checkpoint", best, "--max-new-tokens", "2", env={KEY_FILE_ENV: "", KEY_ENV: ""})
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "no key was given" in missing.stderr and "--key-file" in missing.stderr
    other = write_new_key(tmp_path / "other.key")
    wrong = run_cli("generate", "--checkpoint", best, "--max-new-tokens", "2", "--key-file", str(other))
    assert wrong.returncode == 2 and "encrypted with another key" in wrong.stderr and "Traceback" not in wrong.stderr
    malformed = tmp_path / "malformed.key"
    malformed.write_text("not a key")
    bad = run_cli("generate", "--checkpoint", best, "--key-file", str(malformed))
    assert bad.returncode == 2 and "64 hexadecimal digits" in bad.stderr and "not a key" not in bad.stderr


def test_a_key_on_the_command_line_is_refused(encrypted_run, key_file):
    key = key_file.read_text().strip()
    for args in (["generate", "--checkpoint", str(encrypted_run / "best"), "--key", key], ["train", f"--key={key}"]):
        proc = run_cli(*args)
        assert proc.returncode == 2 and "never taken on the command line" in proc.stderr, proc.stderr
    assert "--key " not in run_cli("generate", "--help").stdout.replace("--key-file", "")


def test_encrypted_training_resumes_with_its_key(encrypted_run, key_file, shakespeare, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(encrypted_run, out)
    overrides = tiny_overrides(shakespeare, out, max_steps=9, eval_interval=3, encrypt="true")
    no_key = run_cli("train", *cli_args(overrides), env={KEY_FILE_ENV: "", KEY_ENV: ""})
    assert no_key.returncode == 2 and "needs a key" in no_key.stderr and "Traceback" not in no_key.stderr
    in_the_clear = run_cli("train", "--key-file", str(key_file), *cli_args({**overrides, "encrypt": "false"}))
    assert in_the_clear.returncode == 2 and "would write the checkpoints it derives from it in the clear" in in_the_clear.stderr
    resumed = run_cli("train", "--key-file", str(key_file), *cli_args(overrides), env={"OMP_NUM_THREADS": "1"},
                      check=True)
    assert "done: 9 steps" in resumed.stdout
    starts = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in starts if row.get("event") == "start"] == [0]   # resumed, not restarted
    assert is_encrypted(out / "last") and is_encrypted(out / "best")


def test_tampered_renamed_or_swapped_files_do_not_decrypt(small_tokenizer, key_file, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    model = GPT(SMALL)
    for name in ("a", "b"):
        save_checkpoint(tmp_path / name, model, small_tokenizer, train_state={"step": 1}, encrypt=True)
    assert same_weights(load_model(tmp_path / "a")[0], model)

    flipped = tmp_path / "a" / "model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 1
    flipped.write_bytes(bytes(data))
    rewrite_checksums(tmp_path / "a")
    with pytest.raises(CheckpointError, match="could not be decrypted: wrong key or the file was modified"):
        load_model(tmp_path / "a")

    # a file of checkpoint b under the same name in checkpoint a: same key, another checkpoint
    shutil.copyfile(tmp_path / "b" / "model.safetensors", flipped)
    rewrite_checksums(tmp_path / "a")
    with pytest.raises(CheckpointError, match="model.safetensors could not be decrypted"):
        load_model(tmp_path / "a")

    # two files of one checkpoint trading names
    b = tmp_path / "b"
    (b / "train_state.json").rename(b / "swap")
    (b / "config.json").rename(b / "train_state.json")
    (b / "swap").rename(b / "config.json")
    rewrite_checksums(b)
    with pytest.raises(CheckpointError, match="config.json could not be decrypted"):
        load_model(b)


def test_files_are_sealed_in_chunks_that_cannot_be_dropped_or_reordered():
    """GCM seals at most 2 GiB at once: larger files are sealed chunk by chunk (here 16 bytes)."""
    cipher = FileCipher(os.urandom(32), os.urandom(16), chunk_bytes=16)
    for size in (0, 1, 16, 17, 40):
        data = os.urandom(size)
        assert cipher.open("x", cipher.seal("x", data)) == data
    sealed = cipher.seal("x", bytes(40))                        # chunks of 16, 16 and 8 bytes
    magic, record = 8, 12 + 16 + 16
    first, second, third = (sealed[magic + i * record:magic + (i + 1) * record] for i in range(3))
    for forged in (sealed[:magic] + first, sealed[:magic] + first + second,     # cut at a chunk boundary
                   sealed[:magic] + second + first + third,                    # reordered
                   sealed[:magic] + first + third, sealed[:-1]):
        with pytest.raises(EncryptionError, match="could not be decrypted"):
            cipher.open("x", forged)
    assert cipher.key.hex() not in repr(cipher) and str(list(cipher.key)) not in repr(cipher)
    assert repr(cipher.key) not in repr(cipher)


def test_keygen_where_no_file_can_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("")      # (an unwritable directory would do, but not for root)
    proc = run_cli("keygen", "--out", str(tmp_path / "a-file" / "k.key"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot create the key file" in proc.stderr


# --- faults during saves ----------------------------------------------------------------------------

def test_a_save_clears_only_its_own_leftovers(small_tokenizer, tmp_path):
    """A killed save of ck leaves .ck.saving-XXXXXXXX, which the next save of ck removes; the
    directories of other checkpoints whose names start alike stay."""
    leftover = tmp_path / ".ck.saving-abcd1234"
    others = [tmp_path / ".ck.v2.old", tmp_path / ".ck.v2.saving-abcd1234", tmp_path / ".ck.saving-x.saving-abcd1234"]
    for directory in (leftover, *others):
        directory.mkdir()
    save_checkpoint(tmp_path / "ck", GPT(SMALL), small_tokenizer)
    assert not leftover.exists() and all(directory.is_dir() for directory in others)


def test_a_save_failure_says_what_the_directory_holds(tmp_path):
    target, error = tmp_path / "ck", OSError(errno.EIO, "Input/output error")
    assert "nothing was written" in save_failure(target, error, renamed=False)
    target.mkdir()
    assert f"{target} still holds the previous checkpoint" in save_failure(target, error, renamed=False)
    flushed = save_failure(target, error, renamed=True)         # fsync failed after the rename
    assert "holds the new checkpoint, but it may not have reached the disk" in flushed and "previous" not in flushed
    target.rename(tmp_path / ".ck.old")                        # killed between the two renames
    assert "holds the previous checkpoint" in save_failure(target, error, renamed=False)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(encrypted_run, key_file, shakespeare, tmp_path):
    """RLIMIT_FSIZE in the training process makes every write past 1 MiB fail with EFBIG ("File too
    large"), as a full disk fails writes with ENOSPC: the same OSError, part-way through writing the
    new checkpoint (a user without root cannot mount a small filesystem to fill)."""
    out = tmp_path / "run"
    shutil.copytree(encrypted_run, out)
    before = {name: (out / name / "checksums.json").read_bytes() for name in ("best", "last")}
    limit = 1 << 20

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    overrides = tiny_overrides(shakespeare, out, max_steps=9, eval_interval=3, encrypt="true")
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", "train", "--key-file", str(key_file),
                           *cli_args(overrides)], capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "could not save the checkpoint" in proc.stderr and "File too large" in proc.stderr
    assert "still holds the previous checkpoint" in proc.stderr and "free disk space" in proc.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []   # no staging directory left
    for name, sums in before.items():
        assert (out / name / "checksums.json").read_bytes() == sums
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_FILE_ENV, str(key_file))
        assert load_train_state(out / "last")["step"] == 6
        load_model(out / "best")


def save_forever(target: Path, tokenizer, encrypt: bool, first: int) -> None:
    """Save checkpoints numbered first, first + 1, ... whose every weight is their number, until killed."""
    model = GPT(SMALL)
    number = first
    while True:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(number)
        save_checkpoint(target, model, tokenizer, meta={"number": number}, train_state={"number": number},
                        encrypt=encrypt)
        number += 1


def test_kill_9_during_saves_never_leaves_an_invalid_checkpoint(small_tokenizer, key_file, tmp_path, monkeypatch):
    """50 saving processes killed (SIGKILL) at random moments: the target then always loads, after
    recover_interrupted_save, as one complete checkpoint (weights, meta and train state of one save),
    the one before the kill or a newer one; every other alternate round saves encrypted."""
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    fork = multiprocessing.get_context("fork")
    target, rng = tmp_path / "ck", random.Random(19)
    counts = {"old": 0, "new": 0, "moved aside": 0}
    newest = -1
    for round_ in range(50):
        saver = fork.Process(target=save_forever, args=(target, small_tokenizer, round_ % 2 == 1, newest + 1), daemon=True)
        saver.start()
        time.sleep(rng.uniform(0.0, 0.6))
        saver.kill()
        saver.join()
        try:
            verify(target)
        except CheckpointError as exc:   # killed between moving the old one aside and renaming the new one in
            assert "interrupted" in str(exc) or "does not exist" in str(exc)
            counts["moved aside"] += 1
        recover_interrupted_save(target)
        if not target.exists():          # killed before the first save ever finished
            assert newest == -1
            continue
        model, _, config = load_model(target)
        number = config["meta"]["number"]
        assert load_train_state(target) == {"number": number}
        assert all(bool((p == number).all()) for p in model.parameters()), "weights of another save"
        assert number >= newest
        counts["new" if number > newest else "old"] += 1
        newest = number
    print(f"\n50 kills during saves: {counts}, {newest + 1} saves completed")
    assert counts["new"] > 0
    save_checkpoint(target, GPT(SMALL), small_tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]   # the leftovers of killed saves are cleared


# --- corruption afterwards: a property of the reader ------------------------------------------------

@pytest.fixture(scope="module")
def pristine(small_tokenizer, key_file, tmp_path_factory) -> dict:
    """A small checkpoint in the clear and an encrypted one, with the model both hold."""
    root = tmp_path_factory.mktemp("pristine")
    torch.manual_seed(1)
    model = GPT(SMALL)
    state = {"step": 4, "moments": torch.randn(5)}
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_FILE_ENV, str(key_file))
        for encrypt in (False, True):
            save_checkpoint(root / str(encrypt), model, small_tokenizer, meta={"note": "x"}, train_state=state,
                            encrypt=encrypt)
    return {"root": root, "model": model}


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
CORRUPTIONS = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("delete")),
    st.tuples(st.just("garbage config.json"), st.binary(max_size=64)),
    # edited on purpose, checksums rewritten to match: the parsers behind the checksums
    st.tuples(st.just("edit config.json"),
              st.dictionaries(st.sampled_from(["format_version", "model", "tokenizer", "adapter", "meta"]), JSON,
                              min_size=1, max_size=2)),
)


def corrupt(directory: Path, how: tuple, name: str) -> None:
    kind, path = how[0], directory / name
    if kind == "flip":
        data = bytearray(path.read_bytes())
        data[int(how[1] * len(data))] ^= how[2]
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(path.read_bytes()[:int(how[1] * path.stat().st_size)])
    elif kind == "delete":
        path.unlink()
    elif kind == "garbage config.json":
        (directory / "config.json").write_bytes(how[1])
    else:
        config = json.loads((directory / "config.json").read_bytes()) if not is_encrypted(directory) else {}
        (directory / "config.json").write_text(json.dumps({**config, **how[1]}))
        rewrite_checksums(directory)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(encrypted=st.booleans(), how=CORRUPTIONS, pick=st.integers(0, 100))
def test_a_corrupted_checkpoint_is_a_checkpoint_error_or_the_same_weights(pristine, key_file, monkeypatch,
                                                                          encrypted, how, pick):
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "ck"
        shutil.copytree(pristine["root"] / str(encrypted), directory)
        names = sorted(p.name for p in directory.iterdir())
        corrupt(directory, how, names[pick % len(names)])
        try:
            model, _, _ = load_model(directory)
            state = load_train_state(directory)
        except CheckpointError:
            return
        assert how[0] == "edit config.json", "a corruption the checksums should have caught loaded"
        assert same_weights(model, pristine["model"]) and state["step"] == 4
