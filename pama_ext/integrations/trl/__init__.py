"""PAMA inside Hugging Face TRL: ``GRPOTrainer`` with one objective per reward function.

Change two names in a TRL GRPO script::

    from pama_ext.integrations.trl import PAMAGRPOConfig, PAMAGRPOTrainer
    args = PAMAGRPOConfig(output_dir="out", objective_combiner="pama", ...)   # any GRPOConfig field
    trainer = PAMAGRPOTrainer(model=model_or_path, reward_funcs=[helpful, concise], args=args,
                              train_dataset=ds, processing_class=tokenizer)
    trainer.train()

Each reward function's rewards are normalised into its own advantage (``advantages.py``);
the loss is pama_ext's Noon-PPO op with PAMA's weights, or MORLHF's linear combination,
inside TRL's KL term, loss-type normalisers, gradient accumulation and ``num_iterations``
(``loss.py``, ``trainer.py``). Settings that change the per-token loss in ways PAMA does not
define are refused when the config is built (``config.py``). Requires the TRL range of
``_version.py`` (``pip install "pama_ext[trl]"``), checked here at import.
"""

from ._version import TRL_REQUIREMENT, check_trl_version

TRL_VERSION = check_trl_version()

from .config import COMBINERS, NORMALIZATIONS, SUPPORTED_LOSS_TYPES, PAMAGRPOConfig  # noqa: E402
from .trainer import PAMAGRPOTrainer  # noqa: E402

__all__ = [
    "PAMAGRPOConfig",
    "PAMAGRPOTrainer",
    "COMBINERS",
    "NORMALIZATIONS",
    "SUPPORTED_LOSS_TYPES",
    "TRL_REQUIREMENT",
    "TRL_VERSION",
]
