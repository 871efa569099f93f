import hashlib
import json

import pytest

from gptstack.tokenizer import ASSETS, _byte_level_decoder, GPT2_EOT, IncrementalDecoder, TokenizerError, load_tokenizer, train_bpe

from conftest import CORPUS, run_cli

SHIPPED_SHA256 = {
    "r50k_base.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
SAMPLES = ["Hello world", "", " leading space", "tabs\tand\nnewlines\n\n", "naïve café — ünïcödé",
           "日本語のテキスト", "emoji 👩‍👩‍👧‍👦 and 🚀", "e\u0301 combining", GPT2_EOT + " typed by a user",
           "12345 67.89e-3", "'s 've 're 'll 'd 'm 't"]


def test_shipped_files_are_the_genuine_ones():
    for name, digest in SHIPPED_SHA256.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest
    assert hashlib.sha256(CORPUS.read_bytes()).hexdigest() == \
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_gpt2_known_ids_and_vocab():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    # the tiktoken ranks agree with OpenAI's encoder.json on every token
    encoder = json.loads((ASSETS / "encoder.json").read_text())
    byte_of = _byte_level_decoder()
    for piece, rank in encoder.items():
        if rank != tok.eot_id:
            assert tok.token_bytes(rank) == bytes(byte_of[ch] for ch in piece)


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_round_trip(text):
    tok = load_tokenizer("gpt2")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert GPT2_EOT not in text or tok.eot_id not in ids


def test_round_trip_whole_corpus_sample():
    tok = load_tokenizer("gpt2")
    text = CORPUS.read_text()[:50_000]
    assert tok.decode(tok.encode(text)) == text


def test_incremental_decoder_never_breaks_characters():
    tok = load_tokenizer("gpt2")
    text = "🚀 naïve 日本 👩‍👩‍👧"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())   # multi-byte characters really are split across tokens
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_trained_bpe_is_usable(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS.read_text()[:200_000])
    tok = train_bpe([corpus], 600, tmp_path / "tokenizer.json")
    assert tok.vocab_size == 600
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    # the same file loads through the generic loader and streams correctly
    again = load_tokenizer(str(tmp_path / "tokenizer.json"))
    ids = again.encode("🚀 Romeo")
    decoder = IncrementalDecoder(again)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "🚀 Romeo"


def test_bad_tokenizer_files_get_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(str(bad))
    with pytest.raises(TokenizerError, match="at least 257"):
        train_bpe([CORPUS], 100, tmp_path / "t.json")


def test_cli_tokenize():
    proc = run_cli("tokenize", "Hello world", check=True)
    assert json.loads(proc.stdout) == [15496, 995]
