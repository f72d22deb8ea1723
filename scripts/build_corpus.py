"""Build the embedded model's training corpus from offline, permissively licensed text.

Sources (both under the Python Software Foundation License Version 2, see data/corpus/CORPUS.md):

* English prose: the reStructuredText sources of the Python 3.11 documentation, as shipped by
  Debian's ``python3.11-doc`` package (``/usr/share/doc/python3.11/html/_sources``).
* Code: the pure-Python standard library of the running CPython 3.11 interpreter.

The result is written to ``data/corpus/corpus.jsonl.xz`` (one JSON document per line with
``source``, ``path`` and ``text``) and its SHA-256 is printed; the committed file is the
reference copy, so the corpus is reproducible from the repository even where those packages
differ.  Usage::

    apt-get install python3.11-doc
    python scripts/build_corpus.py --out data/corpus/corpus.jsonl.xz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sysconfig
from pathlib import Path

DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
# Prose sections in a fixed order; ``library`` is the largest and is truncated by the budget.
DOC_SECTIONS = ["tutorial", "faq", "howto", "reference", "using", "extending", "library"]
CODE_PACKAGES = ["json", "email", "http", "logging", "unittest", "asyncio", "importlib",
                 "concurrent", "xml", "urllib", "collections", "sqlite3", "wsgiref"]


def _docs(budget: int) -> list[dict]:
    out, total = [], 0
    for section in DOC_SECTIONS:
        for path in sorted((DOC_ROOT / section).rglob("*.rst.txt")):
            text = path.read_text(encoding="utf-8", errors="replace")
            if len(text) < 2000:
                continue
            if total + len(text) > budget:
                return out
            out.append({"source": "python3.11-doc", "path": str(path.relative_to(DOC_ROOT)), "text": text})
            total += len(text)
    return out


def _code(budget: int) -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for pkg in CODE_PACKAGES:
        for path in sorted((stdlib / pkg).rglob("*.py")):
            if "test" in path.parts:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if len(text) < 2000:
                continue
            if total + len(text) > budget:
                return out
            out.append({"source": "cpython-3.11-stdlib", "path": str(path.relative_to(stdlib)), "text": text})
            total += len(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/corpus/corpus.jsonl.xz")
    ap.add_argument("--prose-chars", type=int, default=2_700_000)
    ap.add_argument("--code-chars", type=int, default=900_000)
    args = ap.parse_args()
    docs = _docs(args.prose_chars) + _code(args.code_chars)
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(args.out, "wb", preset=9) as f:
        f.write(payload)
    n_chars = sum(len(d["text"]) for d in docs)
    print(json.dumps({"documents": len(docs), "characters": n_chars,
                      "sha256_uncompressed": hashlib.sha256(payload).hexdigest()}))


if __name__ == "__main__":
    main()
