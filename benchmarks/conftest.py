"""pytest configuration for the benchmarks (kept out of the normal test run).

The test suite runs ``python_tests/`` (``testpaths``), so nothing here is collected by a
plain ``pytest``. Benchmark modules are named ``bench_*.py``:

* ``pytest benchmarks/bench_cpu_loss.py --benchmark-only`` collects the file because it is
  named on the command line (pytest collects explicit paths whatever ``python_files`` says);
* ``pytest benchmarks/ --benchmark-only`` collects every ``bench_*.py`` here through the
  hook below, which adds the ``bench_*.py`` pattern for this directory only.
"""

from __future__ import annotations

import fnmatch

import pytest


def _matches_python_files(config, name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in config.getini("python_files"))


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    # explicit paths and names already matching python_files are collected by pytest
    # itself; returning a Module for them too would collect them twice
    if parent.session.isinitpath(file_path) or _matches_python_files(parent.config, file_path.name):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_report_header(config):
    try:
        import torch

        import pama_ext

        return (
            f"pama_ext backends: {pama_ext.available_backends()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads"
        )
    except Exception as exc:  # pragma: no cover - only informative
        return f"pama_ext not importable: {exc}"
