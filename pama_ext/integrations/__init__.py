"""Integrations of pama_ext with training frameworks.

Each integration lives in its own subpackage and imports its framework only when you
import that subpackage, so ``import pama_ext`` never needs them:

* ``pama_ext.integrations.trl``: ``PAMAGRPOConfig`` / ``PAMAGRPOTrainer``, Hugging Face
  TRL's ``GRPOTrainer`` with one objective per reward function combined by PAMA
  (``pip install "pama_ext[trl]"``).
"""
