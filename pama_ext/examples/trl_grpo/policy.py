"""The policy the example trains: the embedded small GPT-2 (rlhf_demo's, warmed up once and
saved to ``OUT/initial_policy``) or a local checkpoint (``--model PATH``).

Both methods start from a saved directory: TRL then loads the policy (and, with ``--beta``
> 0, its reference model) from that path. Under ``accelerate launch`` the main process warms
up and saves while the others wait, then every process loads the same files.
"""

from __future__ import annotations

from pathlib import Path

from ..rlhf_demo import policy as demo_policy


def _with_start_token(tokenizer):
    """Prompts tokenized by TRL start with the start token, as in the warm-up (<eos> doubles as it)."""
    from tokenizers.processors import TemplateProcessing

    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{eos} $A", special_tokens=[(eos, tokenizer.eos_token_id)]
    )
    return tokenizer


def embedded_policy(out: Path, *, warmup_steps: int, seed: int, state) -> str:
    """Path of the warmed-up embedded policy, built on the main process if not there yet."""
    import torch

    path = out / "initial_policy"
    with state.main_process_first():
        if not (path / "config.json").exists():
            tokenizer = _with_start_token(demo_policy.build_tokenizer())
            model = demo_policy.build_tiny_gpt2(tokenizer, seed=seed)
            demo_policy.warm_up(model, tokenizer, steps=warmup_steps, seed=seed, device=torch.device("cpu"))
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
    return str(path)


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, left-padded with a pad token (TRL's requirements)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path!r}: not a directory (a local Hugging Face checkpoint is expected)")
    return demo_policy.prepare_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
