"""The two localization benchmarks of Chang et al. (2024).

* :mod:`memloc.benchmarks.inj` -- INJ: inject a new sequence into known FFN value vectors and
  measure how many of them a localization method recalls (§3.1, Algorithm 1, Tables 2 and 6).
* :mod:`memloc.benchmarks.dele` -- DEL: drop out the neurons a method locates for a memorized
  sequence and measure forgetting of it, of the other memorized sequences and of random text
  (§3.2, Table 3, Figure 2).
* :mod:`memloc.benchmarks.tuning` -- per-model dev-set hyperparameter selection (A.7).

Localization methods are passed as ``{name: callable}`` or as names of
``memloc.localize.METHODS``; their scores can be cached on disk (``cache_dir=``).
"""

from ._scores import (accepted_hyperparameters, check_method_kwargs, localize_cached, model_fingerprint, resolve_methods, score_cache_path,
                      with_defaults, with_sequence_seed)
from .dele import DEFAULT_DEL_RATIOS, DelResult, del_benchmark, del_table, memorized_set
from .tuning import TuningResult, tune_del
from .inj import (DEFAULT_INJ_RATIOS, InjectionResult, ValueVectors, ffn_value_vectors, inj_benchmark, inj_table,
                  injected, injection_loss, recall_at_k, sample_injection_mask)

__all__ = [
    "inj_benchmark", "inj_table", "injected", "injection_loss", "InjectionResult", "sample_injection_mask",
    "recall_at_k", "ffn_value_vectors", "ValueVectors", "DEFAULT_INJ_RATIOS",
    "del_benchmark", "del_table", "DelResult", "memorized_set", "DEFAULT_DEL_RATIOS",
    "resolve_methods", "check_method_kwargs", "accepted_hyperparameters", "localize_cached", "model_fingerprint", "score_cache_path",
    "with_sequence_seed", "with_defaults", "tune_del", "TuningResult",
]
