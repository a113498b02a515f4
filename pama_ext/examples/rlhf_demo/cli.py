"""Command line of the demo: ``python -m pama_ext.examples.rlhf_demo --help``.

The default run (no downloads, a few minutes on 2 CPU cores): a small GPT-2 built from a
config over a word-level vocabulary, warmed up on generated movie reviews, then trained with
PPO on three conflicting objectives (VADER sentiment, clipped length, lexical diversity)
with a KL penalty to the warmed-up policy, once per method and seed: PAMA (batch Gram and
per-token), MORLHF (linear, uniform preference) and MGDA-UB, same seeds, same budget.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

import pama_ext

from . import corpus, report
from .policy import build_tiny_gpt2, build_tokenizer, load_pretrained, warm_up
from .ppo import DEFAULT_METHODS, ESTIMATORS, KL_PENALTIES, METHODS, WHITENINGS, PPOConfig, banned_logits, evaluate, train
from .steering import RunSpec, analyse_fronts, fronts_table, parse_preferences, steerable
from .rewards import DEFAULT_OBJECTIVES, OBJECTIVES, build_objectives

EVAL_SEED = 12345  # the held-out evaluation samples with this seed for every method and seed
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _csv(kind):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            return [kind(x) for x in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from exc

    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pama_ext.examples.rlhf_demo",
        description="Multi-objective RLHF (PPO) with pama_ext.PAMA against MORLHF and MGDA-UB; writes a results folder.",
    )
    p.add_argument("--model", default=None, metavar="PATH",
                   help="local Hugging Face causal-LM checkpoint directory (default: the embedded small GPT-2, warmed up here)")
    p.add_argument("--reward-model", default=None, metavar="PATH",
                   help="local sequence-classification model directory, scored as the `reward_model` objective (added to --objectives)")
    p.add_argument("--reward-label", type=int, default=None,
                   help="which logit of --reward-model is the reward (default: the last label)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="training prompts, one per line (default: the embedded review openings; every fifth line is "
                   "held out unless --eval-prompts is given)")
    p.add_argument("--eval-prompts", default=None, metavar="FILE", help="held-out prompts, one per line")
    p.add_argument("--objectives", type=_csv(str), default=list(DEFAULT_OBJECTIVES),
                   help=f"comma-separated, from {', '.join(OBJECTIVES)} (default: %(default)s)")
    p.add_argument("--methods", type=_csv(str), default=None,
                   help=f"comma-separated, from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; "
                   "with --preferences: pama,linear)")
    p.add_argument("--preferences", default=None, metavar="auto|P;P;...",
                   help="trace fronts: one run per preference vector per method (pama, pama_<granularity>, linear) "
                   "and seed; 'auto' = 5 vectors for 2 objectives (0.1/0.9 .. 0.9/0.1), 7 for 3 (uniform, 0.6 on "
                   "each, 0.4 on each pair); or explicit vectors, e.g. '0.8,0.2;0.5,0.5;0.2,0.8' (each > 0)")
    p.add_argument("--consistency", action="store_true",
                   help="also run each method with reward consistency sampling (train only on the responses whose "
                   "scores are above their baseline on every objective or below it on every one), as <method>+consistency")
    p.add_argument("--estimator", default="gae", choices=ESTIMATORS,
                   help="advantages: gae (per-token GAE on N value heads; PPO as the spec writes it) or grpo "
                   "(--group-size samples per prompt, each objective's sequence reward normalised within its group, "
                   "advantages [B, N], no value heads) (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=4,
                   help="grpo: responses per prompt; --batch counts responses (default: %(default)s)")
    p.add_argument("--kl-penalty", default="reward", choices=KL_PENALTIES,
                   help="where the KL to the reference goes: reward (the spec's: -beta KL_t in every objective's "
                   "per-token reward, so -beta KL of the response in every objective's sequence reward under grpo; "
                   "beta from --kl-coef adapted towards --target-kl), loss (a k3 term of its own with the fixed "
                   "--loss-kl-coef, as TRL's GRPO does) or shared (grpo only: -beta KL of the response, centred in "
                   "its group, added to every objective's advantage after the group normalisation, so that beta "
                   "weighs the KL alike in every objective; beta adapted as for reward) (default: %(default)s)")
    p.add_argument("--whiten", default=None, choices=WHITENINGS,
                   help="gae: each objective's advantages over the batch divided by their std, not centred (scale: "
                   "the sign stays the critic's, which is where the Noon clamp cuts), or to mean 0 and std 1 "
                   f"(centre, TRL's masked_whiten) (default: {PPOConfig.whiten})")
    p.add_argument("--loss-kl-coef", type=float, default=0.04,
                   help="fixed coefficient of the k3 KL term when the KL is in the loss (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="PPO rollouts per run (default: %(default)s)")
    p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of a --model policy (default: %(default)s)")
    p.add_argument("--out", default="pama_demo_results", help="results folder (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="prompts per rollout (default: %(default)s)")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="gradient accumulation: split each rollout into this many micro-batches (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per rollout (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="response budget in tokens (default: %(default)s)")
    p.add_argument("--kl-coef", type=float, default=0.2, help="initial KL coefficient beta (default: %(default)s)")
    p.add_argument("--target-kl", type=float, default=3.0, help="KL per response beta adapts towards (default: %(default)s)")
    p.add_argument("--kl-horizon", type=int, default=PPOConfig.kl_horizon,
                   help="samples over which beta may move by 20%% towards --target-kl (Ziegler et al.; default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=300, help="supervised warm-up steps of the embedded model (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every k steps (default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=4, help="responses per held-out prompt (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="pama_ext backend of the fused op (default: %(default)s)")
    p.add_argument("--fused-linear", action="store_true",
                   help="log-probabilities and loss from the last hidden states and the LM head, chunk by chunk "
                   "(pama_ext.fused_linear_logp_loss): the B x T x V logits are never built; mgda_ub runs unfused")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (default: %(default)s: the tensors are small)")
    p.add_argument("--workers", default="auto",
                   help="runs trained in parallel processes: auto (CPU: one per core / --threads; GPU: 1) or a count")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "epochs", "max_new_tokens", "eval_every", "eval_samples", "micro_batches", "threads",
                 "group_size", "kl_horizon"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers != "auto" and (not args.workers.isdigit() or int(args.workers) < 1):
        p.error(f"--workers must be auto or a count >= 1, got {args.workers!r}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.batch % args.micro_batches:
        p.error(f"--batch {args.batch} is not a multiple of --micro-batches {args.micro_batches}")
    if args.estimator == "grpo" and args.batch % args.group_size:
        p.error(f"--batch {args.batch} is not a multiple of --group-size {args.group_size} (grpo: a group per prompt)")
    if args.kl_penalty == "shared" and args.estimator != "grpo":
        p.error("--kl-penalty shared is for --estimator grpo (a sequence-level KL beside group-normalised advantages)")
    if args.whiten is not None and args.estimator != "gae":
        p.error("--whiten is for --estimator gae (grpo's group mean is its baseline)")
    if args.estimator == "gae" and args.whiten is None:
        args.whiten = PPOConfig.whiten  # resolved here so that the summary's config records it
    if args.estimator == "grpo" and args.group_size < 2:
        p.error(f"--group-size must be >= 2 for grpo (a group of one response has no relative advantage), got {args.group_size}")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {args.seeds} repeats a seed")
    if args.methods is None:
        args.methods = ["pama", "linear"] if args.preferences is not None else list(DEFAULT_METHODS)
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if args.preferences is not None:
        fixed = [m for m in args.methods if not steerable(m)]
        if fixed:
            p.error(f"--preferences: {fixed} take no preference; steerable methods: pama, pama_<granularity>, linear")
        n_obj = len(args.objectives) + (1 if args.reward_model is not None and "reward_model" not in args.objectives else 0)
        try:
            args.preference_list = [list(x) for x in parse_preferences(args.preferences, n_obj)]
        except ValueError as exc:
            p.error(str(exc))
    else:
        args.preference_list = None
    if args.reward_model is not None and "reward_model" not in args.objectives:
        args.objectives = list(args.objectives) + ["reward_model"]
    if args.model is not None and args.dtype != "float32" and args.device == "cpu":
        p.error("--dtype other than float32 needs a GPU --device")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def _progress(total: int, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        disable = True
    if disable:
        class _Null:
            def update(self, n=1): ...
            def set_description(self, s): ...
            def set_postfix_str(self, s): ...
            def close(self): ...
        return _Null()
    return tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)


def initial_policy(args, device: torch.device, log):
    """The policy every run starts from: ``--model PATH`` or the embedded GPT-2, warmed up
    (and saved to OUT/initial_policy, loadable with ``--model`` to skip the warm-up)."""
    if args.model is not None:
        model, tokenizer = load_pretrained(args.model, device, DTYPES[args.dtype] if args.dtype != "float32" else None)
        log(f"policy: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
        return model.eval(), tokenizer, None
    tokenizer = build_tokenizer()
    model = build_tiny_gpt2(tokenizer, seed=0, n_positions=max(96, 16 + args.max_new_tokens)).to(device)
    n = sum(p.numel() for p in model.parameters())
    log(f"policy: embedded GPT-2 ({n / 1e6:.2f}M parameters, {len(tokenizer)} words); "
        f"supervised warm-up for {args.warmup_steps} steps on generated reviews")
    bar = _progress(args.warmup_steps, args.no_progress)
    bar.set_description("warm-up")

    def on_step(step, loss):
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.3f}")

    losses = warm_up(model, tokenizer, steps=args.warmup_steps, seed=0, device=device, on_step=on_step) if args.warmup_steps else []
    bar.close()
    saved = Path(args.out) / "initial_policy"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    return model.eval(), tokenizer, {"losses": losses, "saved": str(saved)}


@dataclass
class Context:
    """What every run needs, built once per process (the main one, or each worker)."""

    args: argparse.Namespace
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    objectives: list
    train_prompts: List[str]
    held_prompts: List[str]
    banned: torch.Tensor
    cfg: PPOConfig

    @property
    def names(self) -> List[str]:
        return [o.name for o in self.objectives]

    def evaluate(self, model):
        a = self.args
        return evaluate(model, self.tokenizer, self.objectives, self.held_prompts, a.eval_samples, EVAL_SEED,
                        a.max_new_tokens, self.banned)

    def run(self, spec: RunSpec, initial: List[float], on_step=None) -> dict:
        t = time.perf_counter()
        run = train(spec.method, spec.seed, self.model, self.tokenizer, self.objectives, self.train_prompts,
                    self.evaluate, self.cfg, self.args.steps, self.args.eval_every, self.device, on_step=on_step,
                    initial_eval=initial, preference=spec.preference, consistency=spec.consistency)
        run["seconds"] = time.perf_counter() - t
        # the report groups seeds by "method": the label says which preference and variant
        run.update(method=spec.label, base_method=spec.method, family=spec.family)
        return run


def make_context(args, device: torch.device, model, tokenizer) -> Context:
    objectives = build_objectives(args.objectives, max_new_tokens=args.max_new_tokens, device=device,
                                  reward_model=args.reward_model, reward_label=args.reward_label)
    train_prompts, held_prompts = load_prompts(args.prompts, args.eval_prompts)
    cfg = PPOConfig(batch=args.batch, max_new_tokens=args.max_new_tokens, epochs=args.epochs,
                    micro_batches=args.micro_batches, lr=args.lr, kl_coef=args.kl_coef,
                    target_kl=args.target_kl, kl_horizon=args.kl_horizon, backend=args.backend,
                    estimator=args.estimator,
                    group_size=args.group_size, kl_penalty=args.kl_penalty, whiten=args.whiten or PPOConfig.whiten,
                    loss_kl_coef=args.loss_kl_coef, fused_linear=args.fused_linear)
    banned = banned_logits(tokenizer, model.config.vocab_size, device)
    return Context(args, device, model, tokenizer, objectives, train_prompts, held_prompts, banned, cfg)


def _read_prompts(path: str, flag: str) -> List[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path!r}: not a file (one prompt per line is expected)")
    lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{flag} {path!r}: no prompts (the file has no non-empty line)")
    return lines


def load_prompts(train_path: Optional[str], eval_path: Optional[str]):
    """(train, held-out) prompts: the embedded ones, or ``--prompts FILE`` (one per line;
    without ``--eval-prompts FILE`` every fifth line is held out)."""
    if train_path is None:
        if eval_path is not None:
            return corpus.prompts()[0], _read_prompts(eval_path, "--eval-prompts")
        return corpus.prompts()
    lines = _read_prompts(train_path, "--prompts")
    if eval_path is not None:
        return lines, _read_prompts(eval_path, "--eval-prompts")
    held = lines[4::5]
    train = [x for i, x in enumerate(lines) if i % 5 != 4]
    if not held or not train:
        raise ValueError(f"--prompts {train_path!r}: {len(lines)} prompts are too few to hold every fifth out; "
                         "give at least 5 or pass --eval-prompts")
    return train, held


# ------------------------------------------------------------------ worker processes (--workers)
_WORKER: Optional[Context] = None


def _worker_init(args, model_dir: str, device: str) -> None:
    """Each worker loads the initial policy from disk (the saved warm-up, or --model) and
    builds its own scorers; one intra-op thread each, so W workers use W cores."""
    global _WORKER
    _quiet_transformers()
    torch.set_num_threads(args.threads)
    dev = torch.device(device)
    model, tokenizer = load_pretrained(model_dir, dev, DTYPES[args.dtype] if args.dtype != "float32" else None)
    _WORKER = make_context(args, dev, model.eval(), tokenizer)


def _worker_run(spec: RunSpec, initial: List[float], events) -> dict:
    return _WORKER.run(spec, initial, on_step=lambda rec: events.put((spec, rec["rewards"])))


def run_all(ctx: Context, jobs: Sequence[RunSpec], initial, model_dir: Optional[str], workers: int, bar) -> List[dict]:
    """Every run, in this process or in ``workers`` processes; the runs are returned in
    ``jobs`` order, and their results do not depend on ``workers`` (each run seeds its own
    generators)."""
    names = ctx.names
    steps_done = {job: 0 for job in jobs}

    def show(spec, rewards):
        steps_done[spec] += 1
        finished = sum(n == ctx.args.steps for n in steps_done.values())
        bar.update(1)
        bar.set_description(f"runs {finished}/{len(jobs)} done")
        bar.set_postfix_str(f"{spec.label} seed {spec.seed}: " + " ".join(f"{n[:4]} {v:.2f}" for n, v in zip(names, rewards)))

    if workers <= 1 or len(jobs) <= 1:
        return [ctx.run(j, initial, on_step=lambda rec, j=j: show(j, rec["rewards"])) for j in jobs]
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor

    mpc = mp.get_context("spawn")  # no fork of a process that holds torch threads
    with mpc.Manager() as manager:
        events = manager.Queue()
        with ProcessPoolExecutor(workers, mp_context=mpc, initializer=_worker_init,
                                 initargs=(ctx.args, model_dir, str(ctx.device))) as pool:
            futures = [pool.submit(_worker_run, j, initial, events) for j in jobs]
            pending = set(futures)
            while pending:
                try:
                    show(*events.get(timeout=0.2))
                except queue_mod.Empty:
                    pass
                pending = {f for f in pending if not f.done()}
            while True:  # the last steps' events
                try:
                    show(*events.get_nowait())
                except queue_mod.Empty:
                    break
            return [f.result() for f in futures]


def _quiet_transformers() -> None:
    """No progress bars from transformers' save/load (the demo has its own)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    _quiet_transformers()
    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prefs = args.preference_list or [None]
    variants = (False, True) if args.consistency else (False,)
    jobs = [RunSpec(m, s, None if p is None else tuple(p), c)
            for s in args.seeds for m in args.methods for p in prefs for c in variants]
    workers = resolve_workers(args.workers, device, len(jobs), args.threads)
    try:
        model, tokenizer, warm = initial_policy(args, device, log)
        ctx = make_context(args, device, model, tokenizer)
        initial, initial_samples = ctx.evaluate(model)
        log("objectives: " + "; ".join(f"{o.name} = {o.description}" for o in ctx.objectives))
        if args.preference_list:
            log(f"preferences ({len(args.preference_list)} per method): "
                + "; ".join("/".join(f"{x:.3g}" for x in p) for p in args.preference_list))
        log(f"methods {args.methods}{' (each also +consistency)' if args.consistency else ''} x seeds {args.seeds}, "
            f"{args.steps} PPO steps each "
            f"({args.batch} responses, {args.epochs} epochs, lr {args.lr:g}, {_estimator_text(args)}); "
            f"held-out: {len(ctx.held_prompts)} prompts x {args.eval_samples} samples; device {device}, "
            f"{workers} worker(s), pama_ext backends {pama_ext.available_backends()}")
        bar = _progress(len(jobs) * args.steps, args.no_progress)
        model_dir = args.model if args.model is not None else (warm or {}).get("saved")
        runs = run_all(ctx, jobs, initial, model_dir, workers, bar)
        bar.close()
    finally:
        torch.set_num_threads(threads)
    names = ctx.names
    config = {k: v for k, v in vars(args).items()}
    config.update({"device": str(device), "workers": workers, "eval_seed": EVAL_SEED, "ppo": ctx.cfg.as_dict(),
                   "pama_ext": pama_ext.__version__, "held_out_prompts": ctx.held_prompts,
                   "seconds": time.perf_counter() - t0})
    if warm is not None:
        config["warm_up"] = {"first_loss": warm["losses"][0] if warm["losses"] else None,
                             "last_loss": warm["losses"][-1] if warm["losses"] else None, "saved": warm["saved"]}
    summary = report.summarize(names, [o.lower for o in ctx.objectives], initial, runs, config)
    if args.preference_list:
        summary["fronts"] = analyse_fronts(names, summary["reference_point"], summary["runs"])
    summary["initial"]["samples"] = initial_samples[:: max(1, len(initial_samples) // 8)][:8]
    paths = report.write_all(out, summary, runs)
    log("")
    log(f"held-out mean rewards, median over seeds {args.seeds} (reference point for the hypervolume: "
        f"{[round(x, 3) for x in summary['reference_point']]}):")
    log(report.table(summary))
    if summary.get("fronts"):
        log("\nfronts traced with the preferences, medians over seeds (front HV: hypervolume of each seed's "
            "non-dominated final points; rho: Spearman correlation of preference and final reward per objective; "
            "wins: seeds whose front HV beats linear's):")
        log(fronts_table(names, summary["fronts"]))
    log(f"\n{time.perf_counter() - t0:.0f} s; results in {out}/: " + ", ".join(p.name for p in paths.values()))
    return summary


def _estimator_text(args) -> str:
    beta = f"KL beta {args.kl_coef:g} -> target {args.target_kl:g} (horizon {args.kl_horizon} samples)"
    kl = {"loss": f"KL coefficient {args.loss_kl_coef:g} in the loss", "reward": f"{beta} in the reward",
          "shared": f"{beta} beside the normalised advantages"}[args.kl_penalty]
    if args.estimator == "grpo":
        return f"GRPO: {args.batch // args.group_size} prompts x {args.group_size} samples, {kl}"
    whiten = "centred and scaled" if args.whiten == "centre" else "scaled, not centred"
    return f"GAE on {len(args.objectives)} value heads, {kl}, advantages {whiten}"


def resolve_workers(requested: str, device: torch.device, jobs: int, threads: int) -> int:
    """``--workers auto``: one per pair of free cores' worth of ``--threads`` on CPU (capped by
    the number of runs), 1 on a GPU (the runs would share it)."""
    if requested != "auto":
        return int(requested)
    if device.type != "cpu":
        return 1
    return max(1, min(jobs, (os.cpu_count() or 1) // max(1, threads)))


if __name__ == "__main__":  # pragma: no cover
    main()
