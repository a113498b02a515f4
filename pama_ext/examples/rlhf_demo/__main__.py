"""``python -m pama_ext.examples.rlhf_demo``: the demo's command line (``cli.py``)."""

from .cli import main

main()
