"""`gptstack <command>`: parses arguments, calls the Python API, prints. No logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import textwrap
import time
import tokenize
import typing

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.prepare import DataError
from .runtime import DTYPES
from .tokenizer import TokenizerError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError, FileNotFoundError, ValueError)
QUIET = {"flag": "--quiet", "action": "store_false", "help": "no progress bars"}   # for a `progress` field


def field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a dataclass's source: the help it already has."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):      # no source shipped: flags without help
        return {}
    names, comments = {f.name for f in dataclasses.fields(cls)}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        declared = re.match(r"\s*(\w+)\s*:", token.line)
        if token.type == tokenize.COMMENT and declared and declared[1] in names:
            comments.setdefault(declared[1], token.string.lstrip("#").strip())
    return comments


def _argument_kind(cls, field: dataclasses.Field, hint) -> dict:
    """argparse settings for one field: its default (or required), and how its type is parsed:
    a bool is a switch, a list a repeatable flag, ``X | None`` parses as X."""
    if field.default is not dataclasses.MISSING:
        settings = {"default": field.default}
    elif field.default_factory is not dataclasses.MISSING:
        settings = {"default": field.default_factory()}
    else:
        settings = {"required": True}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is bool:
        return {**settings, "action": argparse.BooleanOptionalAction if settings.get("default") else "store_true"}
    if typing.get_origin(hint) is list:
        settings["action"] = "append"
    hint = args[0] if args else hint
    if hint not in (str, int, float):
        raise TypeError(f"{cls.__name__}.{field.name}: no command-line form for {hint}")
    return {**settings, "type": hint}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, flags: dict[str, dict] | None = None,
                        documented_by: tuple = ()) -> None:
    """One flag per field of the dataclass ``cls``, so a new field cannot be forgotten: ``--field-name``,
    typed and defaulted as the field, its help the field's metadata["help"] or trailing comment (or a
    same-named field's comment in ``documented_by``). ``flags`` adds argparse settings per field;
    its "flag" key respells the flag, "positional" makes the field a positional argument."""
    flags = flags or {}
    fields = dataclasses.fields(cls)
    unknown = set(flags) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    comments = {k: v for doc in (*documented_by, cls) for k, v in field_comments(doc).items()}
    for field in fields:
        settings = {**_argument_kind(cls, field, hints[field.name]), **flags.get(field.name, {})}
        flag = settings.pop("flag", "--" + field.name.replace("_", "-"))
        text = settings.pop("help", None) or field.metadata.get("help") or comments.get(field.name)
        if text and settings.get("action") == "append":
            text += " (repeatable)"
        if settings.pop("positional", False):   # `gptstack plan gpt3-175b`: the field is the argument itself
            settings.pop("default", None)
            parser.add_argument(field.name, help=text and text.replace("%", "%%"), **settings)
        else:
            parser.add_argument(flag, dest=field.name, help=text and text.replace("%", "%%"), **settings)


def dataclass_from_args(cls, args: argparse.Namespace):
    """The dataclass ``cls`` from the flags :func:`add_dataclass_flags` gave it."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs (dots reach into nested fields: --model.n_layer 4)."""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --learning_rate 3e-4")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            key, value = token[2:], tokens[i + 1]
            i += 2
        else:
            key, value = token[2:], "true"
            i += 1
        overrides[key.replace("-", "_")] = value
    return overrides


def cmd_tokenize(args) -> None:
    from .tokenizer import load_tokenizer
    print(json.dumps(load_tokenizer(args.tokenizer).encode(args.text)))


def cmd_train_tokenizer(args) -> None:
    from .tokenizer import train_bpe
    tok = train_bpe(args.inputs, args.vocab_size, args.out)
    print(f"wrote {args.out} ({tok.vocab_size} tokens)")


def cmd_model_info(args) -> None:
    from .config import model_info, preset
    chosen = preset(args.preset)
    info = model_info(chosen.model)
    if args.json:
        print(json.dumps({"preset": args.preset, "learning_rate": chosen.learning_rate,
                          "batch_tokens": chosen.batch_tokens, **info}))
        return
    gib = 1024 ** 3
    print(f"{args.preset}: {info['parameters'] / 1e6:,.1f}M parameters "
          f"({info['non_embedding_parameters'] / 1e6:,.1f}M non-embedding)")
    print(f"  layers {info['n_layer']}, d_model {info['n_embd']}, heads {info['n_head']} x {info['head_dim']}, "
          f"context {info['block_size']}, vocab {info['vocab_size']}, attention {info['attention']}")
    print(f"  FLOPs per token: forward {info['flops_per_token_forward'] / 1e9:,.3f} G, "
          f"training {info['flops_per_token_train'] / 1e9:,.3f} G")
    print(f"  weights: fp32 {info['weights_bytes']['fp32'] / gib:,.2f} GiB, bf16 {info['weights_bytes']['bf16'] / gib:,.2f} GiB")
    print(f"  AdamW state {info['adamw_state_bytes'] / gib:,.2f} GiB, fp32 grads {info['grad_bytes_fp32'] / gib:,.2f} GiB")
    if chosen.batch_tokens:
        print(f"  trained in the paper with batch {chosen.batch_tokens:,} tokens, learning rate {chosen.learning_rate:g} "
              f"({chosen.note})")
    print(f"  KV cache per token: bf16 {info['kv_cache_bytes_per_token']['bf16'] / 1024:,.1f} KiB; "
          f"full context: bf16 {info['kv_cache_bytes_full_context']['bf16'] / gib:,.3f} GiB per sequence")


def cmd_prepare(args) -> None:
    from .data.prepare import prepare
    started = time.perf_counter()
    manifest = prepare(args.inputs, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                       seed=args.seed, shard_tokens=args.shard_tokens, encoding=args.encoding,
                       text_field=args.text_field, workers=args.workers, progress=not args.quiet,
                       scrub_pii=args.scrub_pii, pii_replacement=args.pii_replacement, pii_types=args.pii_types)
    splits = manifest["splits"]
    print(f"wrote {args.out}: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens "
          f"from {manifest['documents']} document(s) in {time.perf_counter() - started:.1f}s")
    if manifest["pii"]:
        from pathlib import Path
        print_pii_report(json.loads((Path(args.out) / manifest["pii"]["report"]).read_text()))


def print_pii_report(report: dict) -> None:
    """What scrubbing replaced, per file and type: counts, never the values."""
    print(f"personal and secret data replaced ({report['replacement']}s):")
    for name, counts in [*report["files"].items(), ("all files", report["replaced"])]:
        print(f"  {name}: " + ", ".join(f"{kind} {count}" for kind, count in counts.items()))


def cmd_train(args, extra: list[str]) -> None:
    from .config import build_train_config
    from .train.pretrain import train
    print_result(train(build_train_config(args.config, parse_overrides(extra))))


def cmd_finetune(args, extra: list[str]) -> None:
    from .adapt.finetune import FinetuneConfig, finetune
    from .config import build_train_config
    print_result(finetune(build_train_config(args.config, parse_overrides(extra), cls=FinetuneConfig)))


def print_result(result) -> None:
    if os.environ.get("RANK", "0") != "0":   # under torchrun the first process speaks for all
        return
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != "step")
    at = f" (best at step {result.metrics['step']})" if "step" in result.metrics else ""
    loss = "n/a (no steps left to train)" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"done: {result.steps} steps, final train loss {loss}; validation: {scores or 'n/a'}{at}; "
          f"checkpoints in {result.out_dir}/best and {result.out_dir}/last")


def cmd_plan(args) -> None:
    from .train.plan import PlanConfig, format_plan, plan
    cfg = dataclass_from_args(PlanConfig, args)
    result = plan(cfg)
    if args.json:
        rows = [{**row, "layout": vars(row["layout"])} for row in result["layouts"]]
        print(json.dumps({**result, "layouts": rows}))
    else:
        print(format_plan(result, cfg))
    if args.on_meta:
        print_meta_count(cfg, result["layouts"][0])


def print_meta_count(cfg, row: dict) -> None:
    """The plan's first layout checked against the real modules, built on the meta device."""
    from .config import preset
    from .train.parallel import parameters_on_meta
    from .train.plan import GB, STATE_BYTES_PER_PARAM
    layout = row["layout"]
    count = parameters_on_meta(preset(cfg.preset).model, layout.tp, layout.pp)
    states = count * STATE_BYTES_PER_PARAM / (layout.dp if layout.fsdp else 1)
    print(f"\n{cfg.preset} built on the meta device (no memory allocated) at {layout}, with gptstack's own "
          "pipeline split and tensor-parallel plan:")
    print(f"per process, counted on the meta device: {count / 1e9:,.3f}B parameters, {states / GB:,.1f} GB of model states "
          f"(the plan's arithmetic: {row['parameters'] / 1e9:,.3f}B)")


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS
    from .train.plan import PlanConfig
    add_dataclass_flags(p, PlanConfig, {"preset": {"positional": True, "choices": list(PRESETS),
                                                   "help": "a preset (see model-info), e.g. gpt3-175b"}})
    p.add_argument("--json", action="store_true", help="one machine-readable JSON line")
    p.add_argument("--on-meta", action="store_true",
                   help="also build the model on the meta device at the first layout and count what each process holds")


def cmd_eval(args) -> None:
    from pathlib import Path
    from .evaluate.report import format_table, write_report
    from .evaluate.tasks import EvalConfig, evaluate
    cfg = dataclass_from_args(EvalConfig, args)
    if args.report and Path(args.report).suffix.lower() not in (".html", ".png"):
        raise ConfigError(f"--report {args.report} must end in .html or .png")
    results = evaluate(cfg)
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    if args.report:
        metrics = Path(args.checkpoint).resolve().parent / "metrics.jsonl"
        print(f"wrote {write_report(results, args.report, metrics if metrics.exists() else None)}")


def cmd_tune(args) -> None:
    from .tune import TuneConfig, tune
    result = tune(dataclass_from_args(TuneConfig, args))
    print((result.out_dir / "summary.md").read_text())
    if result.best_config is None:
        print("no trial has completed yet; run the same command again to continue the study")
        return
    print(f"best value {result.best_value:.6g} with {result.best_params}")
    print(f"wrote {result.best_config}, {result.out_dir}/summary.md, {result.out_dir}/study.json and plots "
          f"in {result.out_dir}")


def cmd_generate(args) -> None:
    from .checkpoint import load_model
    from .inference.engine import Engine, EngineConfig
    from .inference.quantize import prepare_for_decoding
    from .inference.sampling import SamplingParams
    from .runtime import resolve_device, resolve_dtype
    params = dataclass_from_args(SamplingParams, args).validate()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device) if args.dtype != "auto" else None
    model, tokenizer, _ = load_model(args.checkpoint, device=device, dtype=dtype)
    engine = Engine(prepare_for_decoding(model), tokenizer, EngineConfig(max_batch_size=1, context_shift=True), device)
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {sample + 1} ---")
        seed = None if params.seed is None else params.seed + sample    # as the API numbers its n samples
        sys.stdout.write(args.prompt)
        events = []
        for event in engine.stream(args.prompt, dataclasses.replace(params, seed=seed)):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            events.append(event)
        sys.stdout.write("\n")
        if params.logprobs is not None:
            print_logprobs(tokenizer, events)


def print_logprobs(tokenizer, events) -> None:
    """One line per generated token: the token, its log-probability, then the top alternatives."""
    print("--- logprobs ---")
    for event in events:
        if event.token_id is not None:
            alternatives = " ".join(f"{tokenizer.decode([t])!r} {lp:.4f}" for t, lp in event.top_logprobs or [])
            print(f"{tokenizer.decode([event.token_id])!r}\t{event.logprob:.4f}\t{alternatives}".rstrip())


def cmd_keygen(args) -> None:
    from .crypto import KEY_FILE_ENV, write_new_key
    print(f"wrote a new 256-bit key to {write_new_key(args.out)} (readable by you alone); use it with "
          f"--key-file {args.out} or {KEY_FILE_ENV}={args.out}, and keep a copy: without it encrypted "
          "checkpoints cannot be read")


def add_key_file_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", help="the key of encrypted checkpoints (`gptstack keygen`); also read from "
                                      "GPTSTACK_KEY_FILE or GPTSTACK_KEY, never from the command line")


def use_key_file(args) -> None:
    """``--key-file`` becomes where this process, and those it starts, find the key (crypto.py)."""
    from .crypto import KEY_FILE_ENV
    if getattr(args, "key_file", None):
        os.environ[KEY_FILE_ENV] = args.key_file


def refuse_key_on_command_line(argv: list[str]) -> None:
    if any(arg == "--key" or arg.startswith("--key=") for arg in argv):
        raise ConfigError("a key is never taken on the command line, where other users see it (ps) and shells "
                          "keep it (history): pass --key-file FILE, or set GPTSTACK_KEY_FILE or GPTSTACK_KEY")


def cmd_export(args) -> None:
    if args.format == "gguf":
        from .interop.gguf import export_gguf
        print(f"wrote {export_gguf(args.checkpoint, args.out, args.gguf_type)}")
        return
    from .interop.hf import export_hf
    print(f"wrote {export_hf(args.checkpoint, args.out)}")


def cmd_import(args) -> None:
    from pathlib import Path
    if Path(args.source).suffix == ".gguf" or Path(args.source).is_file():   # a Hugging Face model is a directory
        from .interop.gguf import import_gguf
        print(f"wrote {import_gguf(args.source, args.out)}")
        return
    from .interop.hf import import_hf
    print(f"wrote {import_hf(args.source, args.out)}")


def cmd_serve(args) -> None:
    from .serve.run import ReplicaOptions, ServeOptions, serve
    options, replicas = dataclass_from_args(ServeOptions, args), dataclass_from_args(ReplicaOptions, args).validate()
    if not replicas.on_ray:
        serve(options)
        return
    try:
        from .serve.replicas import serve_replicas
    except ImportError as exc:
        raise ValueError(f"--replicas / --max-replicas / --ray-address run on Ray Serve, which is not installed "
                         f"({exc}); pip install 'gptstack[ray]'") from None
    serve_replicas(options, replicas)


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    from .evaluate.attack import ATTACKS
    from .evaluate.tasks import TASKS, EvalConfig
    add_dataclass_flags(p, EvalConfig, {"attack": {"choices": ATTACKS},
        "checkpoint": {"required": True},
        "data": {"required": True, "help": "text file or prepared dataset (lm); labelled .tsv/.csv/.jsonl "
                                           "(classification); CoNLL or tagged .jsonl (token_classification); "
                                           "prompt/response or chat .jsonl (generation)"},
        "task": {"choices": TASKS}, "max_new_tokens": {"help": "generation: tokens per completion"},
        "dtype": {"choices": ["auto", *DTYPES]}, "progress": QUIET})
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--report", help="write an .html or .png report with plots")
    add_key_file_flag(p)


def add_tune_flags(p: argparse.ArgumentParser) -> None:
    from .tune import TuneConfig
    add_dataclass_flags(p, TuneConfig, {"space": {"required": True}, "out_dir": {"flag": "--out"}, "progress": QUIET})
    add_key_file_flag(p)    # for trials that encrypt or start from an encrypted checkpoint


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` as typed in a shell (--stop "\\n\\n"), as the characters they name."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def add_generate_flags(p: argparse.ArgumentParser) -> None:
    from .inference.sampling import SamplingParams
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default="\n")
    # the defaults of a CLI user writing prose, not of an API client
    add_dataclass_flags(p, SamplingParams, {"max_new_tokens": {"default": 200}, "temperature": {"default": 0.8},
                                            "top_p": {"default": 0.95},
                                            "stop": {"type": unescape, "help": "stop before this text (\\n: newline)"}})
    p.add_argument("--num-samples", type=int, default=1, help="samples one after another, seeds seed, seed+1, ...")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="weights dtype: auto (as saved), fp32, bf16")
    add_key_file_flag(p)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    from .inference.engine import EngineConfig
    from .serve.run import ReplicaOptions, ServeOptions
    add_dataclass_flags(p, ServeOptions, {
        "host": {"help": "address to bind (default: loopback only)"},
        "model_name": {"help": "the model id clients send (default: the checkpoint folder name)"},
        "api_keys": {"flag": "--api-key", "help": "an accepted key"},
        "api_keys_file": {"help": "a file with one accepted key per line"},
        "insecure_no_auth": {"help": "accept requests without a key (not for exposed hosts)"},
        "dtype": {"choices": ["fp32", "bf16", "auto"]},
        "quantize": {"choices": ["none", "int8", "int4"], "help": "weight-only quantization of the matmuls"},
        "max_queue": {"help": "requests waiting beyond the batch before 503"},
        "requests_per_minute": {"help": "per API key; 0 = unlimited"},
        "tokens_per_minute": {"help": "per API key (prompt + max_tokens); 0 = unlimited"},
        "metrics_public": {"help": "serve /metrics without a key"},
        "log_prompts": {"help": "write prompt text to the log (off by default), scrubbed of personal and secret data"},
    }, documented_by=(EngineConfig,))
    add_dataclass_flags(p, ReplicaOptions)
    add_key_file_flag(p)


def add_prepare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' (default) or a path to a tokenizer.json")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: all cores); the output does not depend on it")
    p.add_argument("--scrub-pii", action="store_true", help="replace personal and secret data (e-mail, phone, card, "
                   "IBAN, SSN, IP, keys, names) before tokenizing; counts per file go to pii_report.json")
    p.add_argument("--pii-replacement", choices=["tag", "pseudonym"], default="tag",
                   help="tag: <EMAIL>; pseudonym: <EMAIL_3f9a0c1e>, the same for the same value within the run")
    p.add_argument("--pii-types", default="all", help="'all' or a comma-separated choice of SECRET, EMAIL, IBAN, "
                   "CARD, SSN, IP, PHONE, ADDRESS, NAME")
    p.add_argument("--quiet", action="store_true")


def add_export_flags(p: argparse.ArgumentParser) -> None:
    from .interop.gguf import DEFAULT_WEIGHT_TYPE, WEIGHT_TYPES   # (imports the gguf package only when used)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a Hugging Face GPT-2 directory; gguf: one file for llama.cpp, Ollama, LM Studio")
    p.add_argument("--out", required=True, help="a directory (hf) or a .gguf file (gguf)")
    p.add_argument("--gguf-type", choices=WEIGHT_TYPES, default=DEFAULT_WEIGHT_TYPE,
                   help=f"gguf: type of the weight matrices (norms, biases, positions stay f32); "
                        f"default {DEFAULT_WEIGHT_TYPE}")
    add_key_file_flag(p)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command; the flags built from dataclasses import their modules (optuna, fastapi ...), so
    with ``only`` just that command gets them."""
    parser = argparse.ArgumentParser(prog="gptstack", description="Train, tune, evaluate and serve GPT models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, summary: str, add_flags) -> None:
        command = sub.add_parser(name, help=summary)
        if only in (None, name):
            add_flags(command)

    p = sub.add_parser("tokenize", help="print the token ids of a text as a JSON list")
    p.add_argument("text")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' (default) or a path to a tokenizer.json")

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE on your own text")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="where to write tokenizer.json")

    p = sub.add_parser("model-info", help="parameters, FLOPs and memory of a preset, without allocating it")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true", help="one machine-readable JSON line")
    p.add_argument("--on-meta", action="store_true",
                   help="also build the model on the meta device at the first layout and count what each process holds")

    add_command("plan", "memory per device, layouts that fit and days of training of a preset on a cluster",
                add_plan_flags)

    add_prepare_flags(sub.add_parser("prepare", help="tokenize text files / folders / JSONL into train and val shards"))

    p = sub.add_parser("train", help="pretrain a GPT; any config key can be overridden as --key value")
    p.add_argument("--config", help="a YAML or JSON config file (NVIDIA-style GPT-3 keys accepted)")
    add_key_file_flag(p)

    p = sub.add_parser("finetune", help="adapt a checkpoint: classification, token classification (NER) or SFT, "
                                        "full / LoRA / frozen layers; "
                                        "any config key as --key value")
    p.add_argument("--config", help="a YAML or JSON fine-tuning config file")
    add_key_file_flag(p)

    add_command("eval", "score a checkpoint: perplexity / bits per byte, accuracy / F1, or ROUGE", add_eval_flags)
    add_command("tune", "search hyperparameters with Optuna; rerun the same command to resume", add_tune_flags)
    add_command("generate", "sample text from a checkpoint, streamed; past its context by a context shift",
                add_generate_flags)

    add_command("export", "write a checkpoint in another format", add_export_flags)

    p = sub.add_parser("import", help="read a Hugging Face GPT-2 directory or a GPT-2 .gguf file into a "
                                      "gptstack checkpoint")
    p.add_argument("source", help="a Hugging Face GPT-2 directory, or a .gguf file of llama.cpp's gpt2 architecture")
    p.add_argument("--out", required=True)

    add_command("serve", "serve a checkpoint behind an OpenAI-compatible HTTP API", add_serve_flags)

    p = sub.add_parser("keygen", help="write a new random key for encrypted checkpoints (docs/security.md)")
    p.add_argument("--out", required=True, help="the key file to create (mode 0600; never overwritten)")
    return parser


COMMANDS = {"tokenize": cmd_tokenize, "train-tokenizer": cmd_train_tokenizer, "model-info": cmd_model_info,
            "plan": cmd_plan, "prepare": cmd_prepare, "eval": cmd_eval, "tune": cmd_tune, "generate": cmd_generate,
            "export": cmd_export, "import": cmd_import, "serve": cmd_serve, "keygen": cmd_keygen}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    args, extra = build_parser(only=command).parse_known_args(argv)
    try:
        refuse_key_on_command_line(argv)
        use_key_file(args)
        if args.command == "train":
            cmd_train(args, extra)
        elif args.command == "finetune":
            cmd_finetune(args, extra)
        elif extra:
            raise ConfigError(f"unrecognised arguments: {' '.join(extra)}")
        else:
            COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"gptstack {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptstack {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
