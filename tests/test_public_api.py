"""Every public function that takes the model leaves it exactly as it found it.

The functions are enumerated from the ``__all__`` of every memloc module (a public function or
class whose first parameter is ``model``); each needs an entry in :data:`CASES`, a call with cheap
arguments.  A new public function without an entry fails :func:`test_every_public_model_function_has_a_case`
(add a case; for a function that cannot be run cheaply, add a ``Skip`` naming the test that covers it).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Any, Callable

import pytest
import torch

import memloc

P = 12  # prefix length of the short paragraphs below


@dataclasses.dataclass
class Data:
    x: torch.Tensor          # [2, 24] memorized-set paragraphs, truncated
    nmp: torch.Tensor        # [2, 24] other paragraphs
    mask: torch.Tensor       # Bool[layer, neuron] with a few neurons
    tmp: Any                 # a temporary directory


@dataclasses.dataclass(frozen=True)
class Skip:
    reason: str


def public_model_functions() -> dict[str, Callable]:
    """``module.qualname -> object`` for every public function/class whose first parameter is ``model``."""
    out: dict[str, Callable] = {}
    for info in pkgutil.walk_packages(memloc.__path__, "memloc."):
        mod = importlib.import_module(info.name)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            try:
                params = list(inspect.signature(obj).parameters)
            except (TypeError, ValueError):
                continue
            if params and params[0] == "model":
                out.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    return out


def _ablate(m, d):
    from memloc.ablation import ablate
    with ablate(m, d.mask):
        m(d.x)
    with ablate(m, d.mask, "mean", reference_tokens=d.nmp):
        m(d.x)


def _injected(m, d):
    from memloc.benchmarks.injection import injected
    with injected(m, d.x[:1], d.mask, max_steps=2):
        m(d.x)


def _borrowed(m, d):
    from memloc.borrow import borrowed
    with borrowed(m, restore_weights=True):
        m.train()
        with torch.no_grad():
            next(m.parameters()).add_(1.0)


def _trainable_only(m, d):
    from memloc.borrow import borrowed, trainable_only
    with borrowed(m):
        trainable_only(m, [next(iter(dict(m.named_parameters())))])


def _capture_and_replay(m, d):
    from memloc.localize._common import capture_clean, mlp_out_is_linear, run_blocks_from
    names = [memloc.models.neuron_hook_name(0), memloc.models.hook_name("mlp_out", 0),
             memloc.models.hook_name("resid_post", 0)]
    _, acts, inputs = capture_clean(m, d.x[:1], names)
    mlp_out_is_linear(m, acts, 0)
    with torch.no_grad():
        run_blocks_from(m, acts[names[2]], 1, inputs)


def _patching(m, d):
    from memloc.patching import activation_patching
    pmp = d.x.clone()
    pmp[:, 3] = (pmp[:, 3] + 1) % m.cfg.d_vocab
    activation_patching(m, d.x, pmp, torch.tensor([3, 3]), torch.tensor([1, 1]), P, components=("resid_pre",),
                        progress_bar=False)


def _c(path: str) -> Callable:
    mod, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(mod), name)


R = "memloc.localize.random_baseline.random_scores"
CO = "memloc.contrastive_objective"
CASES: dict[str, Callable[[Any, Data], Any] | Skip] = {
    "memloc.ablation.ablate": _ablate,
    "memloc.ablation.mean_activations": lambda m, d: _c("memloc.ablation.mean_activations")(m, d.x),
    "memloc.architectures.adapter_for": lambda m, d: _c("memloc.architectures.adapter_for")(m).attention_geometry(m),
    "memloc.architectures.model_type": lambda m, d: _c("memloc.architectures.model_type")(m),
    "memloc.benchmarks._scores.localize_cached": lambda m, d: _c("memloc.benchmarks._scores.localize_cached")(
        m, "random", _c(R), d.x[:1], P, cache_dir=d.tmp),
    "memloc.benchmarks.dele.del_benchmark": lambda m, d: _c("memloc.benchmarks.dele.del_benchmark")(
        m, ["random"], d.x, P, targets=[0], ratios=(0.01,), random_tokens=d.nmp, progress_bar=False),
    "memloc.benchmarks.dele.memorized_set": lambda m, d: _c("memloc.benchmarks.dele.memorized_set")(m, "tiny", n=2),
    "memloc.benchmarks.injection.ffn_value_vectors": lambda m, d: _c("memloc.benchmarks.injection.ffn_value_vectors")(m),
    "memloc.benchmarks.inj.inj_benchmark": lambda m, d: _c("memloc.benchmarks.inj.inj_benchmark")(
        m, ["random"], sequences=["Gettr (stylized GETTR) is an alt-tech social media platform"], ratios=(0.01,),
        max_len=6, max_steps=2, progress_bar=False),
    "memloc.benchmarks.injection.injected": _injected,
    "memloc.benchmarks.injection.injection_loss": lambda m, d: _c("memloc.benchmarks.injection.injection_loss")(m, d.x[:1]),
    "memloc.benchmarks.tuning.tune_del": lambda m, d: _c("memloc.benchmarks.tuning.tune_del")(
        m, "random", {"seed": [0, 1]}, d.x, P, random_tokens=d.nmp, progress_bar=False),
    "memloc.borrow.borrowed": _borrowed,
    "memloc.borrow.trainable_only": _trainable_only,
    f"{CO}.continuation_logits": lambda m, d: _c(f"{CO}.continuation_logits")(m, d.x, P),
    "memloc.contrastive.contrastive_gradients": lambda m, d: _c("memloc.contrastive.contrastive_gradients")(
        m, d.x, d.nmp, P, n_nmp_per_batch=2, progress_bar=False),
    f"{CO}.contrastive_loss": lambda m, d: _c(f"{CO}.contrastive_loss")(m, d.x, d.nmp, P),
    f"{CO}.eligible_parameters": lambda m, d: _c(f"{CO}.eligible_parameters")(m),
    f"{CO}.reference_logits": lambda m, d: _c(f"{CO}.reference_logits")(m, d.nmp, P),
    f"{CO}.check_contrastive_sets": lambda m, d: _c(f"{CO}.check_contrastive_sets")(m, d.x, d.nmp, P),
    f"{CO}.check_objective_targets": lambda m, d: _c(f"{CO}.check_objective_targets")(m, "edit", d.x, d.nmp[:, P:], P),
    "memloc.finetune.finetune_mask": lambda m, d: _c("memloc.finetune.finetune_mask")(m, d.x, d.nmp, P),
    "memloc.finetune.sparse_finetune": lambda m, d: _c("memloc.finetune.sparse_finetune")(
        m, d.x, d.nmp, P, steps=1, n_nmp_per_batch=2, progress_bar=False),
    "memloc.data.tokenize_texts": lambda m, d: _c("memloc.data.tokenize_texts")(m, ["a short text", "another"]),
    "memloc.gradients.activation_gradients": lambda m, d: _c("memloc.gradients.activation_gradients")(
        m, d.x, P, components=("z", "mlp_post"), progress_bar=False),
    "memloc.components.parameter_components": lambda m, d: _c("memloc.components.parameter_components")(m),
    "memloc.gradients.parameter_gradients": lambda m, d: _c("memloc.gradients.parameter_gradients")(
        m, d.x, P, per_paragraph=True, progress_bar=False),
    "memloc.gradients.parameter_gradients_by_group": lambda m, d: _c("memloc.gradients.parameter_gradients_by_group")(
        m, d.x, P, ["a", "b"], progress_bar=False),
    "memloc.heads.find_memorization_heads": lambda m, d: _c("memloc.heads.find_memorization_heads")(
        m, d.x, d.nmp, P, frequencies=torch.arange(m.cfg.d_vocab, dtype=torch.float32), progress_bar=False,
        contrastive_kwargs={"n_nmp_per_batch": 2}),
    "memloc.attention.first_token_attention": lambda m, d: _c("memloc.attention.first_token_attention")(
        m, d.x, P, progress_bar=False),
    "memloc.attention.first_token_attention_frame": lambda m, d: _c("memloc.attention.first_token_attention_frame")(
        m, d.x, P, layer=1, decode=False, progress_bar=False),
    "memloc.attention.pattern_rows": lambda m, d: _c("memloc.attention.pattern_rows")(m, d.x, P, [1, 3], 1, False),
    "memloc.rare_tokens.rare_token_attention": lambda m, d: _c("memloc.rare_tokens.rare_token_attention")(
        m, d.x, P, torch.arange(m.cfg.d_vocab, dtype=torch.float32), layer=1, progress_bar=False),
    "memloc.localize._common.capture_clean": _capture_and_replay,
    "memloc.localize._common.logits_at": lambda m, d: _c("memloc.localize._common.logits_at")(
        m, torch.zeros(1, 2, m.cfg.d_model)),
    "memloc.localize._common.mlp_out_is_linear": _capture_and_replay,
    "memloc.localize._common.prepare_sequence": lambda m, d: _c("memloc.localize._common.prepare_sequence")(
        m, d.x[0], P),
    "memloc.localize._common.run_blocks_from": _capture_and_replay,
    "memloc.localize._common.w_out": lambda m, d: _c("memloc.localize._common.w_out")(m),
    "memloc.localize.activations.activations": lambda m, d: _c("memloc.localize.activations.activations")(
        m, d.x[:1], P),
    "memloc.localize.attribution_patching.attribution_patching":
        lambda m, d: _c("memloc.localize.attribution_patching.attribution_patching")(m, d.x[:1], P),
    "memloc.localize.hard_concrete.hard_concrete": lambda m, d: _c("memloc.localize.hard_concrete.hard_concrete")(
        m, d.x[:1], P, max_steps=2, progress_bar=False),
    "memloc.localize.integrated_gradients.integrated_gradients":
        lambda m, d: _c("memloc.localize.integrated_gradients.integrated_gradients")(
            m, d.x[:1], P, steps=2, layers=[3], progress_bar=False),
    R: lambda m, d: _c(R)(m, d.x[:1], P),
    "memloc.localize.slimming.slimming": lambda m, d: _c("memloc.localize.slimming.slimming")(
        m, d.x[:1], P, max_steps=2, progress_bar=False),
    "memloc.localize.zero_out.zero_out": lambda m, d: _c("memloc.localize.zero_out.zero_out")(
        m, d.x[:1], P, layers=[3], neurons=[0, 5], progress_bar=False),
    "memloc.metrics.continuation_nll": lambda m, d: _c("memloc.metrics.continuation_nll")(m, d.x, P),
    "memloc.metrics.discover_memorized": lambda m, d: _c("memloc.metrics.discover_memorized")(
        m, d.x, P, progress_bar=False),
    "memloc.metrics.exact_match": lambda m, d: _c("memloc.metrics.exact_match")(m, d.x, P),
    "memloc.metrics.greedy_continuation": lambda m, d: _c("memloc.metrics.greedy_continuation")(m, d.x, P),
    "memloc.metrics.greedy_decode": lambda m, d: _c("memloc.metrics.greedy_decode")(m, d.x[:, :P], 3),
    "memloc.metrics.levenshtein_distance": lambda m, d: _c("memloc.metrics.levenshtein_distance")(m, d.x, P),
    "memloc.metrics.memorization": lambda m, d: _c("memloc.metrics.memorization")(m, d.x, P, progress_bar=False),
    "memloc.metrics.perplexity": lambda m, d: _c("memloc.metrics.perplexity")(m, d.x),
    "memloc.metrics.teacher_forced": lambda m, d: _c("memloc.metrics.teacher_forced")(m, d.x, P),
    "memloc.metrics.teacher_forced_accuracy": lambda m, d: _c("memloc.metrics.teacher_forced_accuracy")(m, d.x, P),
    "memloc.models.model_device": lambda m, d: _c("memloc.models.model_device")(m),
    "memloc.models.model_facts": lambda m, d: _c("memloc.models.model_facts")(m),
    "memloc.patching.activation_patching": _patching,
    "memloc.placement.offloaded_modules": lambda m, d: _c("memloc.placement.offloaded_modules")(m),
    "memloc.placement.require_resident_weights": lambda m, d: _c("memloc.placement.require_resident_weights")(
        m, "a test"),
    "memloc.placement.stacked_mlp_param": lambda m, d: _c("memloc.placement.stacked_mlp_param")(m, "W_out"),
    "memloc.perturb.make_pmps": lambda m, d: _c("memloc.perturb.make_pmps")(
        m, d.x, P, positions=[3], drop_unchanged=False, progress_bar=False),
    "memloc.perturb.perturbation_profile": lambda m, d: _c("memloc.perturb.perturbation_profile")(
        m, d.x, P, positions=[2, 3], progress_bar=False),
    "memloc.perturb.replacement_vocab_size": lambda m, d: _c("memloc.perturb.replacement_vocab_size")(m),
    "memloc.cache.model_fingerprint": lambda m, d: _c("memloc.cache.model_fingerprint")(m),
    "memloc.data.bundled_profile": lambda m, d: _c("memloc.data.bundled_profile")(m),
    "memloc.data.default_paragraphs": lambda m, d: _c("memloc.data.default_paragraphs")(m),
    "memloc.data.retokenized_paragraphs": lambda m, d: _c("memloc.data.retokenized_paragraphs")(m),
    "memloc.localize._common.partial_forward": lambda m, d: _c("memloc.localize._common.partial_forward")(
        m, d.x, 1, slice(P - 1, d.x.shape[1] - 1))(),
    "memloc.metrics.exact_match_teacher_forced": lambda m, d: _c("memloc.metrics.exact_match_teacher_forced")(
        m, d.x, P),
    **{f"memloc.localize._ig_direct.{n}": Skip("an internal step of integrated_gradients (its own case runs the "
                                               "direct path on this model)")
       for n in ("DirectWeights", "default_batch", "direct_weights", "model_type")},
    **{f"memloc.localize._ig_kv_cache.{n}": Skip("an internal step of integrated_gradients' KV-cache path "
                                                 "(tests/test_localize.py and tests/test_dtypes.py run it)")
       for n in ("check", "default_batch", "gradients")},
    **{f"memloc.benchmarks._scores.{n}": Skip("the score cache's read/write halves of localize_cached, run by every "
                                               "DEL/INJ sweep with a cache_dir (tests/test_executor_ray.py, "
                                               "tests/test_benchmarks.py)")
       for n in ("cached_scores", "store_scores")},
    **{f"memloc.benchmarks.dropout.{n}": Skip("one DEL evaluation step; del_benchmark has a case and "
                                              "tests/test_benchmarks.py compares the fast measurer with ablate")
       for n in ("DropoutMeasurer", "measure", "evaluate_dropout")},
    **{f"memloc.benchmarks.injection.{n}": Skip("the injected rows of an INJ worker; inj_benchmark has a case and "
                                                "tests/test_executor_ray.py runs them across processes")
       for n in ("injected_rows", "with_injected_rows")},
    "memloc.localize._masks.train_masks": Skip("the loop inside slimming and hard_concrete, which have cases"),
    **{f"memloc.localize.reference.{n}": Skip("the papers' slow reference loops (tests/test_localize.py compares "
                                              "every fast path with them)")
       for n in ("reference_attribution_patching", "reference_integrated_gradients", "reference_loss",
                 "reference_zero_out")},
    "memloc.reproduce.context.RunContext": Skip("the record of one reproduce run (tests/test_reproduce.py)"),
    "memloc.reproduce.context.build_context": Skip("called by reproduce, which runs inside `unchanged` in "
                                                   "tests/test_reproduce.py"),
    "memloc.reproduce.reproduce": Skip("the whole pipeline (minutes); tests/test_reproduce.py runs it on the "
                                       "embedded model inside `unchanged`"),
}


def test_every_public_model_function_has_a_case():
    found = set(public_model_functions())
    missing, stale = sorted(found - set(CASES)), sorted(set(CASES) - found)
    assert not missing, f"public functions taking the model without a case in CASES: {missing}"
    assert not stale, f"CASES entries that are no longer public functions taking the model: {stale}"


@pytest.fixture(scope="module")
def data(tiny, tiny_paragraphs, tmp_path_factory):
    tokens = tiny_paragraphs.tokens
    mask = torch.zeros(tiny.cfg.n_layers, tiny.cfg.d_mlp, dtype=torch.bool)
    mask[1:, :3] = True
    return Data(tokens[:2, :24].clone(), tokens[-2:, :24].clone(), mask, tmp_path_factory.mktemp("public_api"))


@pytest.mark.parametrize("name", sorted(public_model_functions()))
def test_leaves_the_model_unchanged(name, tiny, data, unchanged):
    case = CASES.get(name)
    if case is None:
        pytest.fail(f"{name} has no case in CASES")
    if isinstance(case, Skip):
        pytest.skip(case.reason)
    with unchanged(tiny):
        case(tiny, data)
