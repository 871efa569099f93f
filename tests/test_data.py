import fcntl
import json
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gptstack.data import prepare as prepare_module
from gptstack.data.loader import BatchSampler, TokenDataset, eval_batches
from gptstack.data.prepare import MANIFEST, PROGRESS, DataError, corpus_files, prepare, safe_pieces
from gptstack.tokenizer import load_tokenizer, train_bpe

from conftest import CORPUS, run_cli


def test_shakespeare_split_matches_known_counts(shakespeare):
    manifest = json.loads((shakespeare / "manifest.json").read_text())
    # 301,966 train and 36,059 val GPT-2 tokens for a 90/10 character split, + one EOT each
    assert manifest["splits"]["train"]["tokens"] == 301_966 + 1
    assert manifest["splits"]["val"]["tokens"] == 36_059 + 1
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 50257
    train = TokenDataset(shakespeare, "train", verify=True)
    tok = load_tokenizer("gpt2")
    assert tok.decode(train.shards[0][:6].tolist()) == CORPUS.read_text()[:len(tok.decode(train.shards[0][:6].tolist()))]


def test_chunked_tokenization_equals_whole_text():
    tok = load_tokenizer("gpt2")
    corpus = CORPUS.read_text()
    # LF and CRLF lines, non-ASCII, whitespace runs; read in blocks of any size, even splitting "\r\n"
    text = corpus[:150_000] + corpus[150_000:300_000].replace("\n", "\r\n") + "\n\n\n  trailing   \n" + "é 😀\r\n" * 900
    cuts = sorted(random.Random(0).sample(range(1, len(text)), 400))
    blocks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    pieces = list(safe_pieces(blocks, 5000))
    assert len(pieces) > 40 and "".join(pieces) == text
    assert any(p.startswith("\r\n") for p in pieces)
    assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(text)


def test_folders_and_jsonl_and_shards(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first document " * 50)
    (src / "sub" / "b.txt").write_text("second document " * 50)
    (src / "c.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 20}) for i in range(20)))
    manifest = prepare([src], tmp_path / "out", val_fraction=0.2, shard_tokens=300, progress=False)
    assert manifest["documents"] == 22
    assert len(manifest["splits"]["train"]["shards"]) > 1
    for split in ("train", "val"):
        ds = TokenDataset(tmp_path / "out", split, verify=True)
        assert ds.num_tokens == manifest["splits"][split]["tokens"] > 0
    eot = load_tokenizer("gpt2").eot_id
    all_tokens = np.concatenate([TokenDataset(tmp_path / "out", s).shards[i] for s in ("train", "val")
                                 for i in range(len(manifest["splits"][s]["shards"]))])
    assert int((all_tokens == eot).sum()) == 22     # one separator per document


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\x02binary", "looks binary"),
    (b"caf\xe9 au lait", "not valid utf-8"),
    (b"ok " * 100_000 + b"caf\xe9", "bad byte 0xe9 at offset 300003"),     # found in a later block
    (b"   \n\n  ", "holds no text"),
])
def test_bad_corpus_gets_clear_errors(tmp_path, content, message):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare([path], tmp_path / "out", progress=False)


def test_bad_jsonl_and_missing_input(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match="line 2 has no string field 'text'"):
        prepare([path], tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare([tmp_path / "nope"], tmp_path / "out2", progress=False)


def test_prepare_cli_errors_and_keeps_existing_data(tmp_path, shakespeare):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    proc = run_cli("prepare", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "looks binary" in proc.stderr and "Traceback" not in proc.stderr
    before = (shakespeare / "manifest.json").read_text()
    proc = run_cli("prepare", str(CORPUS), "--out", str(shakespeare))
    assert proc.returncode == 2 and "already holds a prepared dataset" in proc.stderr
    assert (shakespeare / "manifest.json").read_text() == before


def test_latin1_with_encoding_option(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café au lait, ".encode("latin-1") * 40)
    manifest = prepare([path], tmp_path / "out", encoding="latin-1", val_fraction=0.0, progress=False)
    ds = TokenDataset(tmp_path / "out", "train")
    assert load_tokenizer("gpt2").decode(ds.shards[0][:-1].tolist()).startswith("café au lait")
    assert manifest["splits"]["val"]["tokens"] == 0


def test_sampler_is_deterministic_resumable_and_rank_sharded(shakespeare):
    ds = TokenDataset(shakespeare, "train")
    single = BatchSampler(ds, 32, 8, seed=3)
    again = BatchSampler(ds, 32, 8, seed=3)
    x1, y1 = single.micro_batch(step=5, micro=1, n_micro=2)
    x2, y2 = again.micro_batch(step=5, micro=1, n_micro=2)   # a "resumed" sampler: same step, same rows
    assert (x1 == x2).all() and (y1[:, :-1] == x1[:, 1:]).all()
    assert not (single.micro_batch(6, 1, 2)[0] == x1).all()
    # two ranks with half the batch see exactly the single process's rows, without overlap
    ranks = [BatchSampler(ds, 32, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for micro in range(2):
        full, _ = single.micro_batch(5, micro, 2)
        parts = []
        for m in range(2):
            for r in ranks:
                parts.append(r.micro_batch(5, m, 2)[0])
        stacked = np.concatenate([p.numpy() for p in parts])
        assert (stacked[micro * 8:(micro + 1) * 8] == full.numpy()).all()


def test_eval_batches_are_fixed_and_split_across_ranks(shakespeare):
    ds = TokenDataset(shakespeare, "val")
    first = [x for x, _ in eval_batches(ds, 32, 4, 6)]
    second = [x for x, _ in eval_batches(ds, 32, 4, 6)]
    assert all((a == b).all() for a, b in zip(first, second)) and len(first) == 6
    by_rank = [list(eval_batches(ds, 32, 4, 6, rank=r, world_size=2)) for r in range(2)]
    assert len(by_rank[0]) + len(by_rank[1]) == 6
    assert (by_rank[1][0][0] == first[1]).all()


def test_too_small_split_is_explained(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("a few words only")
    prepare([path], tmp_path / "out", val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="fewer than one window"):
        BatchSampler(TokenDataset(tmp_path / "out", "train"), 64, 2, seed=0)


def test_option_errors_are_explained(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("one document\n")
    for options, message in [({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
                             ({"shard_tokens": 0}, "shard_tokens must be at least 1"),
                             ({"workers": 0}, "workers must be at least 1")]:
        with pytest.raises(DataError, match=message):
            prepare([path], tmp_path / "out", progress=False, **options)
    with pytest.raises(DataError, match="is a file; choose a folder"):
        prepare([path], path, progress=False)
    (tmp_path / "two.txt").write_text("another document\n")
    with pytest.raises(DataError, match="training split is empty: all 2 documents would go to val"):
        prepare([path, tmp_path / "two.txt"], tmp_path / "out", val_fraction=0.9, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]     # refused before any checkpoint


def test_links_to_folders_are_not_followed_and_an_unreadable_folder_is_explained(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("a document\n")
    (src / "loop").symlink_to(src)                          # rglob did not follow it either
    (src / "b.txt").symlink_to(src / "sub" / "a.txt")      # a link to a file is read, as rglob listed it
    assert [p.relative_to(src) for p in corpus_files([src])] == [Path("b.txt"), Path("sub/a.txt")]

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(prepare_module.os, "scandir", unreadable)
    with pytest.raises(DataError, match="cannot list the folder .*src: Permission denied"):
        prepare([src], tmp_path / "out", progress=False)


def test_a_worker_that_cannot_start_is_an_error_not_a_hang(tmp_path):
    batches = iter([[prepare_module.Piece("train", "some text", True, None)]])
    with pytest.raises(DataError, match="worker process failed to start"):
        list(prepare_module._encoded_in_pool(batches, {"kind": "hf", "path": "missing.json"}, tmp_path,
                                             np.dtype(np.uint16), workers=2))


# --- corpus scale: parallel, bounded memory, resumable --------------------------------------------

def write_corpus(folder: Path, copies: int, chars: int | None = None) -> Path:
    """A folder of ``copies`` Shakespeares (their first ``chars`` characters) with multi-byte
    characters (so bytes and characters differ), a blank file, and a JSONL file with one record per
    paragraph."""
    text = CORPUS.read_text()[:chars].replace("\n\n", "\n\nçà 😀\n\n")
    (folder / "sub").mkdir(parents=True)
    for i in range(copies):
        (folder / ("sub" if i % 2 else "") / f"part{i}.txt").write_text(f"copy {i}\n{text}", encoding="utf-8")
    (folder / "blank.txt").write_text("  \n\n")
    (folder / "records.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in text.split("\n\n")))
    return folder


def dataset_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_workers_do_not_change_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 8192)      # many batches for the pool to share
    corpus = write_corpus(tmp_path / "corpus", copies=2)
    for workers in (1, 2):
        prepare([corpus], tmp_path / f"w{workers}", val_fraction=0.2, shard_tokens=50_000, workers=workers, progress=False)
    assert dataset_files(tmp_path / "w1") == dataset_files(tmp_path / "w2")
    assert len(json.loads((tmp_path / "w1" / MANIFEST).read_text())["splits"]["train"]["shards"]) > 4


def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path, monkeypatch):
    """Python's peak allocation while preparing a corpus several times larger than the bound (the
    whole-file reading this replaced held all of it, several times over)."""
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 4096)      # a small bound, so that a small corpus exceeds it
    corpus = write_corpus(tmp_path / "corpus", copies=2)
    corpus_bytes = sum(path.stat().st_size for path in corpus.rglob("*") if path.is_file())
    load_tokenizer("gpt2")          # its tables are loaded once per process, whatever the corpus
    tracemalloc.start()
    try:
        prepare([corpus], tmp_path / "out", shard_tokens=200_000, workers=1, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = 400_000
    assert corpus_bytes > 8 * bound and peak < bound, (corpus_bytes, peak)


class Killed(Exception):
    pass


def kill_after_checkpoints(monkeypatch, count: int | None) -> list:
    """prepare() stops dead right after its ``count``-th checkpoint with finished shards (never if
    None); returns the list of the checkpoints written."""
    real_write, checkpoints = prepare_module.write_text_atomic, []

    def write(path, text):
        real_write(path, text)
        if Path(path).name == PROGRESS and json.loads(text)["cursor"]["chars"]:    # not the scan's
            checkpoints.append(path)
            if len(checkpoints) == count:
                raise Killed
    monkeypatch.setattr(prepare_module, "write_text_atomic", write)
    return checkpoints


@pytest.mark.parametrize("corpus_kind", ["one document", "folder"])
def test_an_interrupted_run_goes_on_to_exactly_the_uninterrupted_result(tmp_path, monkeypatch, corpus_kind):
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 1 << 13)    # a checkpoint at every shard
    corpus = CORPUS if corpus_kind == "one document" else write_corpus(tmp_path / "corpus", copies=2, chars=150_000)
    options = {"shard_tokens": 20_000 if corpus_kind == "one document" else 8_000, "progress": False}
    with monkeypatch.context() as patch:
        checkpoints = kill_after_checkpoints(patch, None)
        prepare([corpus], tmp_path / "reference", **options)
    expected = dataset_files(tmp_path / "reference")
    assert len(checkpoints) > 10
    for count in (1, len(checkpoints) // 2, len(checkpoints) - 1, len(checkpoints)):
        out = tmp_path / f"killed{count}"
        with monkeypatch.context() as patch:
            kill_after_checkpoints(patch, count)
            with pytest.raises(Killed):
                prepare([corpus], out, **options)
        # what a killed process may leave beyond its checkpoint: more tokens in open shards, a next shard
        for shards in json.loads((out / PROGRESS).read_text())["splits"].values():
            for shard in shards:
                if "sha256" not in shard:
                    with open(out / shard["file"], "ab") as f:
                        f.write(b"\x07" * 999)
        (out / "val_00042.bin").write_bytes(b"written after the checkpoint")
        first_shard = out / "train_00000.bin"
        written_at = first_shard.stat().st_mtime_ns
        prepare([corpus], out, **options)
        assert dataset_files(out) == expected, count
        assert first_shard.stat().st_mtime_ns == written_at       # finished shards are not redone


def test_a_run_killed_right_after_the_end_of_its_one_document_adds_nothing_more(tmp_path, monkeypatch, shakespeare):
    val_tokens = json.loads((shakespeare / MANIFEST).read_text())["splits"]["val"]["tokens"]
    options = {"shard_tokens": val_tokens, "progress": False}      # val's one shard fills with the last piece
    with monkeypatch.context() as patch:
        checkpoints = kill_after_checkpoints(patch, None)
        prepare([CORPUS], tmp_path / "reference", **options)
    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        kill_after_checkpoints(patch, len(checkpoints))
        with pytest.raises(Killed):
            prepare([CORPUS], out, **options)
    state = json.loads((out / PROGRESS).read_text())
    assert state["cursor"]["chars"] == state["scan"]["characters"]     # checkpointed at the end of the text
    prepare([CORPUS], out, **options)
    assert dataset_files(out) == dataset_files(tmp_path / "reference")


def test_an_output_folder_inside_the_input_folder_is_not_read_as_text(tmp_path, monkeypatch):
    """`prepare corpus/ --out corpus/tokens`: the checkpoint written there is neither tokenized nor
    taken for a changed input when a killed run goes on."""
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 1 << 13)
    corpus = write_corpus(tmp_path / "corpus", copies=2, chars=100_000)
    options = {"shard_tokens": 8_000, "progress": False}
    prepare([corpus], tmp_path / "reference", **options)
    out = corpus / "tokens"
    with monkeypatch.context() as patch:
        kill_after_checkpoints(patch, 2)
        with pytest.raises(Killed):
            prepare([corpus], out, **options)
    prepare([corpus], out, **options)
    assert dataset_files(out) == dataset_files(tmp_path / "reference")


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_writes(tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text(CORPUS.read_text()[:100_000])
    out, real_write, refused = tmp_path / "out", prepare_module.write_text_atomic, []

    def write(path, content):       # the second run starts while the first one is writing
        real_write(path, content)
        if not refused:
            refused.append(path)
            with pytest.raises(DataError, match=f"another `gptstack prepare` is writing {out}; wait for it"):
                prepare([text], out, progress=False)
    monkeypatch.setattr(prepare_module, "write_text_atomic", write)
    prepare([text], out, progress=False)
    assert refused and TokenDataset(out, "train", verify=True).num_tokens > 0
    with open(out / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)        # released when the run ended


def test_an_unfinished_run_refuses_other_input_or_options(tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text(CORPUS.read_text()[:200_000])
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        kill_after_checkpoints(patch, 1)
        with pytest.raises(Killed):
            prepare([text], out, shard_tokens=5_000, progress=False)
    train_bpe([text], 300, tmp_path / "tokenizer.json")
    for changes, differ in [({"tokenizer": str(tmp_path / "tokenizer.json")}, "tokenizer"), ({"seed": 7}, "seed")]:
        with pytest.raises(DataError, match=f"unfinished preparation .*{differ} differ.*remove .* to start over"):
            prepare([text], out, shard_tokens=5_000, progress=False, **changes)
    with open(text, "a") as f:
        f.write("an edit\n")
    with pytest.raises(DataError, match=r"input files \(names, sizes or modification times\) differ"):
        prepare([text], out, shard_tokens=5_000, progress=False)


def wait_for_a_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``out`` records a finished shard (the progress file is replaced atomically)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = out / PROGRESS
        if progress.exists() and any("sha256" in shard for shards in json.loads(progress.read_text())["splits"].values()
                                     for shard in shards):
            return
        assert proc.poll() is None, f"prepare ended before its first checkpoint:\n{proc.stderr.read()}"
        time.sleep(0.01)
    raise AssertionError("no checkpoint in time")


@pytest.mark.slow
def test_kill_9_then_the_same_command_ends_as_an_uninterrupted_run(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", copies=12)      # ~15 MB: seconds of tokenizing on one core
    out = tmp_path / "out"
    command = ["prepare", str(corpus), "--out", str(out), "--shard-tokens", "100000", "--val-fraction", "0.05", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "gptstack.cli", *command, "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_a_checkpoint(out, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / MANIFEST).exists(), "the run finished before it was killed; make the corpus larger"
    first_shard = out / "train_00000.bin"
    written_at = first_shard.stat().st_mtime_ns

    run_cli(*command, "--workers", "2", check=True)         # goes on, with another number of workers

    prepare([str(corpus)], tmp_path / "reference", shard_tokens=100_000, val_fraction=0.05, progress=False)
    assert dataset_files(out) == dataset_files(tmp_path / "reference")
    assert first_shard.stat().st_mtime_ns == written_at
