"""Add the embedded model's held-out validation text to its paragraph file (for Rand-PPL).

Re-derives the seeded document split of ``train_tiny.py`` and stores ``random_sequences``:
[n, 100] blocks of the validation documents, tokenized with the shipped tokenizer.
``train_tiny.py`` calls :func:`add_random_sequences` itself; this script exists for models
trained before it did.  Usage: ``python scripts/make_tiny_extras.py [--out memloc/assets/tiny]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent


def _train_module():
    spec = importlib.util.spec_from_file_location("train_tiny", HERE / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> None:
    mod = _train_module()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE.parent / "memloc/assets/tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default=str(HERE.parent / "data/corpus/corpus.jsonl.xz"))
    args = ap.parse_args(argv)
    docs = mod.load_documents(args.corpus, None)
    _, _, val = mod.split_documents(docs, random.Random(args.seed))
    tok = Tokenizer.from_file(str(Path(args.out) / "tokenizer.json"))
    mod.add_random_sequences(Path(args.out), tok, val)


if __name__ == "__main__":
    main()
