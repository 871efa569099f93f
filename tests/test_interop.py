import pytest
import torch
from safetensors.torch import load_file

from gptstack.checkpoint import CheckpointError, load_model, save_checkpoint
from gptstack.config import preset
from gptstack.interop.hf import import_hf
from gptstack.model import GPT
from gptstack.tokenizer import ASSETS, load_tokenizer

from conftest import run_cli

transformers = pytest.importorskip("transformers")


def test_export_loads_in_transformers_with_equal_logits(tiny_checkpoint, tmp_path):
    proc = run_cli("export", "--checkpoint", str(tiny_checkpoint), "--format", "hf", "--out", str(tmp_path / "hf"),
                   check=True)
    assert "wrote" in proc.stdout
    ours, tok, _ = load_model(tiny_checkpoint)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.tensor([tok.encode("ROMEO:\nWhat light through yonder window breaks?")])
    with torch.no_grad():
        diff = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    assert diff < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("Hello world")["input_ids"] == [15496, 995]


def test_import_from_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    for name, target in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")):
        (tmp_path / "hf" / name).write_bytes((ASSETS / target).read_bytes())
    run_cli("import", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"), check=True)
    ours, tok, _ = load_model(tmp_path / "ours")
    assert tok.name == "gpt2"
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-4
    # and back: q, k, v fused again into the c_attn they were split from, bit for bit
    run_cli("export", "--checkpoint", str(tmp_path / "ours"), "--format", "hf", "--out", str(tmp_path / "back"),
            check=True)
    back, original = load_file(tmp_path / "back" / "model.safetensors"), theirs.state_dict()
    assert "h.0.attn.c_attn.weight" in back
    assert all(torch.equal(tensor, original["transformer." + key]) for key, tensor in back.items())


@pytest.mark.parametrize("fmt, out, reason", [
    ("hf", "hf", "GPT2LMHeadModel has no locally banded attention"),
    ("gguf", "m.gguf", "no locally banded attention"),
])
def test_banded_models_are_refused_with_the_reason_and_what_to_do(tmp_path, fmt, out, reason):
    cfg = preset("tiny").model
    cfg.attention = "alternating_banded"
    save_checkpoint(tmp_path / "ck", GPT(cfg), load_tokenizer("gpt2"))
    proc = run_cli("export", "--checkpoint", str(tmp_path / "ck"), "--format", fmt, "--out", str(tmp_path / out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert reason in proc.stderr and "gptstack serve" in proc.stderr
    assert not (tmp_path / out).exists()


def test_import_rejects_other_architectures(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="only GPT-2"):
        import_hf(tmp_path / "hf", tmp_path / "out")
