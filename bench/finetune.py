"""Fine-tuning step throughput: gptstack's classifier (full, LoRA, frozen) against Hugging Face
transformers' GPT2ForSequenceClassification (full, and LoRA through PEFT when it is installed).

Every implementation has the same shape (default the demo's `cpu-small`), sees the same SST-2
batches (sentences as tokens, right-padded to the batch's longest) and takes the same step: forward
+ backward under autocast, fused AdamW over the trainable parameters. Prints a markdown table of
examples/s and the ratio to the peer that does the same kind of fine-tune.

    python bench/finetune.py [--preset cpu-small] [--batch-size 32] [--steps 20] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptstack.data.records import labelled_texts, read_records
from gptstack.config import preset
from gptstack.heads import SequenceClassifier, classification_ids, pad_right
from gptstack.lora import LoRAConfig, add_lora
from gptstack.model import GPT
from gptstack.runtime import DTYPES, resolve_device, tune_allocator
from gptstack.tokenizer import load_tokenizer
from timing import hf_config, parse_args, step_rate

SST2 = Path(__file__).resolve().parents[1] / "src" / "gptstack" / "assets" / "sst2" / "train.tsv"


def hf_classifier(cfg, lora_rank: int = 0):
    import transformers
    config = hf_config(cfg, num_labels=2, pad_token_id=0)
    model = transformers.GPT2ForSequenceClassification(config)
    if lora_rank:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=16, lora_dropout=0.05,
                                                           target_modules=["c_attn", "c_proj", "c_fc"],
                                                           task_type="SEQ_CLS"))
    return model


def ours(cfg, lora_rank: int = 0, freeze_layers: int = 0) -> SequenceClassifier:
    gpt = GPT(cfg)
    if lora_rank:
        add_lora(gpt, LoRAConfig(rank=lora_rank, alpha=16, dropout=0.05))
    for block in gpt.transformer.h[:freeze_layers]:
        block.requires_grad_(False)
    return SequenceClassifier(gpt, ["0", "1"])


def main() -> None:
    args = parse_args(__doc__, batch_size=32, steps=20)

    tune_allocator()
    device = resolve_device(args.device)
    cfg = preset(args.preset).model
    tok = load_tokenizer("gpt2")
    data = labelled_texts(read_records(SST2), str(SST2))
    order = np.random.default_rng(0).permutation(len(data.texts))
    batches = []
    for b in range(args.warmup + args.steps):
        rows = order[b * args.batch_size:(b + 1) * args.batch_size]
        idx, lengths = pad_right([classification_ids(tok, data.texts[r], cfg.block_size) for r in rows])
        batches.append((idx, lengths, torch.tensor([int(data.labels[r]) for r in rows])))
    tokens = sum(int(b[1].sum()) for b in batches) / sum(len(b[1]) for b in batches)
    try:
        import peft  # noqa: F401
        have_peft = True
    except ImportError:
        have_peft = False

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}")
    print(f"model: {args.preset} + 2-class head; SST-2 batches of {args.batch_size} sentences "
          f"({tokens:.1f} tokens each on average, padded per batch); {args.steps} timed steps after {args.warmup} warm-up\n")
    print("| dtype | fine-tune | implementation | examples/s | vs peer |")
    print("|---|---|---|---:|---:|")
    def rate(model, forward) -> float:
        """Examples/s; ``forward(model, idx, lengths)`` gives the logits."""
        def loss(m, batch):
            idx, lengths, labels = (t.to(device) for t in batch)
            return F.cross_entropy(forward(m, idx, lengths).float(), labels)
        return step_rate(model, loss, batches, dtype, device, args.warmup, count=lambda b: len(b[2]))

    ours_forward = lambda m, idx, lengths: m(idx, lengths)  # noqa: E731
    hf_forward = lambda m, idx, lengths: m(input_ids=idx).logits  # noqa: E731
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        torch.manual_seed(0)
        full_hf = rate(hf_classifier(cfg), hf_forward)
        rows = [("full", "transformers GPT2ForSequenceClassification", full_hf, full_hf),
                ("full", "gptstack", rate(ours(cfg), ours_forward), full_hf),
                ("first 2 layers frozen", "gptstack",
                 rate(ours(cfg, freeze_layers=2), ours_forward), full_hf)]
        lora_peer = None
        if have_peft:
            lora_peer = rate(hf_classifier(cfg, lora_rank=8), hf_forward)
            rows.append(("LoRA r=8", "transformers + PEFT", lora_peer, lora_peer))
        ours_lora = rate(ours(cfg, lora_rank=8), ours_forward)
        rows.append(("LoRA r=8", "gptstack", ours_lora, lora_peer or full_hf))
        for kind, label, speed, peer in rows:
            print(f"| {name} | {kind} | {label} | {speed:,.0f} | {speed / peer:.2f}x |")
    print("\nPeers: transformers full fine-tuning for full and frozen rows; transformers + PEFT for LoRA"
          + ("" if have_peft else " (PEFT not installed: LoRA compared with transformers full fine-tuning)") + ".")


if __name__ == "__main__":
    main()
