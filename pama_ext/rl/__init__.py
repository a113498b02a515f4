"""Multi-objective RL helpers around the PAMA loss.

* ``gae``: per-objective GAE over [B, T, N] (C++ kernel on CPU, PyTorch reference),
  per-objective whitening (or scaling without centring), sequence-level advantages,
  per-token rewards from scores.
* ``grpo``: ``group_advantages``, per-objective group-relative (GRPO) advantages [B, N].
* ``value_heads``: ``MultiHeadValueModel``, N value heads on a ``transformers`` causal LM.
* ``consistency``: ``reward_consistency_mask``, keep the preference pairs whose chosen
  response wins on every objective.
* ``pareto``: ``non_dominated`` and the exact ``hypervolume`` for 2 to 4 objectives.

``value_heads`` needs ``transformers`` only to load a model by name, so importing this
package does not import it.
"""

from .consistency import reward_consistency_mask
from .gae import (
    GAEOutput,
    gae_reference,
    has_cpp_gae,
    per_objective_gae,
    scale_per_objective,
    scores_to_token_rewards,
    sequence_advantages,
    whiten_per_objective,
)
from .grpo import group_advantages
from .pareto import hypervolume, non_dominated
from .value_heads import MultiHeadValueModel, ValueHeadOutput, add_value_heads

__all__ = [
    "GAEOutput",
    "MultiHeadValueModel",
    "ValueHeadOutput",
    "add_value_heads",
    "gae_reference",
    "group_advantages",
    "has_cpp_gae",
    "hypervolume",
    "non_dominated",
    "per_objective_gae",
    "reward_consistency_mask",
    "scale_per_objective",
    "scores_to_token_rewards",
    "sequence_advantages",
    "whiten_per_objective",
]
