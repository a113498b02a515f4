"""Tiny offline TRL setups shared by the test_trl_* files, and the 2-process worker.

Nothing is downloaded: a 1-layer GPT-2 built from a config over a word-level tokenizer,
prompts from ``datasets.Dataset.from_dict``, programmatic rewards that conflict (``vowels``
rewards long answers made of a..e, ``brevity`` short ones, ``late`` the letters k..p).

Run as a script under ``torchrun --nproc_per_node 2`` it is the 2-process worker of
``test_trl_distributed.py``: it trains ``PAMAGRPOTrainer`` for two steps per batch-level
granularity and saves, per rank, the weights of every step with the micro-batches they were
solved over (advantages and masks), so the test can recompute the weights of the
concatenated batch in one process.
"""

from __future__ import annotations

import os
import sys

import torch

WORDS = "a b c d e f g h i j k l m n o p".split()
VOWELS = set("abcde")
LATE = set("klmnop")
PROMPTS = ["a b", "c d", "e f", "g h", "i j", "k l", "m n", "o p"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>", unk_token="<unk>"
    )
    out.padding_side = "left"
    return out


def model(tok, seed: int = 0):
    """A 1-layer GPT-2 (d = 16) over ``tok``: the demo's builder, seeded, no dropout."""
    from pama_ext.examples.rlhf_demo.policy import build_tiny_gpt2

    return build_tiny_gpt2(tok, seed=seed, n_embd=16, n_layer=1, n_head=2, n_positions=32)


def saved_model(path: str, seed: int = 0) -> str:
    """A saved tiny model + tokenizer directory (TRL builds its reference model from a path)."""
    tok = tokenizer()
    model(tok, seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def dataset(n: int = 16):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)]})


def _words(c):
    return c.split()


def vowels(completions, **kwargs):
    return [float(sum(w in VOWELS for w in _words(c))) for c in completions]


def brevity(completions, **kwargs):
    return [-float(len(_words(c))) for c in completions]


def late(completions, **kwargs):
    return [float(sum(w in LATE for w in _words(c))) / max(1, len(_words(c))) for c in completions]


def common_args(out_dir: str, **overrides) -> dict:
    """GRPOConfig arguments of a fast deterministic CPU run (override any)."""
    args = dict(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        learning_rate=3e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL's default bf16 would autocast on the CPU: slower, and not what is tested
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return args


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# --------------------------------------------------------------------------- 2-process worker
def _worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    from pama_ext.integrations.trl import PAMAGRPOConfig, PAMAGRPOTrainer
    from pama_ext.statistics import STATISTICS_GRANULARITIES

    rank = int(os.environ["RANK"])
    tok = tokenizer()
    result = {}
    for g in STATISTICS_GRANULARITIES:
        args = PAMAGRPOConfig(
            **common_args(os.path.join(out_dir, g), max_steps=2, gradient_accumulation_steps=2),
            objective_granularity=g,
        )
        trainer = PAMAGRPOTrainer(
            model=model(tok), reward_funcs=[vowels, brevity], args=args, train_dataset=dataset(), processing_class=tok
        )
        seen = []
        solve = trainer._step_weights

        def recording(inputs, train, solve=solve, trainer=trainer, seen=seen):
            fresh = trainer._pama_step_weights is None or trainer._pama_step_weights[0] != trainer.state.global_step
            w = solve(inputs, train)
            if fresh and train:
                spg = trainer.args.steps_per_generation
                mbs = [
                    trainer._buffered_inputs[(trainer._step + k) % spg]
                    for k in range(trainer.current_gradient_accumulation_steps)
                ]
                seen.append(
                    {
                        "weights": w.clone(),
                        "advantages": [mb["advantages"].clone() for mb in mbs],
                        "masks": [(mb["completion_mask"]).clone() for mb in mbs],
                    }
                )
            return w

        trainer._step_weights = recording
        trainer.train()
        logged = [h for h in trainer.state.log_history if "objectives/vowels/weight" in h]
        result[g] = {"steps": seen, "logged": logged}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    _worker(sys.argv[1])
