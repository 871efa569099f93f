"""`gptstack <command>`: parses arguments, calls the Python API, prints. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.prepare import DataError
from .tokenizer import TokenizerError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError, FileNotFoundError, ValueError)


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
    manifest = prepare(args.inputs, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                       seed=args.seed, shard_tokens=args.shard_tokens, encoding=args.encoding,
                       text_field=args.text_field, progress=not args.quiet)
    splits = manifest["splits"]
    print(f"wrote {args.out}: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens "
          f"from {manifest['documents']} document(s) in {manifest['seconds']:.1f}s")


def cmd_train(args, extra: list[str]) -> None:
    from .config import build_train_config
    from .train.loop import train
    cfg = build_train_config(args.config, parse_overrides(extra))
    result = train(cfg)
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    print(f"done: {result.steps} steps, final train loss {result.final_loss:.4f}, val loss {val} "
          f"(best {best}); checkpoints in {result.out_dir}/best and {result.out_dir}/last")


def cmd_finetune(args, extra: list[str]) -> None:
    from .adapt.finetune import FinetuneConfig, finetune
    from .config import build_train_config
    cfg = build_train_config(args.config, parse_overrides(extra), cls=FinetuneConfig)
    result = finetune(cfg)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != "step")
    at = f" (best at step {result.metrics['step']})" if "step" in result.metrics else ""
    print(f"done: {result.steps} steps, final train loss {result.final_loss:.4f}; validation: {scores or 'n/a'}{at}; "
          f"checkpoints in {result.out_dir}/best and {result.out_dir}/last")


def cmd_eval(args) -> None:
    from pathlib import Path
    from .evaluate.report import format_table, write_report
    from .evaluate.tasks import EvalConfig, evaluate
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k in EvalConfig.__dataclass_fields__})
    cfg.progress = not args.quiet
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
    cfg = TuneConfig(**{k: v for k, v in vars(args).items() if k in TuneConfig.__dataclass_fields__})
    cfg.progress = not args.quiet
    result = tune(cfg)
    print((result.out_dir / "summary.md").read_text())
    if result.best_config is None:
        print("no trial has completed yet; run the same command again to continue the study")
        return
    print(f"best value {result.best_value:.6g} with {result.best_params}")
    print(f"wrote {result.best_config}, {result.out_dir}/summary.md, {result.out_dir}/study.json and plots "
          f"in {result.out_dir}")


def cmd_generate(args) -> None:
    from .checkpoint import load_model
    from .inference.generate import generate_text
    from .inference.sampling import SamplingParams
    from .runtime import resolve_device, resolve_dtype
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device) if args.dtype != "auto" else None
    model, tokenizer, _ = load_model(args.checkpoint, device=device, dtype=dtype)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop or []).validate()
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {sample + 1} ---")
        if params.seed is not None and sample:
            params.seed += 1
        sys.stdout.write(args.prompt)
        for piece in generate_text(model, tokenizer, args.prompt, params, device):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_export(args) -> None:
    from .interop.hf import export_hf
    print(f"wrote {export_hf(args.checkpoint, args.out)}")


def cmd_import(args) -> None:
    from .interop.hf import import_hf
    print(f"wrote {import_hf(args.hf_dir, args.out)}")


def cmd_serve(args) -> None:
    from .serve.run import ServeOptions, serve
    options = ServeOptions(**{k: v for k, v in vars(args).items() if k in ServeOptions.__dataclass_fields__})
    serve(options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptstack", description="Train, tune, evaluate and serve GPT models.")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("prepare", help="tokenize text files / folders / JSONL into train and val shards")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' (default) or a path to a tokenizer.json")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("train", help="pretrain a GPT; any config key can be overridden as --key value")
    p.add_argument("--config", help="a YAML or JSON config file (NVIDIA-style GPT-3 keys accepted)")

    p = sub.add_parser("finetune", help="adapt a checkpoint: classification or SFT, full / LoRA / frozen layers; "
                                        "any config key as --key value")
    p.add_argument("--config", help="a YAML or JSON fine-tuning config file")

    p = sub.add_parser("eval", help="score a checkpoint: perplexity / bits per byte, accuracy / F1, or ROUGE")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="text file or prepared dataset (lm); labelled .tsv/.csv/.jsonl "
                                                 "(classification); prompt/response or chat .jsonl (generation)")
    p.add_argument("--task", default="auto", choices=["auto", "lm", "classification", "generation"])
    p.add_argument("--stride", type=int, default=0, help="lm: sliding-window step in tokens (0 = half the context)")
    p.add_argument("--max-tokens", type=int, default=0, help="lm: score at most this many tokens (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-field", default="")
    p.add_argument("--label-field", default="label")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation: tokens per completion")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--report", help="write an .html or .png report with plots")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("tune", help="search hyperparameters with Optuna; rerun the same command to resume")
    p.add_argument("--space", required=True, help="the YAML search-space file (see configs/tune-demo.yaml)")
    p.add_argument("--out", dest="out_dir", default="runs/tune")
    p.add_argument("--storage", default="", help="database URL (default: sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default="")
    p.add_argument("--n-trials", type=int, default=0, help="finished trials to reach (default: the space file's)")
    p.add_argument("--n-jobs", type=int, default=1, help="trials in parallel, one process each")
    p.add_argument("--heartbeat-interval", type=int, default=5)
    p.add_argument("--grace-period", type=int, default=20, help="seconds without heartbeat before a trial counts as dead")
    p.add_argument("--keep-last", action="store_true", help="keep each trial's last/ with its optimizer state")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="weights dtype: auto (as saved), fp32, bf16")

    p = sub.add_parser("export", help="write a checkpoint in another format")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=["hf"], default="hf")
    p.add_argument("--out", required=True)

    p = sub.add_parser("import", help="read a Hugging Face GPT-2 directory into a gptstack checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True)

    p = sub.add_parser("serve", help="serve a checkpoint behind an OpenAI-compatible HTTP API")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="", help="the model id clients send (default: the checkpoint folder name)")
    p.add_argument("--api-key", dest="api_keys", action="append", default=[], help="an accepted key (repeatable)")
    p.add_argument("--api-keys-file", help="a file with one accepted key per line")
    p.add_argument("--insecure-no-auth", action="store_true", help="accept requests without a key (not for exposed hosts)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"], help="weight dtype")
    p.add_argument("--quantize", default="none", choices=["none", "int8"], help="int8 weight-only quantization")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 503")
    p.add_argument("--max-seq-len", type=int, default=0, help="KV cache length per request (0 = model context)")
    p.add_argument("--kv-cache-memory", type=int, default=0, help="KV cache budget in bytes (0 = by batch size)")
    p.add_argument("--requests-per-minute", type=int, default=0, help="per API key; 0 = unlimited")
    p.add_argument("--tokens-per-minute", type=int, default=0, help="per API key (prompt + max_tokens); 0 = unlimited")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without a key")
    p.add_argument("--log-prompts", action="store_true", help="write prompt text to the log (off by default)")
    p.add_argument("--chat-template", help="a file with a Jinja chat template (default: 'Role: content' lines)")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--graceful-shutdown-seconds", type=float, default=30.0)
    return parser


COMMANDS = {"tokenize": cmd_tokenize, "train-tokenizer": cmd_train_tokenizer, "model-info": cmd_model_info,
            "prepare": cmd_prepare, "eval": cmd_eval, "tune": cmd_tune, "generate": cmd_generate, "export": cmd_export, "import": cmd_import,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    try:
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
