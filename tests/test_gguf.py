"""GGUF export and import, with llama.cpp itself (llama-cpp-python) as the judge of the export."""

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptstack.checkpoint import CheckpointError, load_model, save_checkpoint
from gptstack.config import preset
from gptstack.inference.engine import Engine
from gptstack.inference.sampling import SamplingParams
from gptstack.interop.gguf import export_gguf, import_gguf
from gptstack.model import GPT
from gptstack.tokenizer import load_tokenizer, train_bpe

from conftest import CORPUS, run_cli

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'gptstack[test]')")
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"
TEXTS = ["Hello world", "  two  spaces and trailing   ", "new\nlines\n\n\ttabs\r\n", "don't we'll they're I've",
         "naïve café, 日本語, emoji 🤖 and accents àéîõü", "numbers 12345 and 3.14159", "<|endoftext|> typed as text"]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'gptstack[test]')")


@pytest.fixture(scope="module")
def f32_gguf(tiny_checkpoint, tmp_path_factory):
    return export_gguf(tiny_checkpoint, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", weight_type="f32")


def load_llama(llama_cpp, path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=False)


def last_logits(llama_cpp, llm) -> np.ndarray:
    """The logits of the last token llama.cpp evaluated (Llama.scores holds them only with logits_all)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def test_llama_cpp_decodes_greedily_as_gptstack(tiny_checkpoint, f32_gguf, llama_cpp):
    model, tokenizer, _ = load_model(tiny_checkpoint)
    prompt = tokenizer.encode(PROMPT)
    ours = Engine(model, tokenizer).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True))[0].token_ids
    # the comparison means something only where the choice is clear: llama.cpp's f32 logits differ
    # from ours by ~1e-4 (other summation orders), so every step's top two must be further apart
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours]))[0][0, len(prompt) - 1:-1]
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2, "pick a prompt whose greedy path has clear choices"
    assert logits.argmax(-1).tolist() == ours

    llm = load_llama(llama_cpp, f32_gguf)
    llm.reset()
    theirs = list(itertools.islice(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0), 32))
    assert theirs == ours
    llm.reset()
    llm.eval(prompt)
    assert np.abs(last_logits(llama_cpp, llm) - logits[0].numpy()).max() < 1e-3


def test_the_tokenizer_in_the_file_splits_text_as_ours(f32_gguf, llama_cpp):
    tokenizer = load_tokenizer("gpt2")
    llm = load_llama(llama_cpp, f32_gguf)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
    assert llm.token_eos() == llm.token_bos() == tokenizer.eot_id
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"


def test_a_trained_byte_level_bpe_travels_in_the_file(tmp_path, llama_cpp):
    (tmp_path / "corpus.txt").write_text(CORPUS.read_text(encoding="utf-8")[:50_000] + "\ncafé 日本語 🤖\n")
    tokenizer = train_bpe([tmp_path / "corpus.txt"], 400, tmp_path / "tokenizer.json")
    cfg = preset("tiny").model
    cfg.vocab_size = 448   # padded beyond the tokenizer's 400: the file gets unused placeholders
    save_checkpoint(tmp_path / "ck", GPT(cfg), tokenizer)
    path = export_gguf(tmp_path / "ck", tmp_path / "bpe.gguf", weight_type="f32")
    llm = load_llama(llama_cpp, path)
    for text in TEXTS:   # the tokenizers library matches added tokens even in user text: llama.cpp's special=True
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), text
    import_gguf(path, tmp_path / "back")
    _, back, _ = load_model(tmp_path / "back")
    assert back.eot_id == tokenizer.eot_id
    assert all(back.encode(text) == tokenizer.encode(text) for text in TEXTS)


def test_export_then_import_keeps_the_weights(tiny_checkpoint, f32_gguf, tmp_path):
    original = load_file(tiny_checkpoint / "model.safetensors")
    run_cli("import", str(f32_gguf), "--out", str(tmp_path / "f32"), check=True)
    back = load_file(tmp_path / "f32" / "model.safetensors")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[name], original[name]) for name in original)
    _, tokenizer, _ = load_model(tmp_path / "f32")
    assert tokenizer.name == "gpt2"

    run_cli("export", "--checkpoint", str(tiny_checkpoint), "--format", "gguf", "--gguf-type", "q8_0",
            "--out", str(tmp_path / "q8.gguf"), check=True)
    run_cli("import", str(tmp_path / "q8.gguf"), "--out", str(tmp_path / "q8"), check=True)
    back = load_file(tmp_path / "q8" / "model.safetensors")
    for name, tensor in original.items():
        # q8_0: blocks of 32 with a step of max|x| / 127 stored in f16: at most half a step off, plus
        # 127 steps times the step's f16 rounding (2^-11); norms, biases and positions stay f32
        bound = tensor.abs().max() / 127 * (0.5 + 127 * 2 ** -11) if tensor.dim() == 2 and "wpe" not in name else 0
        assert (back[name] - tensor).abs().max() <= bound, name


def test_bad_input_is_a_clear_error_without_a_traceback(tiny_checkpoint, tmp_path):
    missing = run_cli("export", "--checkpoint", str(tmp_path / "nothing"), "--format", "gguf", "--out",
                      str(tmp_path / "m.gguf"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    unknown = run_cli("export", "--checkpoint", str(tiny_checkpoint), "--format", "gguf", "--gguf-type", "q5_k",
                      "--out", str(tmp_path / "m.gguf"))
    assert unknown.returncode == 2 and "invalid choice: 'q5_k'" in unknown.stderr and "q4_0" in unknown.stderr
    (tmp_path / "notes.gguf").write_text("not a model")
    garbage = run_cli("import", str(tmp_path / "notes.gguf"), "--out", str(tmp_path / "out"))
    assert garbage.returncode == 2 and "not a readable GGUF file" in garbage.stderr
    assert "Traceback" not in garbage.stderr


def test_import_refuses_other_architectures(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="holds a 'llama' model; only llama.cpp's gpt2 architecture"):
        import_gguf(tmp_path / "llama.gguf", tmp_path / "out")
