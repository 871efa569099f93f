import json

import numpy as np
import pytest

from gptstack.data.loader import BatchSampler, TokenDataset, eval_batches
from gptstack.data.prepare import DataError, prepare, safe_chunks
from gptstack.tokenizer import load_tokenizer

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
    text = CORPUS.read_text()[:300_000] + "\n\n\n  trailing   \n"
    pieces = safe_chunks(text, 5000)
    assert len(pieces) > 20 and "".join(pieces) == text
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
