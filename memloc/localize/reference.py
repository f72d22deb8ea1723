"""The papers' slow loops: obviously-correct reference implementations of the localization
methods, written like the authors' code (terarachang/MemPi: ``fast_zero_out_vector``,
``integrated_gradients`` after EleutherAI knowledge-neurons).

They are not meant for analysis (use :mod:`memloc.localize`); they exist to verify the fast
implementations (the tests compare against them) and to time them (``memloc perf``).  Each runs
one full forward of the whole model per (layer, batch of masks) or per (layer, position), as the
papers describe, and works in any floating dtype: masks follow the activations' dtype, losses and
gradient sums are accumulated in float32 / float64, and scores come back as float32 on the CPU.
"""

from __future__ import annotations

import torch

from ..metrics import suffix_nll
from ..models import neuron_hook_name

__all__ = ["reference_loss", "reference_zero_out", "reference_integrated_gradients",
           "reference_attribution_patching"]


def reference_loss(model, tokens, prefix_len, fwd_hooks=()):
    """Chang et al. Eq. 6 per row: one full forward, mean NLL of the suffix (float32 or better)."""
    logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    # the loss itself is memloc's one implementation (suffix_nll, tested against F.cross_entropy on
    # the [batch, vocab, T] layout); what is "reference" here is the one-full-forward-per-mask loop
    return suffix_nll(logits[:, prefix_len - 1:-1], tokens[:, prefix_len:])


@torch.no_grad()
def reference_zero_out(model, tokens, prefix_len, *, layers=None, neurons=None, batch_size=64):
    """Eq. 7 as in the authors' ``fast_zero_out_vector``: for each layer and batch of neurons, one full
    forward of the whole model on copies of the sequence, copy b multiplied by a one-hot-zero mask
    on ``blocks.{l}.mlp.hook_post``.  ``neurons`` restricts the scored neurons (others stay NaN)."""
    tokens = tokens.reshape(1, -1)
    n_layers, d = model.cfg.n_layers, model.cfg.d_mlp
    layers = range(n_layers) if layers is None else layers
    neurons = torch.arange(d) if neurons is None else torch.as_tensor(neurons)
    base = reference_loss(model, tokens, prefix_len)[0]
    out = torch.full((n_layers, d), float("nan"))
    for l in layers:
        for i in range(0, len(neurons), batch_size):
            idx = neurons[i:i + batch_size]
            coef = torch.ones(len(idx), 1, d, device=tokens.device)
            coef[torch.arange(len(idx)), 0, idx] = 0.0

            def hook(act, hook, coef=coef):
                return act * coef.to(act.dtype)

            loss = reference_loss(model, tokens.expand(len(idx), -1), prefix_len,
                                  [(neuron_hook_name(l), hook)])
            out[l, idx] = (loss - base).float().cpu()
    return out


def reference_integrated_gradients(model, tokens, prefix_len, *, steps=20, layers=None, positions=None,
                                   step_batch=None):
    """Eq. 14-16 as in the authors' ``integrated_gradients``: for every layer and suffix position q,
    forwards of ``tokens[:, :q+1]`` with ``steps`` copies whose last-position ``hook_post`` is
    replaced by ``α h`` (α = linspace(0, 1, steps)), gradient of P(next token), IG = h * mean grad,
    averaged over positions.  ``positions`` restricts the suffix positions averaged over (for
    extrapolated timings); ``step_batch`` sets Riemann steps per forward (default all)."""
    tokens = tokens.reshape(1, -1)
    n_layers, d = model.cfg.n_layers, model.cfg.d_mlp
    layers = range(n_layers) if layers is None else layers
    seq = tokens.shape[1]
    positions = range(prefix_len - 1, seq - 1) if positions is None else positions
    step_batch = step_batch or steps
    acts = {}

    def save(act, hook):
        acts[hook.name] = act.detach()[0]

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(neuron_hook_name(l), save) for l in range(n_layers)])
    alphas = torch.linspace(0, 1, steps, device=tokens.device)
    out = torch.full((n_layers, d), float("nan"))
    for l in layers:
        total = torch.zeros(d, dtype=torch.float64, device=tokens.device)
        for q in positions:
            h = acts[neuron_hook_name(l)][q]
            grad_sum = torch.zeros(d, dtype=torch.float64, device=tokens.device)
            for i in range(0, steps, step_batch):
                a = alphas[i:i + step_batch].to(h.dtype)
                scaled = (a[:, None] * h[None]).requires_grad_(True)

                def hook(act, hook, scaled=scaled):
                    act = act.clone()
                    act[:, -1] = scaled
                    return act

                logits = model.run_with_hooks(tokens[:, :q + 1].expand(len(a), -1),
                                              fwd_hooks=[(neuron_hook_name(l), hook)])
                probs = torch.softmax(logits[:, -1].float(), dim=-1)[:, tokens[0, q + 1]]
                (g,) = torch.autograd.grad(probs.sum(), [scaled])
                grad_sum += g.sum(0).double()
            total += h.double() * grad_sum / steps
        out[l] = (total / len(positions)).float().cpu()
    return out


def reference_attribution_patching(model, tokens, prefix_len):
    """First-order estimate of Eq. 7 by autograd on an explicit multiplicative mask m (all ones):
    zeroing neuron i is m_i: 1 -> 0, so ΔL_i ≈ -∂L/∂m_i."""
    tokens = tokens.reshape(1, -1)
    n_layers, d = model.cfg.n_layers, model.cfg.d_mlp
    masks = [torch.ones(d, device=tokens.device, requires_grad=True) for _ in range(n_layers)]

    def hook(act, hook):
        return act * masks[int(hook.name.split(".")[1])].to(act.dtype)

    loss = reference_loss(model, tokens, prefix_len, [(neuron_hook_name(l), hook) for l in range(n_layers)])[0]
    grads = torch.autograd.grad(loss, masks)
    return -torch.stack(grads).detach().float().cpu()
