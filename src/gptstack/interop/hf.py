"""The Hugging Face GPT-2 format, in and out.

A Hugging Face GPT-2 directory is ``config.json`` (GPT2Config) + ``model.safetensors`` + tokenizer
files. Its weights are ours under other names, with two twists: HF's GPT-2 uses ``Conv1D`` layers
that store matmul weights as [in, out], the transpose of ``nn.Linear``, and one ``c_attn`` for q, k
and v, which export fuses (rows q; k; v) and import hands to the model fused, as an old gptstack
checkpoint holds them (the model splits them on load). transformers itself is not needed to read or
write the format; tests use it to prove the logits agree.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, load_model, save_checkpoint
from ..config import ModelConfig
from ..model import GPT, QKV_PROJECTIONS
from ..tokenizer import ASSETS, GPT2Tokenizer, HFTokenizer, Tokenizer, load_tokenizer

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu"}
FROM_HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "gelu": "gelu_exact"}
log = logging.getLogger("gptstack.interop")


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for layer in range(model.config.n_layer):
        attn = f"transformer.h.{layer}.attn."
        for kind in ("weight", "bias"):
            state[f"{attn}c_attn.{kind}"] = torch.cat([state.pop(f"{attn}{name}.{kind}") for name in QKV_PROJECTIONS])
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        key = name.removeprefix("transformer.")
        out[key] = (tensor.t() if key.endswith(CONV1D_SUFFIXES) else tensor).detach().contiguous().cpu()
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("transformer.")
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue   # tied head; causal-mask buffers of old transformers versions
        out["transformer." + key] = tensor.t() if key.endswith(CONV1D_SUFFIXES) else tensor
    return out


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": HF_ACTIVATIONS[cfg.activation],
        "resid_pdrop": cfg.resid_pdrop, "embd_pdrop": cfg.embd_pdrop, "attn_pdrop": cfg.attn_pdrop,
        "summary_first_dropout": cfg.clf_pdrop, "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a gptstack checkpoint as a directory that ``GPT2LMHeadModel.from_pretrained`` loads.
    LoRA adapters are merged in; a classification head is left out (GPT-2's own has no bias and
    reads another token), so the export is the backbone as a language model."""
    model, tokenizer, config = load_model(checkpoint_dir)
    if config.get("head"):
        log.warning("%s has a %s head; only its language-model backbone is exported", checkpoint_dir,
                    config["head"].get("kind"))
    cfg = model.config
    if cfg.attention != "dense":
        raise CheckpointError(
            f"{checkpoint_dir} cannot be exported to Hugging Face: its model uses {cfg.attention} attention (odd "
            f"layers see only the last {cfg.band_width} positions), and GPT2LMHeadModel has no locally banded "
            "attention, so the exported model would compute different outputs. Serve it with gptstack instead "
            "(`gptstack serve` / `gptstack generate`) and keep the gptstack checkpoint as its format")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tokenizer), indent=2))
    if isinstance(tokenizer, GPT2Tokenizer):
        shutil.copyfile(ASSETS / "encoder.json", out / "vocab.json")
        shutil.copyfile(ASSETS / "vocab.bpe", out / "merges.txt")
        tok_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.block_size,
                      "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                      "add_prefix_space": False}
    else:
        shutil.copyfile(tokenizer.path, out / "tokenizer.json")
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                      "eos_token": tokenizer.eot_token, "bos_token": tokenizer.eot_token}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": tokenizer.eot_id,
                                                            "eos_token_id": tokenizer.eot_id}, indent=2))
    return out


def read_hf(hf_dir: str | Path) -> tuple[GPT, Tokenizer]:
    """A Hugging Face GPT-2 directory as our model and tokenizer (weights never unpickled)."""
    hf = Path(hf_dir)
    config_path = hf / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{hf} has no config.json; pass a Hugging Face GPT-2 model directory")
    hf_cfg = json.loads(config_path.read_text())
    if hf_cfg.get("model_type") != "gpt2":
        raise CheckpointError(f"{hf} holds a {hf_cfg.get('model_type')!r} model; only GPT-2 (model_type gpt2) imports")
    activation = FROM_HF_ACTIVATIONS.get(hf_cfg.get("activation_function", "gelu_new"))
    if activation is None or hf_cfg.get("n_inner") not in (None, 4 * hf_cfg["n_embd"]):
        raise CheckpointError(f"{hf} uses an activation or MLP width that the GPT-2 architecture here does not have")
    cfg = ModelConfig(vocab_size=hf_cfg["vocab_size"], block_size=hf_cfg["n_positions"], n_layer=hf_cfg["n_layer"],
                      n_head=hf_cfg["n_head"], n_embd=hf_cfg["n_embd"], activation=activation,
                      embd_pdrop=hf_cfg.get("embd_pdrop", 0.1), attn_pdrop=hf_cfg.get("attn_pdrop", 0.1),
                      resid_pdrop=hf_cfg.get("resid_pdrop", 0.1),
                      layer_norm_eps=hf_cfg.get("layer_norm_epsilon", 1e-5))
    if (hf / "model.safetensors").exists():
        state = load_file(hf / "model.safetensors")
    elif (hf / "pytorch_model.bin").exists():
        state = torch.load(hf / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{hf} has neither model.safetensors nor pytorch_model.bin")
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(from_hf_state_dict(state), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{hf} weights do not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval(), _hf_tokenizer(hf)


def _hf_tokenizer(hf: Path) -> Tokenizer:
    """Our shipped GPT-2 BPE when the directory holds exactly it; otherwise its tokenizer.json."""
    vocab, merges = hf / "vocab.json", hf / "merges.txt"
    if vocab.exists() and merges.exists() and _same_json(vocab, ASSETS / "encoder.json") \
            and _same_lines(merges, ASSETS / "vocab.bpe"):
        return load_tokenizer("gpt2")
    if (hf / "tokenizer.json").exists():
        return HFTokenizer(hf / "tokenizer.json")
    raise CheckpointError(f"{hf} has no tokenizer.json and its vocab.json/merges.txt are not GPT-2's; "
                          "add a tokenizer.json")


def _same_json(a: Path, b: Path) -> bool:
    return json.loads(a.read_text(encoding="utf-8")) == json.loads(b.read_text(encoding="utf-8"))


def _same_lines(a: Path, b: Path) -> bool:
    return a.read_text(encoding="utf-8").split() == b.read_text(encoding="utf-8").split()


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Save a Hugging Face GPT-2 directory as a gptstack checkpoint (its chat template, if any, too)."""
    model, tokenizer = read_hf(hf_dir)
    meta = {"imported_from": str(hf_dir)}
    tok_config = Path(hf_dir) / "tokenizer_config.json"
    if tok_config.exists() and isinstance(json.loads(tok_config.read_text()).get("chat_template"), str):
        meta["chat_template"] = json.loads(tok_config.read_text())["chat_template"]
    return save_checkpoint(out_dir, model, tokenizer, meta=meta)
