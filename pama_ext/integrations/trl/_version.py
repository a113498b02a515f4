"""The TRL releases this integration was written and tested against, checked at import.

The integration overrides three of ``GRPOTrainer``'s private methods
(``_calculate_rewards``, ``_generate_and_score_completions``, ``_compute_loss``) and reads
some of its private attributes; TRL moves these between releases, so an untested TRL is
refused with a clear message rather than failing somewhere inside a training step.
``PAMA_EXT_TRL_ALLOW_UNTESTED=1`` downgrades the refusal to a warning (at your own risk).
"""

from __future__ import annotations

import os
import warnings

#: the tested range, as in pyproject.toml's ``trl`` extra
TRL_MIN = "1.16"
TRL_MAX_EXCLUSIVE = "1.17"
TRL_REQUIREMENT = f"trl>={TRL_MIN},<{TRL_MAX_EXCLUSIVE}"
ALLOW_UNTESTED_ENV = "PAMA_EXT_TRL_ALLOW_UNTESTED"


def check_trl_version() -> str:
    """Import ``trl`` and check its version; returns it. Raises ImportError outside the range."""
    try:
        import trl
    except ImportError as e:  # pragma: no cover - exercised by environments without TRL
        raise ImportError(
            f"pama_ext.integrations.trl needs TRL ({TRL_REQUIREMENT}): pip install \"pama_ext[trl]\""
        ) from e
    from packaging.version import Version

    found = Version(trl.__version__)
    if Version(TRL_MIN) <= found < Version(TRL_MAX_EXCLUSIVE):
        return trl.__version__
    msg = (
        f"pama_ext.integrations.trl is tested with {TRL_REQUIREMENT}, but trl {trl.__version__} is "
        f"installed: it overrides private GRPOTrainer methods that change between TRL releases. "
        f"Install the tested range with pip install \"pama_ext[trl]\" (or \"{TRL_REQUIREMENT}\")"
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(msg + f"; continuing because {ALLOW_UNTESTED_ENV}=1", RuntimeWarning, stacklevel=3)
        return trl.__version__
    raise ImportError(msg + f", or set {ALLOW_UNTESTED_ENV}=1 to try anyway")
