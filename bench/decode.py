"""Single-stream decode speed: gptstack's engine against transformers, CTranslate2 and llama.cpp, same weights.

A model of the chosen preset (default `gpt2`, 124M parameters) is initialised from a fixed seed,
saved as a gptstack checkpoint, exported to the Hugging Face format and converted for CTranslate2,
and exported to GGUF (f32, bf16, q8_0, q4_0) for llama.cpp (llama-cpp-python, built from source).
Each implementation decodes greedily from the same 32-token prompt, exactly N new tokens. Decode
rate = (N - 1) / (time for N tokens - time for 1 token), so prefill is left out on every side.
Each row is compared with llama.cpp at the same precision (fp32 with f32, bf16 with bf16, int8 with
q8_0, int4 with q4_0).

    python bench/decode.py [--preset gpt2] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
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
from gptstack.interop.gguf import export_gguf
from gptstack.interop.hf import export_hf
from gptstack.model import GPT
from gptstack.runtime import tune_allocator
from gptstack.tokenizer import load_tokenizer
from machine import cpu_model   # bench/machine.py


def decode_rates(runners: list[tuple[str, str, object]], new_tokens: int, repeats: int) -> list[tuple[str, str, float]]:
    """Tokens/s of each runner's decode phase: (N - 1) tokens in the time N tokens take beyond 1
    token, each the best of ``repeats``. The runners take turns, round after round, so that a
    machine whose speed drifts over minutes (a shared cloud host) moves every row alike."""
    for _, _, run in runners:
        run(2)   # warm-up
    full = [float("inf")] * len(runners)
    first = [float("inf")] * len(runners)
    for _ in range(repeats):
        for i, (_, _, run) in enumerate(runners):
            full[i] = min(full[i], timed(run, new_tokens))
            first[i] = min(first[i], timed(run, 1))
    return [(impl, label, (new_tokens - 1) / (f - o)) for (impl, label, _), f, o in zip(runners, full, first)]


def timed(run, n: int) -> float:
    start = time.perf_counter()
    run(n)
    return time.perf_counter() - start


def gptstack_runner(checkpoint: Path, prompt: list[int], dtype: torch.dtype, weights: str | None):
    """``weights``: None for the model's own nn.Linear layers, else prepare_weights' format (our kernels)."""
    model, tokenizer, _ = load_model(checkpoint, dtype=dtype)
    if weights:
        model = prepare_weights(model, weights)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=1))

    def run(n: int) -> None:   # generate() runs the engine loop in this (main) thread
        result = engine.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0]
        assert len(result.token_ids) == n
    return run


def transformers_runner(hf_dir: Path, prompt: list[int], dtype: torch.dtype):
    import transformers
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=dtype).eval()
    ids = torch.tensor([prompt])

    def run(n: int) -> None:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(prompt) + n
    return run


def ctranslate2_runner(hf_dir: Path, work: Path, prompt: list[int], compute_type: str):
    import ctranslate2
    import transformers
    out = work / "ct2"
    if not out.exists():
        ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(out), quantization=None)
    generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute_type,
                                      intra_threads=torch.get_num_threads())
    tokens = transformers.AutoTokenizer.from_pretrained(hf_dir).convert_ids_to_tokens(prompt)

    def run(n: int) -> None:
        result = generator.generate_batch([tokens], max_length=n, min_length=n, sampling_topk=1,
                                          include_prompt_in_result=False)
        assert len(result[0].sequences_ids[0]) == n
    return run


def llamacpp_runner(gguf_path: Path, prompt: list[int], new_tokens: int):
    """llama.cpp's own greedy sampler (top-k 1, temperature 0) over our exported GGUF, its cache
    cleared before every run so that each run prefills the prompt as the other peers do."""
    import llama_cpp
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=len(prompt) + new_tokens, n_threads=threads,
                          n_threads_batch=threads, verbose=False, logits_all=False)

    def run(n: int) -> None:
        llm.reset()
        tokens = list(itertools.islice(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0), n))
        assert len(tokens) == n
    return run


GGUF_NAMES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}   # the first word of a row's weights, as GGUF names it


def same_precision(label: str) -> str:
    """The GGUF type of the llama.cpp row a row is compared with ("int8 weights" -> q8_0, "bf16" -> bf16)."""
    word = label.split()[0]
    return GGUF_NAMES.get(word, word)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated: transformers,ctranslate2,llamacpp")
    args = parser.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))
    cfg = preset(args.preset).model
    cfg.embd_pdrop = cfg.attn_pdrop = cfg.resid_pdrop = 0.0
    tokenizer = load_tokenizer("gpt2")
    prompt = tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet "
                              "is the sun. Arise, fair sun, and kill the")[:32]
    runners = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_checkpoint(work / "ck", GPT(cfg), tokenizer)
        export_hf(work / "ck", work / "hf")
        n, r = args.new_tokens, args.repeats
        # with our kernels, bf16 / int8 / int4 weights meet bf16 activations and KV cache (llama.cpp
        # keeps its KV cache in f16); fp32 weights stay fp32 throughout
        for label, dtype, weights in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                      ("fp32 weights, kernels", torch.float32, "fp32"),
                                      ("bf16 weights, kernels", torch.bfloat16, "bf16"),
                                      ("int8 weights", torch.bfloat16, "int8"), ("int4 weights", torch.bfloat16, "int4")):
            runners.append(("gptstack engine", label, gptstack_runner(work / "ck", prompt, dtype, weights)))
        if "transformers" not in skip:
            for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                runners.append(("transformers generate()", label, transformers_runner(work / "hf", prompt, dtype)))
        if "ctranslate2" not in skip:
            for label, compute in (("fp32", "float32"), ("int8 weights", "int8_float32")):
                runners.append(("ctranslate2 Generator", label, ctranslate2_runner(work / "hf", work, prompt, compute)))
        if "llamacpp" not in skip:
            for gguf_type in ("f32", "bf16", "q8_0", "q4_0"):
                path = export_gguf(work / "ck", work / f"model-{gguf_type}.gguf", gguf_type)
                runners.append(("llama.cpp (llama-cpp-python)", gguf_type, llamacpp_runner(path, prompt, n)))
        rows = decode_rates(runners, n, r)

    llamacpp = {label: rate for impl, label, rate in rows if impl.startswith("llama.cpp")}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"cpu: {cpu_model(('avx512_bf16', 'amx_bf16', 'amx_int8'))}")   # the units that decide bf16 speed
    if llamacpp:
        from importlib.metadata import version
        print(f"llama.cpp: llama-cpp-python {version('llama-cpp-python')} (built from source here), "
              f"{torch.get_num_threads()} threads")
    print(f"model: {args.preset} ({GPT(cfg).num_parameters() / 1e6:.1f}M parameters), prompt {len(prompt)} tokens, "
          f"{n} new tokens greedy, batch 1, best of {r} rounds taken in turn\n")
    print("| implementation | weights | decode tokens/s | vs llama.cpp same precision |")
    print("|---|---|---:|---:|")
    for impl, label, rate in rows:
        reference = llamacpp.get(same_precision(label))
        ratio = f"{rate / reference:.2f}x" if reference else "n/a"
        print(f"| {impl} | {label} | {rate:,.1f} | {ratio} |")


if __name__ == "__main__":
    main()
