"""GGUF, the one-file format that llama.cpp, Ollama and LM Studio run, in and out.

llama.cpp's ``gpt2`` architecture is our dense model exactly: learned positions, pre-LayerNorm
blocks with biases, q, k and v as one matmul with a bias, a tanh-GELU MLP and a head tied to the
token embedding (a GGUF without ``output.weight`` ties them). The tensor names and metadata keys are
the ones llama.cpp's own GPT-2 converter writes (``convert_hf_to_gguf.py``). ggml lists a matrix's
dimensions innermost first, so an ``nn.Linear`` weight [out, in] is stored as it is.

The tokenizer travels inside the file: a byte-level BPE's token strings (in GPT-2's printable byte
alphabet), its merges and the ``gpt-2`` pre-tokenizer (the same split regex as tiktoken's r50k), so
llama.cpp turns text into the ids our tokenizer gives. The ``gguf`` package (``pip install
gptstack[gguf]``) writes, reads and (de)quantizes; it is imported only here.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..chat import DEFAULT_CHAT_TEMPLATE
from ..checkpoint import CheckpointError, load_model, save_checkpoint
from ..config import ModelConfig
from ..model import GPT, QKV_PROJECTIONS
from ..tokenizer import ASSETS, GPT2Tokenizer, HFTokenizer, Tokenizer, load_tokenizer

ARCH = "gpt2"
WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# f16 is what llama.cpp's own converter writes by default: half the bytes of f32, every backend
# runs it at full speed, and trained GPT-2 weights sit far inside its range.
DEFAULT_WEIGHT_TYPE = "f16"
GLOBAL_TENSORS = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
BLOCK_TENSORS = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                 "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}   # general.file_type: the type most weights have (gguf.LlamaFileType)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5   # gguf.TokenType
log = logging.getLogger("gptstack.interop")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF needs the gguf package: pip install 'gptstack[gguf]' (or pip install gguf)") from None
    return gguf


def tensor_names(n_layer: int) -> dict[str, str]:
    """Our state-dict names (q, k and v fused as ``attn.c_attn``) -> llama.cpp's tensor names."""
    modules = {f"transformer.{ours}": theirs for ours, theirs in GLOBAL_TENSORS.items()}
    modules.update({f"transformer.h.{i}.{ours}": f"blk.{i}.{theirs}"
                    for i in range(n_layer) for ours, theirs in BLOCK_TENSORS.items()})
    return {f"{ours}.{kind}": f"{theirs}.{kind}" for ours, theirs in modules.items() for kind in ("weight", "bias")}


def fused_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights with each layer's q, k, v projections as one ``c_attn`` (rows q; k; v),
    the tied head left out."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for layer in range(model.config.n_layer):
        attn = f"transformer.h.{layer}.attn."
        for kind in ("weight", "bias"):
            state[f"{attn}c_attn.{kind}"] = torch.cat([state.pop(f"{attn}{name}.{kind}") for name in QKV_PROJECTIONS])
    return state


# --- export --------------------------------------------------------------------------------------

def export_gguf(checkpoint_dir: str | Path, out_path: str | Path, weight_type: str = DEFAULT_WEIGHT_TYPE) -> Path:
    """Write a gptstack checkpoint as a GGUF file that llama.cpp runs with the same outputs.

    ``weight_type`` sets the matrices' type; LayerNorms, biases and position embeddings stay f32 as
    in llama.cpp's converter. Under q4_0 the token embedding, which is also the output head, is
    q8_0: llama.cpp's own quantizer keeps the head at more bits too (q6_K, which the gguf package
    cannot write). LoRA adapters are merged in; a classification head is left out."""
    gguf = _gguf()
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown GGUF weight type {weight_type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"{out} is a directory; GGUF is one file: pass a path such as {out / 'model.gguf'}")
    model, tokenizer, config = load_model(checkpoint_dir)
    if config.get("head"):
        log.warning("%s has a %s head; only its language-model backbone is exported", checkpoint_dir,
                    config["head"].get("kind"))
    cfg = model.config
    refuse_unrunnable(cfg, checkpoint_dir)
    tokens, token_types, merges = gguf_vocab(tokenizer, cfg.vocab_size, checkpoint_dir)
    qtype = gguf.GGMLQuantizationType[weight_type.upper()]
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, ARCH)
    writer.add_name(out.stem)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_eps)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[weight_type]])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)   # GPT-2 reads text as it is: no token is put in front
    writer.add_chat_template(config.get("meta", {}).get("chat_template") or DEFAULT_CHAT_TEMPLATE)
    names = tensor_names(cfg.n_layer)
    for name, tensor in fused_state_dict(model).items():
        target = names[name]
        data, stored_as = _encode(gguf, target, tensor.numpy(), qtype)
        writer.add_tensor(target, data, raw_dtype=stored_as)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _encode(gguf, name: str, array: np.ndarray, qtype):
    """A tensor's data in the type it gets (see export_gguf), and that type."""
    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or name == "position_embd.weight":
        qtype = types.F32
    elif name == "token_embd.weight" and qtype == types.Q4_0:
        qtype = types.Q8_0
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.quants.QuantError:   # rows not a multiple of the block size: as llama.cpp's converter, f16
        log.warning("%s %s does not split into %s blocks; written as f16", name, array.shape, qtype.name)
        return gguf.quants.quantize(array, types.F16), types.F16


def refuse_unrunnable(cfg: ModelConfig, checkpoint_dir: str | Path) -> None:
    """llama.cpp's gpt2 graph has dense attention and the tanh GELU only; anything else would run
    there and compute something else."""
    if cfg.attention != "dense":
        raise CheckpointError(
            f"{checkpoint_dir} cannot be exported to GGUF: its model uses {cfg.attention} attention (odd layers see "
            f"only the last {cfg.band_width} positions), and llama.cpp's gpt2 architecture has no locally banded "
            "attention, so the exported model would compute different outputs. Serve it with gptstack instead "
            "(`gptstack serve` / `gptstack generate`)")
    if cfg.activation != "gelu":
        raise CheckpointError(
            f"{checkpoint_dir} cannot be exported to GGUF: its MLP uses {cfg.activation} (erf GELU), llama.cpp's "
            "gpt2 architecture the tanh approximation, so the exported model would compute different outputs")


def gpt2_vocab() -> tuple[dict[str, int], list[str]]:
    """The shipped GPT-2 BPE as token strings (GPT-2's printable byte alphabet) -> id, and its merges."""
    vocab = json.loads((ASSETS / "encoder.json").read_text(encoding="utf-8"))
    merges = (ASSETS / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]   # after "#version: 0.2"
    return vocab, [line for line in merges if line]


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int, source) -> tuple[list[str], list[int], list[str]]:
    """Token strings, token types and merges for the file. Rows of the embedding beyond the
    tokenizer's vocabulary get unused placeholder tokens, as llama.cpp's converter writes them."""
    if isinstance(tokenizer, GPT2Tokenizer):
        (vocab, merges), added = gpt2_vocab(), {tokenizer.eot_id: True}
    else:
        vocab, merges, added = byte_level_bpe(tokenizer, source)
    by_id = {i: token for token, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has ids up to {max(by_id)} but the model only "
                              f"{vocab_size} embedding rows")

    def token_type(i: int) -> int:
        if i not in by_id:
            return TOKEN_UNUSED
        if i in added:
            return TOKEN_CONTROL if added[i] else TOKEN_USER_DEFINED
        return TOKEN_NORMAL
    return [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)], [token_type(i) for i in range(vocab_size)], merges


def byte_level_bpe(tokenizer: HFTokenizer, source) -> tuple[dict[str, int], list[str], dict[int, bool]]:
    """Vocabulary, merges and added tokens (id -> is it special) of a tokenizer.json that llama.cpp's
    ``gpt2`` tokenizer reproduces: a plain byte-level BPE with GPT-2's split regex, as
    ``gptstack train-tokenizer`` writes. Anything else is refused rather than tokenized otherwise."""
    spec = json.loads(Path(tokenizer.path).read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain = (model.get("type") == "BPE" and not spec.get("normalizer") and pre.get("type") == "ByteLevel"
             and not pre.get("add_prefix_space") and pre.get("use_regex", True) and not model.get("dropout")
             and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
             and not model.get("byte_fallback") and not model.get("ignore_merges"))
    if not plain:
        raise CheckpointError(
            f"{source}: its tokenizer ({tokenizer.path}) is not a plain byte-level BPE with GPT-2's pre-tokenizer "
            "(no normalizer, ByteLevel without prefix space), so llama.cpp would tokenize text differently; "
            "GGUF export supports the GPT-2 BPE and tokenizers made by `gptstack train-tokenizer`")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = dict(model["vocab"])
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    return vocab, merges, {t["id"]: t["special"] for t in spec.get("added_tokens", [])}


# --- import --------------------------------------------------------------------------------------

def import_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Save a GGUF of llama.cpp's gpt2 architecture (ours, or a GPT-2 converted by llama.cpp) as a
    gptstack checkpoint; quantized weights come back dequantized to f32."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable GGUF file: {exc}") from None
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path} holds a {arch!r} model; only llama.cpp's gpt2 architecture (GPT-2, and "
                              "gptstack's own exports) imports")
    weights = {t.name: _decode(gguf, t) for t in reader.tensors}
    cfg = model_config(fields, weights, path)
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(gptstack_state_dict(weights, cfg, path), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path} tensors do not make a GPT-2: missing {missing[:4]}, unexpected {unexpected[:4]}")
    meta = {"imported_from": str(path)}
    template = fields.get("tokenizer.chat_template")
    if template and template != DEFAULT_CHAT_TEMPLATE:
        meta["chat_template"] = template
    with tempfile.TemporaryDirectory() as tmp:   # a tokenizer.json written here is copied into the checkpoint
        tokenizer = gguf_tokenizer(fields, Path(tmp), path)
        return save_checkpoint(out_dir, model.eval(), tokenizer, meta=meta)


def _decode(gguf, tensor) -> torch.Tensor:
    """A tensor of the file as f32, in torch's dimension order (ggml's reversed)."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)   # a view of the memory-mapped file for f32
    return torch.from_numpy(np.array(array, dtype=np.float32)).reshape(
        [int(d) for d in reversed(tensor.shape)])


def model_config(fields: dict, weights: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    key = f"{ARCH}."
    try:
        n_embd, n_head = fields[key + "embedding_length"], fields[key + "attention.head_count"]
        cfg = ModelConfig(vocab_size=weights["token_embd.weight"].shape[0], block_size=fields[key + "context_length"],
                          n_layer=fields[key + "block_count"], n_head=n_head, n_embd=n_embd,
                          embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
                          layer_norm_eps=fields[key + "attention.layer_norm_epsilon"])
    except KeyError as exc:
        raise CheckpointError(f"{path} lacks {exc.args[0]}; it is not a complete gpt2 GGUF") from None
    if fields.get(key + "feed_forward_length", 4 * n_embd) != 4 * n_embd or \
            fields.get(key + "attention.head_count_kv", n_head) != n_head:
        raise CheckpointError(f"{path} has an MLP width or key/value head count that GPT-2 does not have")
    return cfg.validate()


def gptstack_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under our names (q, k, v fused: the model splits them on load)."""
    head = weights.pop("output.weight", None)
    if head is not None and not torch.equal(head, weights["token_embd.weight"]):
        raise CheckpointError(f"{path} has an output head of its own (output.weight); gptstack's GPT ties the head "
                              "to the token embedding, so this model cannot be imported without changing it")
    ours = {theirs: name for name, theirs in tensor_names(cfg.n_layer).items()}
    unknown = sorted(set(weights) - set(ours))
    if unknown:
        raise CheckpointError(f"{path} has tensors that GPT-2 does not: {unknown[:4]}")
    return {ours[name]: tensor for name, tensor in weights.items()}


def gguf_tokenizer(fields: dict, tmp: Path, path: Path) -> Tokenizer:
    """Our GPT-2 BPE when the file holds exactly it; otherwise its byte-level BPE as a tokenizer.json."""
    if fields.get("tokenizer.ggml.model") != "gpt2" or fields.get("tokenizer.ggml.pre", "gpt-2") != "gpt-2":
        raise CheckpointError(f"{path} has a {fields.get('tokenizer.ggml.model')!r} tokenizer with pre-tokenizer "
                              f"{fields.get('tokenizer.ggml.pre')!r}; only GPT-2's byte-level BPE imports")
    tokens, types, merges = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"], \
        fields["tokenizer.ggml.merges"]
    vocab, gpt2_merges = gpt2_vocab()
    if merges == gpt2_merges and tokens[:len(vocab)] == sorted(vocab, key=vocab.get):
        return load_tokenizer("gpt2")
    eot = fields.get("tokenizer.ggml.eos_token_id")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == TOKEN_CONTROL}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != TOKEN_UNUSED},
                      "merges": merges}}
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return HFTokenizer(tmp / "tokenizer.json", None if eot is None else tokens[eot])
