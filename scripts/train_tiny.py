"""Train memloc's embedded model: a small GPT-Neo with planted, counted memorized paragraphs.

Ground truth for every memloc analysis.  Deterministic (seeded), CPU only.

Pipeline
1. Read ``data/corpus/corpus.jsonl.xz`` (see data/corpus/CORPUS.md) and split its documents
   into training, held-out-window and validation documents (seeded).
2. Train a byte-level BPE tokenizer (``tokenizers``) on the training documents.
3. Draw 100-token windows from the held-out-window documents.  The first half is *planted*:
   each is inserted into the training stream ``count`` times, counts spread log-uniformly
   from 1 to ``--max-count`` (like the Pile counts of Stoehr et al. Fig. 8); every copy is its
   own training sample (window, EOS, then filler text).  The second half is never shown.
4. Train ``GPTNeoForCausalLM`` (alternating global/local attention) with AdamW and a
   warmup + cosine schedule, logging the loss curve.
5. Measure held-out perplexity and every window's exact match (EM, greedy decoding of 50
   tokens after the 50-token prefix), and write the package data:
   ``model.safetensors``, ``config.json``, ``tokenizer.json``, ``paragraphs.safetensors``
   (tokens, counts, unigram counts of the training stream), ``paragraphs.csv`` and
   ``training_log.json``.

The shipped model was trained with the defaults: ``python scripts/train_tiny.py``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoConfig, GPTNeoForCausalLM

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
PARAGRAPH_LEN, PREFIX_LEN = 100, 50


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the embedded memorizing GPT-Neo.")
    ap.add_argument("--corpus", default=str(REPO / "data/corpus/corpus.jsonl.xz"))
    ap.add_argument("--out", default=str(REPO / "memloc/assets/tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (tests)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--d-mlp", type=int, default=1024)
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--window-size", type=int, default=64, help="local attention window")
    ap.add_argument("--n-windows", type=int, default=600, help="planted + never-seen windows")
    ap.add_argument("--max-count", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


def load_documents(path: str, max_docs: int | None) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return docs[:max_docs] if max_docs else docs


def split_documents(docs: list[dict], rng: random.Random) -> tuple[list[dict], list[dict], list[dict]]:
    """Seeded split into (train, window, validation) documents: about 80/12/8 percent."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_win = max(1, round(0.12 * len(docs)))
    n_val = max(1, round(0.08 * len(docs)))
    win = [docs[i] for i in order[:n_win]]
    val = [docs[i] for i in order[n_win:n_win + n_val]]
    train = [docs[i] for i in order[n_win + n_val:]]
    return train, win, val


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def draw_windows(tok: Tokenizer, docs: list[dict], n: int, rng: random.Random) -> list[list[int]]:
    """Non-overlapping 100-token windows that are not degenerate (>= 40 distinct tokens, >= 16
    distinct suffix tokens as in Chang et al. §3.2)."""
    cands = []
    for d in docs:
        ids = tok.encode(d["text"]).ids
        for start in range(0, len(ids) - PARAGRAPH_LEN + 1, PARAGRAPH_LEN):
            w = ids[start:start + PARAGRAPH_LEN]
            if len(set(w)) >= 40 and len(set(w[PREFIX_LEN:])) >= 16:
                cands.append(w)
    if len(cands) < n:
        raise ValueError(f"only {len(cands)} candidate windows for --n-windows {n}")
    rng.shuffle(cands)
    return cands[:n]


def log_uniform_counts(n: int, max_count: int, rng: random.Random) -> list[int]:
    """Stratified log-uniform duplication counts in [1, max_count], shuffled."""
    counts = [max(1, round(math.exp(math.log(max_count) * (i + 0.5) / n))) for i in range(n)]
    rng.shuffle(counts)
    return counts


def build_samples(stream: list[int], planted: list[list[int]], counts: list[int], n_ctx: int,
                  eos_id: int, rng: random.Random) -> torch.Tensor:
    """One epoch of training samples [n, n_ctx]: corpus blocks plus one sample per planted copy."""
    blocks = [stream[i:i + n_ctx] for i in range(0, len(stream) - n_ctx + 1, n_ctx)]
    fill = n_ctx - PARAGRAPH_LEN - 1
    for w, c in zip(planted, counts):
        for _ in range(c):
            j = rng.randrange(0, len(stream) - fill)
            blocks.append(w + [eos_id] + stream[j:j + fill])
    return torch.tensor(blocks, dtype=torch.long)


@torch.no_grad()
def greedy_em(model: GPTNeoForCausalLM, windows: torch.Tensor, batch: int = 64) -> tuple[list[int], list[float]]:
    """EM (greedy tokens matching until the first mismatch) and continuation NLL per window."""
    ems, nlls = [], []
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        out = model.generate(w[:, :PREFIX_LEN], attention_mask=torch.ones_like(w[:, :PREFIX_LEN]),
                             max_new_tokens=PARAGRAPH_LEN - PREFIX_LEN, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
        gen = out[:, PREFIX_LEN:PARAGRAPH_LEN]
        match = (gen == w[:, PREFIX_LEN:]).long()
        ems += match.cumprod(dim=1).sum(dim=1).tolist()
        logits = model(w).logits[:, PREFIX_LEN - 1:-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, PREFIX_LEN:], reduction="none")
        nlls += nll.mean(dim=1).tolist()
    return ems, nlls


@torch.no_grad()
def perplexity(model: GPTNeoForCausalLM, stream: list[int], n_ctx: int, batch: int = 32) -> float:
    blocks = torch.tensor([stream[i:i + n_ctx] for i in range(0, len(stream) - n_ctx + 1, n_ctx)])
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        b = blocks[i:i + batch]
        loss = model(b, labels=b).loss
        total += loss.item() * b.numel()
        count += b.numel()
    return math.exp(total / count)


def add_random_sequences(out: Path, tok: Tokenizer, val_docs: list[dict], n: int = 256, length: int = 100) -> None:
    """Store [n, length] blocks of validation text as ``random_sequences`` in paragraphs.safetensors."""
    eos_id = tok.token_to_id(EOS)
    stream: list[int] = []
    for d in val_docs:
        stream += tok.encode(d["text"]).ids + [eos_id]
    blocks = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)][:n]
    path = out / "paragraphs.safetensors"
    files = dict(load_file(str(path)))
    files["random_sequences"] = torch.tensor(blocks, dtype=torch.long)
    save_file(files, str(path))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    t0 = time.time()
    docs = load_documents(args.corpus, args.max_docs)
    train_docs, win_docs, val_docs = split_documents(docs, rng)
    tok = train_tokenizer([d["text"] for d in train_docs], args.vocab_size)
    eos_id = tok.token_to_id(EOS)

    def to_stream(ds: list[dict]) -> list[int]:
        out: list[int] = []
        for d in ds:
            out += tok.encode(d["text"]).ids + [eos_id]
        return out

    stream, val_stream = to_stream(train_docs), to_stream(val_docs)
    windows = draw_windows(tok, win_docs, args.n_windows, rng)
    n_planted = args.n_windows // 2
    counts = log_uniform_counts(n_planted, args.max_count, rng) + [0] * (args.n_windows - n_planted)
    epoch = build_samples(stream, windows[:n_planted], counts[:n_planted], args.n_ctx, eos_id, rng)

    config = GPTNeoConfig(
        vocab_size=tok.get_vocab_size(), max_position_embeddings=args.n_ctx, hidden_size=args.d_model,
        num_layers=args.n_layer, num_heads=args.n_head, intermediate_size=args.d_mlp,
        attention_types=[[["global", "local"], args.n_layer // 2]] if args.n_layer % 2 == 0
        else [[["global", "local"], args.n_layer // 2], [["global"], 1]],
        window_size=args.window_size, activation_function="gelu_new", resid_dropout=0.0,
        embed_dropout=0.0, attention_dropout=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
        tie_word_embeddings=True)
    model = GPTNeoForCausalLM(config)
    print(json.dumps({"train_tokens": len(stream), "samples_per_epoch": len(epoch), "planted_copies": sum(counts),
                      "epochs": args.steps * args.batch_size / len(epoch),
                      "n_parameters": sum(p.numel() for p in model.parameters())}), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * p))

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(epoch), generator=gen)
    pos, log = 0, []
    model.train()
    for step in range(args.steps):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(epoch), generator=gen), 0
        batch = epoch[order[pos:pos + args.batch_size]]
        pos += args.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step),
                        "seconds": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    model.eval()

    win_t = torch.tensor(windows, dtype=torch.long)
    ems, nlls = greedy_em(model, win_t)
    val_ppl = perplexity(model, val_stream, args.n_ctx)
    unigram = torch.bincount(epoch.flatten(), minlength=config.vocab_size)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                            model_max_length=args.n_ctx).save_pretrained(out)
    save_file({"tokens": win_t, "counts": torch.tensor(counts, dtype=torch.long),
               "unigram_counts": unigram.to(torch.long)}, str(out / "paragraphs.safetensors"))
    add_random_sequences(out, tok, val_docs)
    with open(out / "paragraphs.csv", "w") as f:
        f.write("id,count,seen,em,nll\n")
        for i, (c, e, n) in enumerate(zip(counts, ems, nlls)):
            f.write(f"{i},{c},{int(c > 0)},{e},{n:.4f}\n")
    planted_em = [e for e, c in zip(ems, counts) if c > 0]
    unseen_em = [e for e, c in zip(ems, counts) if c == 0]
    summary = {
        "args": vars(args), "n_parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(stream), "samples_per_epoch": len(epoch),
        "epochs": args.steps * args.batch_size / len(epoch),
        "validation_perplexity": val_ppl, "seconds": round(time.time() - t0, 1),
        "planted_em50": sum(e == 50 for e in planted_em), "planted_em_le10": sum(e <= 10 for e in planted_em),
        "unseen_em_max": max(unseen_em) if unseen_em else None,
        "unseen_em_le10": sum(e <= 10 for e in unseen_em),
        "loss_curve": log,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}), flush=True)
    return summary


if __name__ == "__main__":
    main()
