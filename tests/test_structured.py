"""Grammar-constrained decoding: even a random-weight model returns JSON that parses and validates."""

import json

import jsonschema
import pytest
import torch

from gptstack.config import ModelConfig
from gptstack.inference.engine import Engine, EngineConfig
from gptstack.inference.sampling import SamplingParams
from gptstack.inference.structured import GrammarError, closed_objects, response_format_grammar
from gptstack.model import GPT
from gptstack.tokenizer import load_tokenizer

# bounded, so that a random model's strings and numbers end within the token budget
PERSON = {"type": "object", "required": ["name", "age", "mood", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "mood": {"enum": ["happy", "sad", "calm"]},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 5}}}}


def json_schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}}


@pytest.fixture(scope="module")
def random_engine():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=256, vocab_size=50257))
    return Engine(model, load_tokenizer("gpt2"), EngineConfig(max_batch_size=8))


def test_a_random_model_writes_documents_that_validate(random_engine):
    grammar = response_format_grammar(json_schema_format(PERSON))
    prompts = [random_engine.tokenizer.encode(p) for p in ("Hello", "Once upon a time", "{", "JSON:")]
    for seed in range(3):
        params = SamplingParams(max_new_tokens=150, temperature=1.0, seed=seed, grammar=grammar)
        for completion in random_engine.generate(prompts, params):
            assert completion.finish_reason == "stop", completion.text
            document = json.loads(completion.text)
            jsonschema.validate(document, closed_objects(PERSON))      # strict: no other properties


def test_without_the_grammar_the_same_model_writes_no_json(random_engine):
    """The test above could fail: unconstrained, this model's text is not JSON."""
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=0)
    for completion in random_engine.generate(["Hello"], params):
        with pytest.raises(json.JSONDecodeError):
            json.loads(completion.text)


def test_json_object_mode_writes_an_object(random_engine):
    grammar = response_format_grammar({"type": "json_object"})
    params = SamplingParams(max_new_tokens=60, temperature=0.7, seed=4, grammar=grammar,
                            logit_bias={20662: 5.0, 92: 5.0})       # '"}' and '}': this model closes sooner
    for completion in random_engine.generate(["Hello", "Give me JSON"], params):
        assert completion.text.startswith("{")
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)


def test_formats_and_schemas_that_cannot_be_used_are_clear_errors():
    assert response_format_grammar({"type": "text"}) is None
    with pytest.raises(GrammarError, match="text, json_object or json_schema"):
        response_format_grammar({"type": "yaml"})
    with pytest.raises(GrammarError, match="schema"):
        response_format_grammar(json_schema_format({"type": "strin"}))
    closed = closed_objects({"type": "object", "properties": {"inner": {"type": "object"}},
                             "additionalProperties": True})
    assert closed["additionalProperties"] is True and closed["properties"]["inner"]["additionalProperties"] is False


def test_a_model_with_more_logits_than_the_tokenizer_has_tokens(random_engine):
    """Models padded past the vocabulary (nanoGPT's 50304) get masks as wide as their logits."""
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=256, vocab_size=50304))
    engine = Engine(model, random_engine.tokenizer, EngineConfig(max_batch_size=2))
    grammar = response_format_grammar(json_schema_format(PERSON))
    for completion in engine.generate(["Hi"], SamplingParams(max_new_tokens=150, seed=0, grammar=grammar)):
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_end_of_text_under_a_grammar_ends_the_request_even_with_ignore_eos(random_engine):
    """A top-level number may go on or end: end-of-text then finishes it, and never enters the text."""
    grammar = response_format_grammar(json_schema_format({"type": "integer"}, strict=False))
    params = SamplingParams(max_new_tokens=40, seed=2, grammar=grammar, ignore_eos=True, logit_bias={50256: 8.0})
    for completion in random_engine.generate(["Count:", "N="], params):
        assert completion.finish_reason == "stop" and isinstance(json.loads(completion.text), int)


def test_strict_closes_schemas_but_not_the_values_in_them():
    closed = closed_objects({"type": "object", "properties": {"kind": {"const": {"type": "object"}}}})
    assert closed["properties"]["kind"] == {"const": {"type": "object"}}
