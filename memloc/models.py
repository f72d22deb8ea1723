"""Loading models through TransformerLens 4 and the facts memloc needs about them.

Every memloc function takes a ``TransformerBridge`` in compatibility mode, i.e. with the
HookedTransformer hook names (``blocks.{l}.mlp.hook_post``, ``blocks.{l}.attn.hook_pattern``, ...).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import weakref
from importlib import resources
from pathlib import Path
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

# TransformerLens 4.3's bridge hands the KV cache to Hugging Face as `past_key_values`, which
# transformers >= 5.2x deprecates in favour of `cache` (a FutureWarning on every cached forward,
# e.g. each greedy decoding step).  The keyword is TransformerLens's choice, not the user's or
# memloc's, so this one message is not shown; every other warning is.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated and will be removed",
                        category=FutureWarning)

__all__ = ["Model", "TINY_NAMES", "tiny_model_dir", "load_model", "fuse_gelu", "model_facts", "model_device",
           "hook_name", "neuron_hook_name", "layer_hooks"]

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    #: The model every memloc function takes: a TransformerLens 4 ``TransformerBridge`` in compatibility mode.
    Model = TransformerBridge
else:
    class _LazyBridgeType(type):
        """``isinstance(x, Model)`` is ``isinstance(x, TransformerBridge)``, resolved on first use so that
        ``import memloc`` does not import TransformerLens (tens of seconds on a loaded machine)."""

        def __instancecheck__(cls, obj: object) -> bool:
            from transformer_lens.model_bridge import TransformerBridge

            return isinstance(obj, TransformerBridge)

        def __subclasscheck__(cls, sub: type) -> bool:
            from transformer_lens.model_bridge import TransformerBridge

            return issubclass(sub, TransformerBridge)

    class Model(metaclass=_LazyBridgeType):
        """The model every memloc function takes: TransformerLens's ``TransformerBridge`` (in
        compatibility mode).  For type checkers this *is* ``TransformerBridge``; at run time it is a
        stand-in whose ``isinstance`` check imports TransformerLens lazily (runtime type checks such
        as beartype's use it)."""

#: Names that select the embedded model shipped inside the package.
TINY_NAMES = (None, "tiny")

#: The arguments each model returned by :func:`load_model` was loaded with (weakly keyed, the
#: model object itself is not touched); :func:`load_args` reads them back so that workers in
#: other processes (the Ray executor, memloc.executors) can load the same model.
_LOAD_ARGS: "weakref.WeakKeyDictionary[Model, dict]" = weakref.WeakKeyDictionary()


def load_args(model: Model) -> dict | None:
    """The keyword arguments of the :func:`load_model` call that returned ``model`` (``name_or_path``,
    ``device``, ``dtype``, ``process_weights``, ``fused_gelu`` and the placement ones), or None for a
    model built another way."""
    return _LOAD_ARGS.get(model)


def tiny_model_dir() -> Path:
    """Directory of the embedded model (weights, config, tokenizer, paragraph set)."""
    return Path(str(resources.files("memloc") / "assets" / "tiny"))


def _looks_like_path(name: str | os.PathLike) -> bool:
    """A path, not a hub id: a PathLike, or a string starting with ``.``, ``/``, ``~`` or a drive,
    holding a backslash, more than one ``/``, or ending in ``/`` (hub ids are ``name`` or
    ``namespace/name``)."""
    if not isinstance(name, str):
        return True
    return (name.startswith((".", "/", "~", "\\")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
            or (len(name) > 1 and name[1] == ":"))


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None if it can: ``HF_HUB_OFFLINE`` is set,
    or one TCP connection to the hub endpoint fails (or takes longer than ``timeout`` seconds).
    The probe runs in a daemon thread, so a hanging name lookup cannot stall the caller."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES",
                                                                                             "TRUE"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=probe, name="memloc-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome.get("ok"):
        return None
    err = outcome.get("error")
    return f"cannot connect to {host}:{port} ({err or f'no answer within {timeout:g} s'})"


def _cached_on_disk(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the cache does not accept: not cached
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face offline mode for one load (the hub is unreachable but the model is cached), so
    transformers reads the cache at once instead of retrying the network."""
    from huggingface_hub import constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


@contextlib.contextmanager
def _loading_bars(enabled: bool) -> Iterator[None]:
    """Hide transformers' ``Loading weights`` bar while loading when memloc's progress bars are off."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _check_placement(device: Any, device_map: Any, max_memory: Any, offload_folder: Any,
                     process_weights: bool) -> None:
    """ValueError, before any loading, for placement arguments that cannot go together."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder only apply with device_map (e.g. device_map='auto')")
        return
    if device is not None:
        raise ValueError(f"device and device_map exclude each other (got device={device!r} and device_map="
                         f"{device_map!r}); pass device_map alone to place a model across devices")
    if not isinstance(device_map, (str, dict)):
        raise ValueError(f"device_map must be a string such as 'auto' or a dict from module name to device, "
                         f"got {type(device_map).__name__}")
    if process_weights:
        raise ValueError("process_weights=True cannot be combined with device_map: TransformerLens folds and "
                         "centers weights only on a model held on one device; keep process_weights=False")
    if isinstance(device_map, dict) and "disk" in {str(v).lower() for v in device_map.values()} \
            and offload_folder is None:
        raise ValueError("device_map offloads modules to 'disk': pass offload_folder=DIR for their weights")


def _offline_message(target: str, reason: str) -> str:
    return (f"could not load model {target!r} from the Hugging Face hub: {reason}, and it is not in the local "
            "Hugging Face cache. If this machine is offline, download the model elsewhere and pass its local "
            "directory, or use load_model('tiny') for the embedded model.")


def load_model(name_or_path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32, process_weights: bool = False,
               device_map: str | dict[str, str | int] | None = None,
               max_memory: dict[str | int, str | int] | None = None,
               offload_folder: str | os.PathLike | None = None, fused_gelu: bool = True) -> Model:
    """Load a model as a TransformerLens 4 ``TransformerBridge`` in compatibility mode.

    (Over 80 lines through this docstring and the distinct, early error messages for a missing
    path, a directory without config.json and an unreachable hub, each a newcomer's first step.)

    Args:
        name_or_path: ``None`` or ``"tiny"`` for the embedded model (package data, no network);
            a local Hugging Face directory (loaded offline); or a hub name (needs the hub, or
            the model in the local Hugging Face cache).
        device: ``"cpu"``, ``"cuda"``, ... (default: CPU).
        dtype: parameter dtype.
        process_weights: if False (default), weights stay in the checkpoint's coordinates
            (``enable_compatibility_mode(no_processing=True)``), so parameter gradients refer to
            the real weights; if True, LayerNorm is folded and weights centered as in
            HookedTransformer. Neuron activations (``mlp.hook_post``) are the same either way.
        device_map: a model too large for one device: Hugging Face's placement (``"auto"``,
            ``"balanced"``, or a dict from module name to ``"cuda:N"`` / N / ``"cpu"`` / ``"disk"``),
            handed to TransformerLens's ``boot_transformers`` and from there to accelerate (memloc
            has no sharding scheme of its own).  Excludes ``device``.  TransformerLens 4.3 accepts
            all-GPU maps and all-CPU/disk maps, and refuses a map that mixes a GPU with CPU/disk
            offload.  Which memloc paths hold on such a model: README, "Beyond one GPU".
        max_memory: per-device budget for ``device_map="auto"`` (e.g. ``{0: "20GiB", "cpu": "64GiB"}``).
        offload_folder: where accelerate writes the weights a ``"disk"`` entry offloads.
        fused_gelu: replace Hugging Face's ``gelu_new`` (GPT-2, GPT-Neo, GPT-J: five element-wise
            tensor ops in Python) by its fused equivalent ``gelu_pytorch_tanh`` (:func:`fuse_gelu`):
            the same formula, 4.5x faster forward and backward on CPU, outputs within float32
            rounding (max 2.4e-7 measured).  False keeps Hugging Face's module.

    Returns:
        The bridge, in eval mode.

    Raises:
        ValueError: before any loading if ``name_or_path`` looks like a path (``./x``, ``/x``,
            ``~/x``, ``a/b/c``, a ``PathLike``) that is not a directory ("no such directory"), is a
            directory without ``config.json``, or is a file; for a hub name, within a few seconds
            if the hub is unreachable (``HF_HUB_OFFLINE`` set, or one failed connection) and the
            model is not cached, and otherwise if the hub cannot provide it.
    """
    if not isinstance(fused_gelu, bool):
        raise ValueError(f"fused_gelu must be True or False, got {fused_gelu!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype must be a floating torch dtype (torch.float32, torch.bfloat16, torch.float16 or "
                         f"torch.float64), got {dtype!r}")
    _check_placement(device, device_map, max_memory, offload_folder, process_weights)
    device = str(device) if device is not None else ("cpu" if device_map is None else None)
    placement = {} if device_map is None else {
        "device_map": device_map, "max_memory": max_memory,
        "offload_folder": None if offload_folder is None else os.fspath(offload_folder)}
    offline = False
    if name_or_path in TINY_NAMES:
        path = tiny_model_dir()
        if not (path / "model.safetensors").exists():
            raise ValueError(f"the embedded model is missing from {path}; reinstall memloc")
        target = str(path)
    else:
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise ValueError(f"name_or_path must be 'tiny', a model directory or a hub name, got "
                             f"{type(name_or_path).__name__}")
        target = os.fspath(name_or_path)
        local = Path(target).expanduser()
        if local.is_dir():
            if not (local / "config.json").exists():
                raise ValueError(f"name_or_path {target!r} is a directory without a config.json; "
                                 "expected a saved Hugging Face model directory (save_pretrained)")
            target = str(local)
        elif local.exists():
            raise ValueError(f"name_or_path {target!r} is a file; expected a model directory or hub name")
        elif _looks_like_path(name_or_path):
            raise ValueError(f"name_or_path {target!r}: no such directory ({local.resolve()}); expected a saved "
                             "Hugging Face model directory, a hub name such as 'EleutherAI/gpt-neo-125M', or "
                             "'tiny' for the embedded model")
        else:
            reason = hub_offline_reason()
            if reason is not None:
                if not _cached_on_disk(target):
                    raise ValueError(_offline_message(target, reason))
                logger.warning("the Hugging Face hub is unreachable (%s): loading %s from the local cache",
                               reason, target)
                offline = True
    from transformer_lens.model_bridge import TransformerBridge

    from ._progress import progress_enabled

    try:
        with _hub_offline() if offline else contextlib.nullcontext(), _loading_bars(progress_enabled()):
            bridge = TransformerBridge.boot_transformers(target, device=device, dtype=dtype, **placement)
    except Exception as exc:  # network or hub errors come in many types
        if Path(target).is_dir():
            raise
        raise ValueError(
            f"could not load model {target!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "If this machine is offline, download the model elsewhere and pass its local directory, "
            "or use load_model('tiny') for the embedded model.") from exc
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not process_weights)
    bridge.eval()
    if fused_gelu:
        fuse_gelu(bridge)
    # a local directory is recorded as an absolute path (workers may run in another directory)
    recorded = None if name_or_path in TINY_NAMES else (str(Path(target).resolve()) if Path(target).is_dir() else target)
    _LOAD_ARGS[bridge] = {"name_or_path": recorded,
                          "device": device, "dtype": dtype, "process_weights": bool(process_weights),
                          "fused_gelu": fused_gelu}
    _LOAD_ARGS[bridge].update(placement)  # a device_map load is replayed with its placement (Ray workers)
    alias_kv_cache_kwarg(bridge)
    return bridge


#: Hugging Face's name of the fused equivalent of ``gelu_new`` (same function, one kernel).
_FUSED_GELU = "gelu_pytorch_tanh"


def fuse_gelu(bridge: Model) -> int:
    """Replace every Hugging Face ``NewGELUActivation`` (``gelu_new``) under ``bridge`` by
    ``GELUTanh`` (``gelu_pytorch_tanh``) and record the new name in the Hugging Face and
    TransformerLens configs; returns the number of modules replaced.

    Both compute GELU's tanh approximation 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))); the original
    does it in five element-wise tensor ops written in Python (each with its own autograd node),
    the replacement in one fused PyTorch kernel (``F.gelu(approximate="tanh")``).  Measured on
    [64, 128, 1024] float32, 2 CPU threads: forward 98 → 22 ms, forward + backward 217 → 48 ms;
    largest output difference 2.4e-7 (float32 rounding).  On the embedded model the activation
    was 12 % of a whole ``memloc reproduce`` run.  Part of building a model in :func:`load_model`
    (``fused_gelu=False`` keeps Hugging Face's module); a model built elsewhere is changed in
    place, so call it only on a model you own.
    """
    from transformers.activations import ACT2FN, NewGELUActivation

    from .architectures import hf_config

    parents = [(parent, name) for parent in bridge.modules() for name, child in parent.named_children()
               if type(child) is NewGELUActivation]
    for parent, name in parents:
        setattr(parent, name, ACT2FN[_FUSED_GELU])
    if parents:
        for cfg in (hf_config(bridge), getattr(bridge, "cfg", None)):
            for key in ("activation_function", "act_fn"):
                if getattr(cfg, key, None) == "gelu_new":
                    setattr(cfg, key, _FUSED_GELU)
        logger.info("fuse_gelu: %d gelu_new modules now %s", len(parents), _FUSED_GELU)
    return len(parents)


def _cache_alias_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


def alias_kv_cache_kwarg(bridge: Model) -> int:
    """Make the bridge's attention components see the KV cache under its new name.

    Hugging Face transformers 5.x renamed the cache argument of migrated architectures (Llama,
    ...) from ``past_key_values`` to ``cache``: their decoder layers call the attention with
    ``cache=``, while TransformerLens 4.3's attention bridges read only ``past_key_values`` /
    ``layer_past``, so the cache stayed empty and every cached step attended to itself alone
    (greedy decoding of SmolLM2 repeated one token; IG's KV-cache self-check failed).  A
    forward pre-hook on each attention bridge copies ``cache`` to ``past_key_values``; it is a
    no-op for architectures that still pass ``past_key_values`` (GPT-2, GPT-Neo).  Installed
    once by :func:`load_model` (part of building the bridge); returns the number of components
    hooked (0 if already installed).
    """
    if getattr(bridge, "_memloc_cache_alias", None):
        return 0
    handles = [module.register_forward_pre_hook(_cache_alias_hook, with_kwargs=True)
               for module in bridge.modules() if hasattr(module, "_update_kv_cache")]
    bridge._memloc_cache_alias = handles  # the hook handles (removable)
    return len(handles)


@contextlib.contextmanager
def kv_cache_kwarg_aliased(bridge: Model) -> Iterator[None]:
    """:func:`alias_kv_cache_kwarg` for the duration of a block, for bridges not built by
    :func:`load_model` (which installs it for good): hooks installed here are removed on exit, also
    on exceptions, so a borrowed model is handed back unchanged.  A no-op when already installed."""
    installed = alias_kv_cache_kwarg(bridge)
    try:
        yield
    finally:
        if installed:
            for handle in bridge._memloc_cache_alias:
                handle.remove()
            bridge._memloc_cache_alias = None


def model_facts(model: Model) -> dict:
    """Architecture facts: family, layers, heads, d_model, d_mlp, d_head, n_ctx, vocabulary, gating."""
    cfg = model.cfg
    hf_cfg = getattr(model.original_model, "config", None)
    return {
        "architecture": getattr(cfg, "original_architecture", None) or type(model.original_model).__name__,
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "n_key_value_heads": int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        "d_model": int(cfg.d_model),
        "d_head": int(cfg.d_head),
        "d_mlp": int(cfg.d_mlp),
        "n_ctx": int(cfg.n_ctx),
        "d_vocab": int(cfg.d_vocab),
        "gated_mlp": bool(getattr(cfg, "gated_mlp", False)),
        "attention_layers": list(getattr(hf_cfg, "attention_layers", []) or []),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype),
    }


def model_device(model: Model) -> torch.device:
    return next(model.parameters()).device


def hook_name(kind: str, layer: int | None = None) -> str:
    """The TransformerLens hook-point name of activation ``kind`` in ``layer``: TransformerLens's own
    ``get_act_name`` (``hook_name("post", 2) == "blocks.2.mlp.hook_post"``, ``"pattern"`` ->
    ``blocks.{l}.attn.hook_pattern``, ``"resid_pre"`` -> ``blocks.{l}.hook_resid_pre``, ...).  These
    are the HookedTransformer names the bridge keeps in compatibility mode.  Every hook name memloc
    uses is built here."""
    from transformer_lens.utilities import get_act_name  # lazy: a model (hence TransformerLens) exists

    return get_act_name(kind, layer)


def neuron_hook_name(layer: int) -> str:
    """Hook point of the FFN neurons h^l (Chang et al. Eq. 1): the MLP's post-activation, which for
    gated MLPs is the input of the down-projection."""
    return hook_name("post", layer)


def layer_hooks(kind: str, layers: Iterable[int], fn: Callable[..., Any]) -> list[tuple[str, Callable[..., Any]]]:
    """``[(hook_name(kind, l), fn with layer=l bound), ...]`` for ``model.hooks``/``run_with_hooks``.

    ``fn(act, hook, *, layer)`` receives the layer it is attached to as an argument (bound with
    ``functools.partial``), so no hook function has to parse the layer out of ``hook.name`` (which
    may be an alias's canonical name on the bridge)."""
    return [(hook_name(kind, int(l)), partial(fn, layer=int(l))) for l in layers]
