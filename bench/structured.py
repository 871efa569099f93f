"""What grammar-constrained decoding costs (`response_format`, and tool calls: a named function, or
`auto` between text and calls): decode tokens/s with and without a grammar, at 1 and 8 concurrent
requests, on the engine in this process.

The model is GPT-2 124M-shaped from a fixed seed (random weights: the grammar, not the model,
decides the output's shape). Each row decodes N new tokens per request with ignore_eos, so both
sides produce the same number of tokens; a constrained request that completes its JSON early stops
there, so its rate counts the tokens it made in the time it took.

    python bench/structured.py [--weights bf16] [--new-tokens 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from gptstack.checkpoint import load_model, save_checkpoint
from gptstack.config import preset
from gptstack.inference.engine import Engine, EngineConfig
from gptstack.inference.quantize import prepare_weights
from gptstack.inference.sampling import SamplingParams
from gptstack.inference.structured import response_format_grammar, tool_call_grammar
from gptstack.model import GPT
from gptstack.runtime import tune_allocator
from gptstack.tokenizer import load_tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}}, "required": ["name", "age", "tags", "address"]}
FUNCTIONS = [{"name": "add_person", "parameters": SCHEMA},
             {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                    "required": ["city"]}}]
GRAMMARS = {
    "none (text)": lambda: None,
    "response_format json_object": lambda: response_format_grammar({"type": "json_object"}),
    "response_format json_schema (strict)": lambda: response_format_grammar(
        {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}),
    "tools, tool_choice named": lambda: tool_call_grammar(FUNCTIONS, "function", "add_person"),
    "tools, tool_choice required (2 tools, parallel)": lambda: tool_call_grammar(FUNCTIONS, "required"),
    "tools, tool_choice auto": lambda: tool_call_grammar(FUNCTIONS, "auto"),
}


def rate(engine: Engine, grammar: str | None, batch: int, new_tokens: int) -> float:
    """Generated tokens per second over ``batch`` concurrent requests (prefill included on both sides)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.8, seed=0, ignore_eos=True, grammar=grammar)
    start = time.perf_counter()
    results = engine.generate([[464, 3290, 318]] * batch, params)
    return sum(len(r.token_ids) for r in results) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="bf16", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ck", GPT(preset("gpt2").model), load_tokenizer("gpt2"))
        dtype = torch.float32 if args.weights == "fp32" else torch.bfloat16
        model, tokenizer, _ = load_model(Path(tmp) / "ck", dtype=dtype)
    engine = Engine(prepare_weights(model, args.weights), tokenizer, EngineConfig(max_batch_size=8))
    rows = []
    for label, make_grammar in GRAMMARS.items():
        grammar = make_grammar()
        rate(engine, grammar, 1, 4)     # warm-up (and the grammar's first compile)
        rows.append((label, [max(rate(engine, grammar, batch, args.new_tokens) for _ in range(args.repeats))
                             for batch in (1, 8)]))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; GPT-2 124M {args.weights} weights, {args.new_tokens} new tokens, best of {args.repeats}\n")
    print("| constraint | tokens/s, 1 request | vs text | tokens/s, 8 requests | vs text |")
    print("|---|---:|---:|---:|---:|")
    base = rows[0][1]
    for label, rates in rows:
        print(f"| {label} | {rates[0]:,.1f} | {rates[0] / base[0]:.2f}x | {rates[1]:,.1f} | {rates[1] / base[1]:.2f}x |")


if __name__ == "__main__":
    main()
