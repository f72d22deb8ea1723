"""memloc: localizing memorized data in language models, on TransformerLens.

Implements Chang, Thomason & Jia (2024), *Do Localization Methods Actually Localize Memorized
Data in LLMs?* and Stoehr et al. (2024), *Localizing Paragraph Memorization in Language Models*.
"""

from . import ablation, benchmarks, contrastive, gradients, heads, localize, metrics, patching, perturb, plots
from .ablation import ablate, select_top_k
from .borrow import borrowed
from .data import load_ecbd, load_paragraphs, tokenize_texts, unigram_counts
from .metrics import (continuation_nll, discover_memorized, exact_match, greedy_decode, levenshtein_distance,
                      memorization, perplexity, split_memorization, teacher_forced_accuracy)
from .models import load_model, model_facts

__version__ = "0.1.0"
__all__ = [
    "ablation", "benchmarks", "contrastive", "gradients", "heads", "localize", "metrics", "patching", "perturb",
    "plots", "ablate", "select_top_k",
    "load_model", "model_facts", "borrowed", "load_paragraphs", "load_ecbd", "tokenize_texts", "unigram_counts",
    "memorization", "split_memorization", "discover_memorized", "exact_match", "continuation_nll",
    "teacher_forced_accuracy", "levenshtein_distance", "perplexity", "greedy_decode",
]
