"""Command line of the TRL example: build or load the policy, train each method with
``PAMAGRPOTrainer``, write the report (main process only)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import policy, report, rewards


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pama_ext.examples.trl_grpo", description=__doc__)
    p.add_argument("--model", default=None, help="a local Hugging Face causal-LM checkpoint (default: the embedded GPT-2)")
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line (default: the embedded prompts)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per method")
    p.add_argument("--out", default="trl_grpo_results", help="output folder")
    p.add_argument(
        "--methods",
        default="pama,linear",
        help="comma-separated: pama (PAMA at --granularity), pama_<granularity> (e.g. pama_token), linear (uniform MORLHF)",
    )
    p.add_argument("--granularity", default=None, help="the granularity of 'pama' (default: pama_ext.DEFAULT_GRANULARITY)")
    p.add_argument("--batch", type=int, default=16, help="completions per process and step (per_device_train_batch_size)")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (GRPO's group)")
    p.add_argument("--max-completion-length", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (TRL's beta)")
    p.add_argument(
        "--fused-linear",
        action="store_true",
        help="compute the loss from the last hidden states and the LM head, chunk by chunk (use_fused_linear=True)",
    )
    p.add_argument("--warmup-steps", type=int, default=200, help="supervised warm-up of the embedded policy")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _methods(args):
    """The methods of --methods, checked before anything is built."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m != "linear" and m != "pama" and not m.startswith("pama_"):
            raise SystemExit(f"--methods: unknown method {m!r} (pama, pama_<granularity> or linear)")
    if not methods:
        raise SystemExit("--methods: no method given")
    return methods


def _prompts(args):
    from ..rlhf_demo import corpus

    if args.prompts is None:
        return corpus.prompts()[0]
    lines = [ln.strip() for ln in Path(args.prompts).read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"--prompts {args.prompts!r}: no prompt in the file")
    return lines


def _train(method: str, model_path: str, tokenizer, dataset, reward_funcs, args, out: Path):
    import torch

    import pama_ext
    from pama_ext.integrations.trl import PAMAGRPOConfig, PAMAGRPOTrainer

    if method == "linear":
        objective = {"objective_combiner": "linear"}
    else:
        granularity = method[len("pama_") :] if method != "pama" else args.granularity or pama_ext.DEFAULT_GRANULARITY
        objective = {"objective_combiner": "pama", "objective_granularity": granularity}
    config = PAMAGRPOConfig(
        output_dir=str(out / method),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        learning_rate=args.lr,
        beta=args.beta,
        use_fused_linear=args.fused_linear,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),  # TRL defaults to bf16, which needs a GPU (or use_cpu)
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        **objective,
    )
    trainer = PAMAGRPOTrainer(
        model=model_path, reward_funcs=reward_funcs, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    return trainer


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = _methods(args)
    from accelerate import PartialState
    from datasets import Dataset

    state = PartialState()  # the processes of `accelerate launch` / torchrun, or just this one
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        model_path = policy.embedded_policy(out, warmup_steps=args.warmup_steps, seed=args.seed, state=state)
    else:
        model_path = args.model
    tokenizer = policy.load_tokenizer(model_path)
    prompts = _prompts(args)
    dataset = Dataset.from_dict({"prompt": prompts})
    funcs = rewards.reward_functions(args.max_completion_length)
    names = [f.__name__ for f in funcs]
    per_method = {}
    for method in methods:
        trainer = _train(method, model_path, tokenizer, dataset, funcs, args, out)
        if state.is_main_process:
            (out / method).mkdir(parents=True, exist_ok=True)
            (out / method / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        per_method[method] = report.curves(trainer.state.log_history, names)
    if not state.is_main_process:
        return
    report.write_curves(out / "curves.csv", per_method)
    summ = report.summary(per_method, names)
    report.write_summary(out / "summary.json", summ, {**vars(args), "model_path": model_path})
    report.plot(out / "objectives.png", per_method, names)
    print(f"\nmean reward (and weight) per objective over the last quarter of {args.steps} steps:")
    print(report.table(summ, names))
    print(f"\nwritten to {out}/: curves.csv, summary.json, objectives.png, <method>/log_history.json")
