"""pama_ext: PAMA (Pareto Multi-Objective Alignment) for multi-objective RLHF in PyTorch.

Noon PPO (negative advantages clamped to zero) with closed-form weights that combine N
per-objective advantages so the update conflicts with no objective. See README.md and
shared/PAMA.md (the specification).
"""

from ._backends import available_backends, build_info, has_cpp
from .functional import (
    PamaStats,
    min_norm_weights,
    pama_loss,
    pama_loss_and_stats,
    pama_weights,
    theorem1,
)
from .reference import DEFAULT_GRANULARITY, GRANULARITIES, LOSS_AGGS, STATS_FIELDS
from . import triton_backend as _triton_backend  # registers backend "triton" when Triton is installed
from .statistics import BatchStatistics, batch_statistics
from .combine import weighted_noon_loss, weighted_noon_loss_and_stats
from .optim import COMBINERS, PAMA, PAMADiagnostics
from .fused_linear import fused_linear_pama_loss, fused_linear_pama_loss_and_logp
from . import rl  # multi-objective RL helpers: per-objective GAE, value heads, consistency mask, Pareto tools

__version__ = "0.1.0"

__all__ = [
    "COMBINERS",
    "PAMA",
    "PAMADiagnostics",
    "BatchStatistics",
    "batch_statistics",
    "weighted_noon_loss",
    "weighted_noon_loss_and_stats",
    "DEFAULT_GRANULARITY",
    "GRANULARITIES",
    "LOSS_AGGS",
    "STATS_FIELDS",
    "PamaStats",
    "available_backends",
    "build_info",
    "has_cpp",
    "min_norm_weights",
    "fused_linear_pama_loss",
    "fused_linear_pama_loss_and_logp",
    "pama_loss",
    "pama_loss_and_stats",
    "pama_weights",
    "theorem1",
]
