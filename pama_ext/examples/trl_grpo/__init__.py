"""PAMA in a TRL GRPO script: ``PAMAGRPOTrainer`` on three conflicting rewards, against MORLHF.

    python -m pama_ext.examples.trl_grpo [--steps 40] [--out trl_grpo_results]
    accelerate launch -m pama_ext.examples.trl_grpo ...        # unchanged under several processes

Nothing is downloaded: the policy is the rlhf_demo's small word-level GPT-2, warmed up for a
few hundred supervised steps on its embedded reviews (or a local checkpoint, ``--model``).
The three rewards are programmatic and pull against each other (``rewards.py``). Each method
(``pama``: PAMA's weights, ``linear``: uniform MORLHF) trains from the same initial policy
with the same seed; ``OUT/`` gets TRL's logs per method, a CSV of each objective's reward and
weight per step, a plot of both, and a summary. Modules: ``policy`` (the model), ``rewards``,
``report`` (CSV, summary, plot) and ``cli``.
"""
