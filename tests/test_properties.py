"""Properties that must hold for any input, checked by Hypothesis on generated ones: the tokenizers
give back every text and every byte string they are handed, GPT-2's BPE agrees with a second,
independent implementation of it, and a configuration (file or command line) either loads or is
refused with a ConfigError, never another exception."""

from __future__ import annotations

import json
import math
import string
from dataclasses import fields
from typing import get_type_hints

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from gptstack.cli import parse_overrides
from gptstack.config import ALIASES, ConfigError, ModelConfig, TrainConfig, build_train_config
from gptstack.tokenizer import ASSETS, IncrementalDecoder, load_tokenizer, train_bpe

from conftest import CORPUS

# texts that stress a byte-level BPE: any code point but lone surrogates (not encodable), with
# control characters, combining marks and astral characters drawn often
awkward_text = st.text(st.one_of(
    st.characters(exclude_categories=["Cs"]),
    st.sampled_from("\x00\t\n\r\x0b\x1b\x7f\u0301\u0308\u200d\ufe0f\ufeff\ufffd \u00a0\u2028"),
    st.characters(min_codepoint=0x10000, exclude_categories=["Cs"]),
)) | st.text()
cases = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def reference_bpe():
    """GPT-2's BPE from OpenAI's own files (encoder.json, vocab.bpe), run by Hugging Face's
    tokenizers: another implementation of the same algorithm than tiktoken's, which ours uses."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    tok = Tokenizer(BPE.from_file(str(ASSETS / "encoder.json"), str(ASSETS / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    corpus.write_text(CORPUS.read_text()[:50_000])
    return train_bpe([corpus], 400, corpus.with_name("tokenizer.json"))


@cases
@given(text=awkward_text)
def test_any_text_round_trips(gpt2, trained, text):
    for tok in (gpt2, trained):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        decoder = IncrementalDecoder(tok)       # streamed, a token at a time, the same text
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text
    # byte-level: the tokens' bytes are the text's UTF-8 bytes, token by token
    assert b"".join(gpt2.token_bytes(i) for i in gpt2.encode(text)) == text.encode()


@cases
@given(text=awkward_text)
def test_gpt2_agrees_with_an_independent_bpe(gpt2, reference_bpe, text):
    assert gpt2.encode(text) == reference_bpe.encode(text, add_special_tokens=False).ids


@cases
@given(data=st.binary(max_size=64))
def test_any_bytes_round_trip_through_byte_tokens(gpt2, data):
    """Any byte string, valid UTF-8 or not, is a sequence of GPT-2's 256 byte tokens; decoding gives
    the bytes back, and as text the replacement a UTF-8 decoder makes, whether whole or streamed."""
    ids = [gpt2._enc.encode_single_token(bytes([b])) for b in data]
    assert b"".join(gpt2.token_bytes(i) for i in ids) == data
    assert gpt2.decode(ids) == data.decode("utf-8", "replace")
    decoder = IncrementalDecoder(gpt2)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == data.decode("utf-8", "replace")


@cases
@given(ids=st.lists(st.integers(0, 50255), max_size=40))
def test_any_token_sequence_streams_as_it_decodes(gpt2, ids):
    """A model may emit any tokens, splitting characters anywhere: streaming never differs from decoding all at once."""
    decoder = IncrementalDecoder(gpt2)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == gpt2.decode(ids)


# --- configuration ----------------------------------------------------------------------------
KEYS = sorted({f.name for f in fields(TrainConfig)} | set(ALIASES)
              | {f"model.{f.name}" for f in fields(ModelConfig)})
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) \
    | st.sampled_from(["gpt3-small", "tiny", "1e3", "inf", "-1", "0.5", "true", "none", "cosine", "gelu", "bf16"])
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from([f.name for f in fields(ModelConfig)]) | st.text(max_size=6), inner, max_size=3), max_leaves=6)
documents = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=6)
yaml_documents = st.dictionaries(st.sampled_from(KEYS) | st.integers() | st.none() | st.booleans(), values, max_size=6)


def assert_loads_or_says_why(load) -> None:
    """``load()`` gives a valid config, every field of its declared type, or raises ConfigError."""
    try:
        cfg = load()
    except ConfigError as exc:
        assert str(exc)
        return
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        expected = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict}.get(
            getattr(hints[f.name], "__name__", ""), object)
        assert value is None or isinstance(value, expected), (f.name, value)
        assert not isinstance(value, float) or math.isfinite(value), (f.name, value)
    assert cfg.model_config().validate()


@cases
@given(document=documents)
def test_any_json_config_loads_or_is_refused_clearly(tmp_path, document):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data": "data/train", **document}))
    assert_loads_or_says_why(lambda: build_train_config(path))


@cases
@given(document=yaml_documents | st.text(max_size=40).map(lambda t: {"__raw__": t}))
def test_any_yaml_config_loads_or_is_refused_clearly(tmp_path, document):
    path = tmp_path / "config.yaml"
    path.write_text(document["__raw__"] if "__raw__" in document else yaml.safe_dump({"data": "d", **document}))
    assert_loads_or_says_why(lambda: build_train_config(path))


numbers_as_typed = st.sampled_from(["1e400", "-1e400", "nan", "inf", "-0", "1.5", "0x10", "1_000", "", " ", "None",
                                    "yes", "[1]", "{}"]) | st.integers().map(str) | st.floats().map(str)
flags = st.sampled_from([f"--{k}" for k in KEYS]) | st.sampled_from(["--", "-x", "--a=b", "--model.n_layer=x"])


@cases
@given(tokens=st.lists(st.tuples(flags, numbers_as_typed | st.text(string.printable, max_size=10)), max_size=6)
       .map(lambda pairs: [t for pair in pairs for t in pair]))
def test_any_command_line_overrides_load_or_are_refused_clearly(tokens):
    assert_loads_or_says_why(lambda: build_train_config(overrides={"data": "d", **parse_overrides(tokens)}))
