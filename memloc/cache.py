"""One content-addressed cache for memloc: reproduce's stage results and the benchmarks' scores.

An entry's address is a digest of everything that determines its value: the model's weights
(:func:`model_fingerprint`), the data, the settings and the code that computes it
(:func:`code_version`).  A changed input is a new address, so entries are never invalidated,
only left behind (delete the directory to reclaim space).

Storage, without pickle:

* tensors: safetensors files whose metadata repeats the key parts, checked on read
  (:meth:`ContentCache.load_tensors` / :meth:`ContentCache.save_tensors`; the benchmarks'
  attribution-score cache, :func:`memloc.benchmarks.localize_cached`);
* structured results (dataclasses of DataFrames, tensors, numbers, lists and dicts): one directory
  per entry with ``manifest.json`` (the structure), ``tensors.safetensors`` (tensors and numpy
  arrays) and one parquet file per DataFrame (:meth:`ContentCache.load` / :meth:`ContentCache.save`;
  :mod:`memloc.reproduce`).  Only dataclasses defined in ``memloc`` are rebuilt.

Writes go to a temporary name and are renamed into place, so a killed run leaves no half entry;
an unreadable entry is recomputed with a WARNING.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .models import Model

logger = logging.getLogger(__name__)

__all__ = ["ContentCache", "model_fingerprint", "digest", "code_version", "tensor_bytes"]


def tensor_bytes(t: Tensor) -> np.ndarray:
    """The raw bytes of a tensor (CPU, contiguous) as a uint8 array."""
    return t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy()


def model_fingerprint(model: Model) -> str:
    """Hash of every parameter's name, dtype, shape and bytes, and of the MLP activation's name:
    two models share it iff their weights are identical (an injected or fine-tuned model gets its
    own) and they compute the same activation (``load_model(fused_gelu=...)`` changes results at
    float32 rounding, so the two never share cached results)."""
    h = hashlib.blake2b(digest_size=16)
    from .architectures import hf_config

    act = getattr(hf_config(model), "activation_function", None)
    if act is not None:
        h.update(f"activation|{act}|".encode())
    for name, p in model.named_parameters():
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}".encode())
        h.update(tensor_bytes(p))
    return h.hexdigest()


def digest(*parts: Any, size: int = 16) -> str:
    """Hex digest of ``parts``: tensors and arrays by dtype, shape and bytes, strings as text,
    anything else as sorted JSON (``repr`` for what JSON cannot encode)."""
    h = hashlib.blake2b(digest_size=size)
    for p in parts:
        if isinstance(p, Tensor):
            h.update(f"tensor|{p.dtype}|{tuple(p.shape)}|".encode())
            h.update(tensor_bytes(p))
        elif isinstance(p, np.ndarray):
            h.update(f"ndarray|{p.dtype}|{p.shape}|".encode())
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, str):
            h.update(p.encode())
        else:
            h.update(json.dumps(p, sort_keys=True, default=repr).encode())
        h.update(b"\0")
    return h.hexdigest()


def code_version(*objects: Any) -> str:
    """Digest of the source of ``objects`` (functions, classes, modules) and memloc's version: the
    code part of a cache address."""
    from . import __version__

    parts = [__version__]
    for obj in objects:
        try:
            parts.append(inspect.getsource(obj))
        except (OSError, TypeError):  # no source (built-in, REPL): its qualified name
            parts.append(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}")
    return digest(*parts, size=8)


# ------------------------------------------------------------------------------------ encoding

class _Unencodable(TypeError):
    pass


class _Writer:
    """Turns a value into JSON-able structure, collecting tensors and DataFrames on the side."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.frames: list[pd.DataFrame] = []

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, (int, float)):
            return obj if not isinstance(obj, float) or np.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, np.generic):
            return self.encode(obj.item())
        if isinstance(obj, Tensor):
            key = f"t{len(self.tensors)}"
            self.tensors[key] = obj.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                return {"__list_array__": self.encode(obj.tolist())}
            key = f"t{len(self.tensors)}"
            self.tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
            return {"__ndarray__": key}
        if isinstance(obj, pd.Series):
            return {"__series__": self.encode(obj.to_frame(name=obj.name if obj.name is not None else 0))}
        if isinstance(obj, pd.DataFrame):
            return self._frame(obj)
        if isinstance(obj, Path):
            return {"__path__": str(obj)}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v) for v in obj]}
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v) for k, v in obj.items()}
            return {"__items__": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            cls = type(obj)
            if not cls.__module__.startswith("memloc"):
                raise _Unencodable(f"dataclass {cls.__module__}.{cls.__qualname__} is not memloc's")
            return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                    "fields": {f.name: self.encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}}
        raise _Unencodable(f"cannot store a {type(obj).__name__}")

    def _frame(self, df: pd.DataFrame) -> dict:
        # parquet wants unique string column names: store the labels in the manifest instead
        idx_names = list(df.index.names)
        flat = df.reset_index(drop=isinstance(df.index, pd.RangeIndex) and df.index.name is None)
        n_index = flat.shape[1] - df.shape[1]
        labels = list(flat.columns)
        flat.columns = [f"c{i}" for i in range(len(labels))]
        self.frames.append(flat)
        return {"__frame__": len(self.frames) - 1, "columns": self.encode([self._label(c) for c in labels]),
                "column_names": self.encode(list(df.columns.names)), "n_index": n_index,
                "index_names": self.encode(idx_names), "multi_columns": isinstance(df.columns, pd.MultiIndex)}

    def _label(self, label: Any) -> Any:
        return label.item() if isinstance(label, np.generic) else label


class _Reader:
    def __init__(self, root: Path, tensors: dict[str, Tensor]) -> None:
        self.root, self.tensors = root, tensors

    def decode(self, obj: Any) -> Any:
        if isinstance(obj, list):
            return [self.decode(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tensor__" in obj:
            return self.tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return self.tensors[obj["__ndarray__"]].numpy()
        if "__list_array__" in obj:
            return np.array(self.decode(obj["__list_array__"]), dtype=object)
        if "__series__" in obj:
            return self.decode(obj["__series__"]).iloc[:, 0]
        if "__frame__" in obj:
            return self._frame(obj)
        if "__path__" in obj:
            return Path(obj["__path__"])
        if "__tuple__" in obj:
            return tuple(self.decode(v) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {self._key(self.decode(k)): self.decode(v) for k, v in obj["__items__"]}
        if "__dataclass__" in obj:
            module, _, name = obj["__dataclass__"].partition(":")
            if not module.startswith("memloc"):
                raise ValueError(f"refusing to rebuild {obj['__dataclass__']}")
            cls = importlib.import_module(module)
            for part in name.split("."):
                cls = getattr(cls, part)
            return cls(**{k: self.decode(v) for k, v in obj["fields"].items()})
        return {k: self.decode(v) for k, v in obj.items()}

    @staticmethod
    def _key(k: Any) -> Any:
        return tuple(k) if isinstance(k, list) else k

    def _frame(self, spec: dict) -> pd.DataFrame:
        df = pd.read_parquet(self.root / f"frame{spec['__frame__']}.parquet")
        labels = [self._key(c) for c in self.decode(spec["columns"])]
        n = spec["n_index"]
        index_part, data = df.iloc[:, :n], df.iloc[:, n:].copy()
        data.columns = pd.MultiIndex.from_tuples(labels[n:]) if spec["multi_columns"] else pd.Index(labels[n:])
        if n:
            data.index = pd.MultiIndex.from_frame(index_part) if n > 1 else pd.Index(index_part.iloc[:, 0])
            data.index.names = self.decode(spec["index_names"])
        data.columns.names = self.decode(spec["column_names"])
        return data


# ------------------------------------------------------------------------------------ the cache

class ContentCache:
    """A directory of content-addressed entries: ``root/namespace/key`` (see the module docstring).

    Args:
        root: the cache directory (created on the first write).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, namespace: str, key: str, suffix: str = "") -> Path:
        """Where the entry ``key`` of ``namespace`` lives (``namespace`` may contain ``/``)."""
        safe = "/".join("".join(c if c.isalnum() or c in "-_." else "_" for c in part)
                        for part in namespace.split("/"))
        return self.root / safe / f"{key}{suffix}"

    # tensors with checked metadata (the score cache) ---------------------------------------
    @staticmethod
    def load_tensors(path: Path, metadata: Mapping[str, str]) -> dict[str, Tensor] | None:
        """The tensors stored at ``path`` if its metadata equals ``metadata``; else None (a
        WARNING when the file exists but is foreign or unreadable)."""
        if not path.exists():
            return None
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                stored = f.metadata() or {}
            if stored == dict(metadata):
                return load_file(str(path))
            logger.warning("cache entry %s holds other metadata; recomputing", path)
        except Exception as exc:  # a truncated or foreign file: recompute and overwrite
            logger.warning("could not read cache entry %s (%s); recomputing", path, exc)
        return None

    @staticmethod
    def save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
        """Write ``tensors`` with ``metadata`` to ``path`` atomically."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata))
        tmp.replace(path)

    # structured values (reproduce) ----------------------------------------------------------
    def load(self, namespace: str, key: str) -> tuple[bool, Any]:
        """``(True, value)`` for a stored entry, ``(False, None)`` when there is none or it is unreadable."""
        entry = self.path(namespace, key)
        manifest = entry / "manifest.json"
        if not manifest.exists():
            return False, None
        try:
            from safetensors.torch import load_file

            spec = json.loads(manifest.read_text())
            tensors = load_file(str(entry / "tensors.safetensors")) if (entry / "tensors.safetensors").exists() else {}
            return True, _Reader(entry, tensors).decode(spec["value"])
        except Exception as exc:  # truncated, foreign or from an incompatible version: recompute
            logger.warning("could not read cache entry %s (%s); recomputing", entry, exc)
            return False, None

    def save(self, namespace: str, key: str, value: Any) -> bool:
        """Store ``value``; False (with a WARNING, nothing written) if it holds something that
        cannot be stored without pickle."""
        from safetensors.torch import save_file

        writer = _Writer()
        try:
            spec = {"value": writer.encode(value)}
        except _Unencodable as exc:
            logger.warning("not caching %s/%s: %s", namespace, key, exc)
            return False
        entry = self.path(namespace, key)
        tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if writer.tensors:
                save_file(writer.tensors, str(tmp / "tensors.safetensors"))
            for i, df in enumerate(writer.frames):
                df.to_parquet(tmp / f"frame{i}.parquet", index=False)
            (tmp / "manifest.json").write_text(json.dumps(spec, sort_keys=True))
        except Exception as exc:  # e.g. a column parquet cannot hold
            shutil.rmtree(tmp, ignore_errors=True)
            logger.warning("not caching %s/%s: %s", namespace, key, exc)
            return False
        shutil.rmtree(entry, ignore_errors=True)
        tmp.rename(entry)
        return True

    def get_or_compute(self, namespace: str, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """``(value, hit)``: the stored value, or ``compute()`` stored under ``key``."""
        hit, value = self.load(namespace, key)
        if hit:
            return value, True
        value = compute()
        self.save(namespace, key, value)
        return value, False
