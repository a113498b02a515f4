"""CPU benchmark: a ``PAMAGRPOTrainer`` step against TRL's ``GRPOTrainer`` step, same model and batch.

    .venv/bin/python benchmarks/bench_trl.py [--rounds 6] [--steps 4] [--threads 1]

writes ``benchmarks/results/trl.json`` and prints the ratios. Not a test (no ``test_``
function; the TRL import happens in ``main``), so ``pytest benchmarks/`` ignores it.

Setup: a GPT-2 built from a config over the rlhf_demo's word-level vocabulary (``--layers``,
``--n-embd``; default 4 x 128, about 0.8 M parameters), three programmatic rewards (the TRL
example's), ``per_device_train_batch_size`` completions of up to ``--max-completion-length``
tokens, groups of 4, ``loss_type="dapo"`` (TRL's default), AdamW, same seed everywhere.
Methods:

* ``grpo``: ``trl.GRPOTrainer`` with the three reward functions (it sums them);
* ``pama``: ``PAMAGRPOTrainer`` at ``pama_ext.DEFAULT_GRANULARITY``;
* ``pama_<g>``: ``PAMAGRPOTrainer`` at granularity ``g`` (``--methods``);
* ``linear``: ``PAMAGRPOTrainer`` with ``objective_combiner="linear"`` (uniform).

Two measurements, in interleaved rounds (each method once per round, rotating order) so
that load from other jobs spreads over all methods; each records wall time and the
process's CPU time (``time.process_time``; with ``--threads 1`` it is the work done and
hardly depends on what else runs):

* ``step``: ``trainer.train()`` for ``--steps`` optimizer steps; each ``training_step`` is
  timed (generation, rewards, advantages, loss, backward); the optimizer step is outside
  ``training_step`` and the same for all. The first step of a run (warm-up) is dropped. The
  learning rate is 0, so that every method generates exactly the same completions (same
  seed, same weights): a method that trains differently would otherwise be timed on
  answers of other lengths.
* ``loss``: one generated batch held fixed, then ``compute_loss`` + ``backward`` repeated
  (``--loss-calls`` per round), PAMA's step solve included every call: the part of the step
  that PAMA changes, without generation.

Ratios are method / ``grpo`` of the medians (and of the minima) over all timed steps or
calls. ``uptime``'s load is recorded before and after: on a busy machine trust the CPU-time
ratios of a ``--threads 1`` run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per timed run (the first is dropped)")
    p.add_argument("--loss-calls", type=int, default=10, help="compute_loss + backward calls per round")
    p.add_argument("--methods", nargs="+", default=["grpo", "pama", "linear"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--out", default=str(HERE / "results" / "trl.json"))
    return p.parse_args(argv)


def _model_dir(tmp: str, args) -> str:
    """A saved GPT-2 of the requested size (every method loads the same weights)."""
    from pama_ext.examples.rlhf_demo import policy

    tok = policy.build_tokenizer()
    model = policy.build_tiny_gpt2(tok, seed=0, n_embd=args.n_embd, n_layer=args.layers, n_head=4, n_positions=128)
    path = os.path.join(tmp, "model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _trainer(method: str, model_path: str, tmp: str, args, steps: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import pama_ext
    from pama_ext.examples.rlhf_demo import corpus
    from pama_ext.examples.trl_grpo import rewards
    from pama_ext.examples.trl_grpo.policy import load_tokenizer
    from pama_ext.integrations.trl import PAMAGRPOConfig, PAMAGRPOTrainer

    common = dict(
        output_dir=os.path.join(tmp, method),
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        num_generations=4,
        max_completion_length=args.max_completion_length,
        learning_rate=0.0,  # the policy does not move: every method generates the same completions
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    funcs = rewards.reward_functions(args.max_completion_length)
    data = Dataset.from_dict({"prompt": corpus.prompts()[0]})
    tok = load_tokenizer(model_path)
    if method == "grpo":
        return GRPOTrainer(model=model_path, reward_funcs=funcs, args=GRPOConfig(**common), train_dataset=data, processing_class=tok)
    if method == "linear":
        extra = {"objective_combiner": "linear"}
    else:
        g = pama_ext.DEFAULT_GRANULARITY if method == "pama" else method[len("pama_") :]
        extra = {"objective_combiner": "pama", "objective_granularity": g}
    return PAMAGRPOTrainer(
        model=model_path, reward_funcs=funcs, args=PAMAGRPOConfig(**common, **extra), train_dataset=data, processing_class=tok
    )


def _timed_training_steps(trainer):
    """Wrap ``training_step``: record (wall, cpu) seconds of each call."""
    times = []
    inner = trainer.training_step

    def timed(*a, **k):
        w, c = time.perf_counter(), time.process_time()
        out = inner(*a, **k)
        times.append((time.perf_counter() - w, time.process_time() - c))
        return out

    trainer.training_step = timed
    return times


def _fixed_batch(trainer):
    """One generated batch, as ``training_step`` would see it (generation outside the timing)."""
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1
    return trainer._prepare_inputs(batch)


def _loss_calls(trainer, inputs, calls: int):
    times = []
    model = trainer.model
    for _ in range(calls):
        if hasattr(trainer, "_pama_step_weights"):
            trainer._pama_step_weights = None  # solve again: one solve per optimizer step is part of the cost
        w, c = time.perf_counter(), time.process_time()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        times.append((time.perf_counter() - w, time.process_time() - c))
        model.zero_grad(set_to_none=True)
    return times


def _summary(samples, methods):
    out = {}
    for m in methods:
        wall = [s[0] for s in samples[m]]
        cpu = [s[1] for s in samples[m]]
        out[m] = {"n": len(wall), "wall_median": statistics.median(wall), "wall_min": min(wall),
                  "cpu_median": statistics.median(cpu), "cpu_min": min(cpu)}
    base = out["grpo"]
    for m in methods:
        out[m]["ratio"] = {k: out[m][k] / base[k] for k in ("wall_median", "wall_min", "cpu_median", "cpu_min")}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if "grpo" not in args.methods:
        args.methods = ["grpo", *args.methods]
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    load_before = os.getloadavg()
    step_samples = {m: [] for m in args.methods}
    loss_samples = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = _model_dir(tmp, args)
        # the loss measurement: one trainer and one fixed batch per method, reused every round
        fixed = {}
        for m in args.methods:
            t = _trainer(m, model_path, tmp, args, steps=1)
            torch.manual_seed(0)
            fixed[m] = (t, _fixed_batch(t))
        for r in range(args.rounds):
            order = args.methods[r % len(args.methods) :] + args.methods[: r % len(args.methods)]
            for m in order:
                t, inputs = fixed[m]
                loss_samples[m] += _loss_calls(t, inputs, args.loss_calls)
            for m in order:
                t = _trainer(m, model_path, tmp, args, steps=args.steps)
                times = _timed_training_steps(t)
                t.train()
                step_samples[m] += times[1:]
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    result = {
        "config": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_before": load_before, "load_after": os.getloadavg()},
        "step": _summary(step_samples, args.methods),
        "loss": _summary(loss_samples, args.methods),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"load average before {load_before}, after {result['machine']['load_after']} ({os.cpu_count()} CPUs)")
    for what in ("step", "loss"):
        print(f"\n{what}: method / grpo (median, min), wall and CPU time")
        for m in args.methods:
            s = result[what][m]
            rr = s["ratio"]
            print(f"  {m:<14} wall {s['wall_median'] * 1e3:8.2f} ms  x{rr['wall_median']:.3f} (min x{rr['wall_min']:.3f})"
                  f"   cpu {s['cpu_median'] * 1e3:8.2f} ms  x{rr['cpu_median']:.3f} (min x{rr['cpu_min']:.3f})")
    print(f"\nwritten to {args.out}")
    return result


if __name__ == "__main__":
    main()
