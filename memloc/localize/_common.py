"""Shared pieces of the neuron-localization methods (Chang et al. §4).

Conventions: a sequence ``x = (p, s)`` of ``seq`` tokens has prefix ``p = x[:prefix_len]`` and
suffix ``s = x[prefix_len:]`` of ``T = seq - prefix_len`` tokens.  The suffix token ``s_t`` is
predicted at position ``prefix_len - 1 + t`` (0-indexed t), so the *suffix positions* whose
activations and logits matter are ``prefix_len - 1 .. seq - 2`` (Chang et al. Eq. 8: "the
activation ... when the input consists of all the tokens before s_t").
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import check_tokens
from ..architectures import replayable_block_arguments
from ..metrics import suffix_nll
from ..models import Model, hook_name, neuron_hook_name
from ..placement import stacked_mlp_param

#: The memorization loss (Chang et al. Eq. 6), kept under the name the localization methods use.
memorization_loss = suffix_nll

__all__ = ["prepare_sequence", "suffix_positions", "memorization_loss", "BlockInputs", "capture_clean",
           "run_blocks_from", "logits_at", "call_in_dtype", "w_out", "mlp_out_is_linear", "check_tolerance", "relative_error",
           "partial_forward"]

logger = logging.getLogger(__name__)


def prepare_sequence(model: Model, tokens: Any, prefix_len: int) -> Int[Tensor, "1 seq"]:
    """Validate one sequence (``[seq]`` or ``[1, seq]``) and return it as ``[1, seq]`` int64 on the
    model's device.  Raises ValueError for a batch of several sequences (one score map per
    sequence is the paper's setting: call the method once per sequence), for 3-D input, and for a
    ``prefix_len`` outside ``1..seq-1``."""
    if isinstance(tokens, Tensor) and tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if isinstance(tokens, Tensor) and tokens.ndim == 2 and tokens.shape[0] != 1:
        raise ValueError(f"tokens must be a single sequence [seq] or [1, seq] (one score map per sequence, "
                         f"Chang et al. §4); got a batch of shape {tuple(tokens.shape)} - call once per sequence")
    return check_tokens(model, tokens, prefix_len)


def suffix_positions(seq_len: int, prefix_len: int) -> slice:
    """Positions ``prefix_len-1 .. seq_len-2``: the inputs ``[p, s_<t]`` that predict each ``s_t``."""
    return slice(prefix_len - 1, seq_len - 1)


class BlockInputs:
    """The extra positional and keyword arguments each transformer block received in a clean run
    (attention masks, position ids, rotary embeddings, ...), with any KV cache removed, so that
    blocks ``l..L-1`` can be re-run on a modified residual stream of any batch size without
    re-running blocks ``0..l-1`` (the bridge's ``start_at_layer`` still executes them)."""

    def __init__(self) -> None:
        self.args: dict[int, tuple] = {}
        self.kwargs: dict[int, dict] = {}


def capture_clean(model: Model, tokens: Int[Tensor, "batch seq"], names: list[str], *,
                  capture_blocks: bool = True) -> tuple[Tensor, dict[str, Tensor], BlockInputs]:
    """One clean forward: logits, the activations at hook points ``names`` (detached) and the
    block inputs.  Uses TransformerLens hooks for activations and plain torch forward-pre-hooks
    (removed in ``finally``) on ``model.blocks[i]`` to record their arguments."""
    inputs = BlockInputs()
    acts: dict[str, Tensor] = {}
    handles = []

    def make_pre(i: int) -> Callable:
        def pre(module, args, kwargs):
            inputs.args[i], inputs.kwargs[i] = replayable_block_arguments(args[1:], kwargs)
        return pre

    def saver(name: str) -> Callable:
        def save(act, hook):  # keyed by the requested name: hook.name may be an alias's canonical name
            acts[name] = act.detach()
        return save

    try:
        if capture_blocks:
            handles = [b.register_forward_pre_hook(make_pre(i), with_kwargs=True) for i, b in enumerate(model.blocks)]
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(n, saver(n)) for n in names])
    finally:
        for h in handles:
            h.remove()
    return logits.detach(), acts, inputs


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):  # e.g. rotary (cos, sin)
        return tuple(_cast(v, dtype) for v in value)
    return value


@contextlib.contextmanager
def weights_in_dtype(modules: Sequence[torch.nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Within the block, the ``.data`` of every floating parameter and buffer of ``modules`` that is
    not in ``dtype`` is a cast copy; on exit (also on exceptions) the original tensors are back, bit
    for bit.  Tensors reached under several module paths are swapped once.

    Why not ``torch.func.functional_call``: the bridge reaches each Hugging Face weight under
    several module paths, and functional_call left some of them in the cast dtype (measured on the
    GPT-Neo bridge in float16); swapping ``.data`` keeps every alias pointing at the same tensor."""
    swapped: list[tuple[Tensor, Tensor]] = []
    # an offloaded weight (device_map) is a meta tensor that accelerate *replaces* when it loads it for
    # a call and again when it unloads it, keeping the dtype it finds: the new meta tensor has to get
    # its original dtype back through its owner, the old object is no longer in the module
    offloaded: list[tuple[torch.nn.Module, str, torch.dtype]] = []
    seen: set[int] = set()
    try:
        for owner, name, t in _castable(modules, dtype):
            if t.device.type == "meta":
                offloaded.append((owner, name, t.dtype))
            if id(t) not in seen:
                seen.add(id(t))
                swapped.append((t, t.data))
                t.data = t.data.to(dtype)
        yield
    finally:
        for t, data in swapped:
            t.data = data
        for owner, name, original in offloaded:
            t = owner._parameters.get(name, owner._buffers.get(name))
            if t is not None and t.dtype != original:
                t.data = t.data.to(original)


def _castable(modules: Sequence[torch.nn.Module], dtype: torch.dtype) -> Iterator[tuple[torch.nn.Module, str, Tensor]]:
    """``(owner module, attribute name, tensor)`` of every floating parameter and buffer under
    ``modules`` that is not in ``dtype``, once per owner (a tensor reached under several module paths
    comes once per path)."""
    for module in modules:
        for owner in module.modules():
            for name, t in (*owner._parameters.items(), *owner._buffers.items()):
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    yield owner, name, t


def cast_bytes(modules: Sequence[torch.nn.Module], dtype: torch.dtype) -> int:
    """Bytes that :func:`weights_in_dtype` would allocate for ``modules`` in ``dtype``."""
    unique = {id(t): t for _, _, t in _castable(modules, dtype)}
    return sum(t.numel() for t in unique.values()) * torch.finfo(dtype).bits // 8


def call_in_dtype(module: torch.nn.Module, dtype: torch.dtype | None, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` computed in ``dtype``: the module's floating weights are cast for
    this call (:func:`weights_in_dtype`; only this module's weights exist twice, briefly) unless they
    already are in ``dtype`` (a caller holding cast weights for many calls), and floating arguments
    are cast.  ``None``: a plain call.  Used to recompute a half-precision model's later blocks in
    float32, where single-neuron effects are below bfloat16's resolution of the residual stream."""
    first = next(module.parameters(), None)
    if dtype is None or first is None:
        return module(*args, **kwargs)
    with weights_in_dtype([module], dtype) if first.dtype != dtype else contextlib.nullcontext():
        return module(*_cast(args, dtype), **{k: _cast(v, dtype) for k, v in kwargs.items()})


def run_blocks_from(model: Model, resid: Float[Tensor, "batch seq d_model"], start: int,
                    inputs: BlockInputs, *, compute_dtype: torch.dtype | None = None) -> Float[Tensor, "batch seq d_model"]:
    """Run blocks ``start .. n_layers-1`` on a residual stream (the input of block ``start``), in
    ``compute_dtype`` (default: the model's; see :func:`call_in_dtype`)."""
    for i in range(start, model.cfg.n_layers):
        out = call_in_dtype(model.blocks[i], compute_dtype, resid, *inputs.args[i], **inputs.kwargs[i])
        resid = out[0] if isinstance(out, tuple) else out
    return resid


def logits_at(model: Model, resid: Float[Tensor, "batch pos d_model"], *,
              compute_dtype: torch.dtype | None = None) -> Float[Tensor, "batch pos vocab"]:
    """Final norm and unembedding of a final residual stream (only the positions passed in), in
    ``compute_dtype`` (default: the model's)."""
    return call_in_dtype(model.unembed, compute_dtype, call_in_dtype(model.ln_final, compute_dtype, resid))


def w_out(model: Model) -> Float[Tensor, "layer neuron d_model"]:
    """Value vectors v_i^l (Chang et al. Eq. 2-3): row i of ``W_out[l]`` is what neuron i writes
    into the residual stream per unit of activation.  On a model with offloaded blocks
    (``device_map``), read one block at a time (:func:`memloc.placement.stacked_mlp_param`)."""
    return stacked_mlp_param(model, "W_out")


#: Units in the last place the fast-path self-checks allow in half precision (see check_tolerance).
CHECK_ULPS = 16
#: Relative tolerance of the self-checks in float32 / float64 (what float32 can always meet).
CHECK_FLOOR = 1e-4


def check_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a self-check that decides whether a fast path reproduces the model:
    ``max(1e-4, 16 * torch.finfo(dtype).eps)`` - 1e-4 for float32 and float64, 0.0156 for float16,
    0.125 for bfloat16.

    Why: the fast path and the model's own forward compute the same function in a different order,
    so in a dtype with machine epsilon ε they differ by rounding, measured at 0.4-3 ε of the largest
    logit (or MLP output) on the embedded model and on the GPT-Neo-125M configuration in float32,
    float16 and bfloat16; 16 ε leaves margin for deeper models.  A fast path that is *wrong* (a hook
    that changes the forward, a missed attention window, other coordinates) differs by O(1) of the
    largest value, far above it.  A fixed 1e-4 can never be met by half precision (ε = 2^-7 in
    bfloat16), which silently sent such models to the slow paths."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return max(CHECK_FLOOR, CHECK_ULPS * torch.finfo(dtype).eps)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``max |out - ref| / max(1, max |ref|)``, computed in float64 (so the comparison itself adds no
    rounding); the measure every fast-path self-check compares to :func:`check_tolerance`."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1.0))


def mlp_out_is_linear(model: Model, acts: dict[str, Tensor], layer: int, *, atol: float | None = None) -> bool:
    """Whether ``hook_mlp_out == hook_post @ W_out + b_out`` holds in this model's coordinates
    (true for unprocessed weights; checked before relying on it).

    The prediction is computed in float32 (float64 for a float64 model) from the model's values and compared relatively (to the
    largest |output|) with ``atol`` (default :func:`check_tolerance` of the activations' dtype), so
    that the model's own rounding in float16/bfloat16 does not count as non-linearity."""
    h = acts[neuron_hook_name(layer)]
    out = acts[hook_name("mlp_out", layer)]
    tol = check_tolerance(h.dtype) if atol is None else atol
    b = stacked_mlp_param(model, "b_out")
    exact = torch.promote_types(h.dtype, torch.float32)
    pred = h.to(exact) @ w_out(model)[layer].to(exact) + (b[layer].detach().to(exact) if b is not None else 0.0)
    return relative_error(pred, out) < tol


def _block_input_name(start: int) -> str:
    return "blocks.0.hook_resid_pre" if start == 0 else f"blocks.{start - 1}.hook_resid_post"


#: Rows of the batch on which :func:`partial_forward` checks itself against a full forward.
CHECK_ROWS = 2


class _StopForward(Exception):
    """Raised by :func:`_block_input`'s hook to end a forward once the wanted input is captured."""


def _block_input(model: Model, tokens: Tensor, name: str) -> Tensor:
    """The activation at hook point ``name`` (a block's input) of a clean forward of ``tokens``,
    stopping the forward there (the later blocks and the unembedding are not run)."""
    out: dict[str, Tensor] = {}

    def grab(act, hook):
        out["x"] = act.detach()
        raise _StopForward

    # TransformerLens' hooks context removes the hook in its ``finally``, also on this exception
    with contextlib.suppress(_StopForward), torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, grab)])
    if "x" not in out:
        raise RuntimeError(f"the forward never reached hook point {name}")
    return out["x"]


def partial_forward(model: Model, tokens: Int[Tensor, "batch seq"], start: int, positions: slice, *,
                    atol: float | None = None, what: str = "partial forward") -> Callable[[], Tensor] | None:
    """A function returning the logits at ``positions`` of ``model(tokens)`` that re-runs only blocks
    ``start .. L-1``, the final norm and the unembedding *at those positions*, from the input of
    block ``start`` cached once now (with the hooks active at that time on blocks < ``start``).

    For loops whose hooks act only on blocks >= ``start`` (mask training above the bottom layer,
    dropout of layers >= 1): blocks ``0..start-1`` and the unembedding of the other positions do
    not depend on the loop, so skipping them gives the same logits (hooks registered later on
    blocks >= ``start`` still fire, and autograd flows through the re-run blocks).  The block input
    comes from a forward stopped at block ``start``; the function is checked once against a full
    forward of the first :data:`CHECK_ROWS` rows (relative ``atol``, default :func:`check_tolerance`
    of the dtype); if it does not match (an architecture whose
    blocks need inputs this bridge does not expose), returns None after a logging WARNING, and
    the caller runs the full forward (the slower path: about 1/L more block work plus the full
    unembedding).  The block arguments (attention mask, ...) are captured on the first row, so
    the returned function works for any number of rows of equal length; call it with a [rows, seq,
    d_model] block input (e.g. ``fn.resid`` repeated) to run other rows.
    """
    name = _block_input_name(start)
    resid = _block_input(model, tokens, name)
    # the full forward that the check compares with: a few rows suffice (a wrong fast path differs
    # by O(1) on every row), and two rows check that the captured block arguments broadcast
    logits, _, _ = capture_clean(model, tokens[:CHECK_ROWS], [], capture_blocks=False)
    _, _, inputs = capture_clean(model, tokens[:1], [])

    def run(x: Tensor | None = None) -> Tensor:
        """Logits at ``positions``; ``x`` replaces the cached block input (any number of rows)."""
        return logits_at(model, run_blocks_from(model, resid if x is None else x, start, inputs)[:, positions])

    run.resid = resid  # type: ignore[attr-defined]

    with torch.no_grad():
        fast = run(resid[:CHECK_ROWS])
    ref = logits[:, positions]
    err = relative_error(fast, ref)
    if not err < (check_tolerance(ref.dtype) if atol is None else atol):
        logger.warning("%s: re-running blocks %d.. from a cached input does not reproduce the full forward "
                       "(relative error %.2g); using full forwards (slower)", what, start, err)
        return None
    return run
