"""The main job: a multi-objective RLHF run, PAMA against MORLHF and MGDA-UB, with plots.

    python -m pama_ext.examples.rlhf_demo [--steps 40] [--seeds 0,1,2] [--out pama_demo_results]

Modules, one job each: ``corpus`` (the embedded word-level language and prompts), ``policy``
(tokenizer, small GPT-2, warm-up, loading ``--model PATH``), ``rewards`` (the objectives'
scorers), ``ppo`` (rollouts, KL penalty, per-objective GAE, the PPO loop over
``pama_ext.PAMA``), ``report`` (summary, plots, table) and ``cli``.
"""
