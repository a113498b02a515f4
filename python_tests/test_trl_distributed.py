"""Two processes (``torchrun``, CPU, gloo): every rank uses the same batch-level weights,
and they are the single-process weights of the concatenated batch.

The worker (``trl_tiny.py``) trains ``PAMAGRPOTrainer`` for two optimizer steps of two
micro-batches each, for every granularity in ``STATISTICS_GRANULARITIES``, and saves each
step's weights with the micro-batches they were solved over. Here the micro-batches of both
ranks are concatenated and ``pama_ext.pama_weights`` solves them in one process (on-policy
steps: ``u = 1``, so ``logp = old_logp``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pama_ext  # noqa: E402
from pama_ext.statistics import STATISTICS_GRANULARITIES  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("trl_ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(HERE / "trl_tiny.py"), str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _pad(mask, width):
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]))


@pytest.mark.parametrize("granularity", STATISTICS_GRANULARITIES)
def test_ranks_share_the_weights_of_the_whole_batch(ranks, granularity):
    r0, r1 = (r[granularity] for r in ranks)
    assert len(r0["steps"]) == len(r1["steps"]) == 2
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        assert torch.equal(s0["weights"], s1["weights"])  # identical on both ranks
        masks = s0["masks"] + s1["masks"]
        width = max(m.shape[1] for m in masks)
        mask = torch.cat([_pad(m, width) for m in masks])
        adv = torch.cat(s0["advantages"] + s1["advantages"])
        assert not torch.equal(torch.cat(s0["advantages"]), torch.cat(s1["advantages"]))  # the ranks hold different data
        logp = torch.zeros(mask.shape)
        want = pama_ext.pama_weights(logp, logp, adv, mask, granularity=granularity)
        assert s0["weights"].tolist() == pytest.approx(want.tolist(), abs=1e-6)
    # the logged weights (identical on both ranks) are the solved ones
    for r in (r0, r1):
        logged = [h["objectives/vowels/weight"] for h in r["logged"]]
        assert logged == pytest.approx([float(s["weights"][0]) for s in r0["steps"]], abs=1e-6)
