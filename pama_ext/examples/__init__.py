"""Runnable examples of pama_ext (``python -m pama_ext.examples.quickstart``)."""
