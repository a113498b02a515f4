"""Where MORLHF's lead on the pair's sentiment shows: on unseen prompts only, or on the
training prompts too (issue 12 evidence; benchmarks/FIDELITY.md, "The pair on training
prompts, and on another machine").

The held-out prompts of the main job open with 3 of the corpus' 15 nouns, which the training
prompts never open with (``rlhf_demo/corpus.py``). This script runs the two judged pair
settings of ``fidelity.py`` (``gae_pair``, ``grpo_pair``) for the default ``pama_token`` and
MORLHF ``linear`` over seeds 0-9, and evaluates every run twice with the demo's fixed
evaluation seed: on the held-out prompts (the demo's default) and on 32 training prompts (a
fixed sample, ``random.Random(0)``; ``--eval-prompts``). Training does not depend on what is
evaluated, so both evaluations see the same policies.

    python benchmarks/fidelity_generalisation.py      # about 9 minutes on 2 idle cores

Writes ``benchmarks/results/fidelity_generalisation.json``: per setting and prompt set the
medians, the seed-level wins of ``pama_token`` against ``linear``, every seed's figures, and
what the evaluated responses hold (words, and words of the corpus' positive and negative
lists, per response, over every seed's samples), with the machine they came from (runs reproduce bit for bit on one machine, not across
machines: FIDELITY.md).
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fidelity import ROOT, SEEDS, SETTINGS, final_rows, runs_and_out, warm_policy  # noqa: E402

METHODS = ["pama_token", "linear"]
OBJECTIVES = ["sentiment", "length", "hypervolume"]


def training_prompt_sample(path: Path, k: int = 32) -> Path:
    from pama_ext.examples.rlhf_demo import corpus

    train, held = corpus.prompts()
    path.write_text("\n".join(random.Random(0).sample(train, k)) + "\n")
    assert not set(path.read_text().splitlines()) & set(held)
    return path


def lexicon(out: Path) -> dict:
    """Per evaluated response (every seed): words, positive and negative words of the corpus."""
    from pama_ext.examples.rlhf_demo import corpus

    pos, neg = set(corpus.POSITIVE), set(corpus.NEGATIVE)
    rows = [json.loads(line) for line in (out / "samples.jsonl").open()]
    words = [r["response"].split() for r in rows]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"responses": len(rows), "words": mean([len(w) for w in words]),
            "positive_words": mean([sum(x in pos for x in w) for w in words]),
            "negative_words": mean([sum(x in neg for x in w) for w in words])}


def main(argv=None) -> None:
    runs, out_json = runs_and_out(__doc__, "fidelity_runs", HERE / "results" / "fidelity_generalisation.json", argv)
    runs.mkdir(parents=True, exist_ok=True)
    demo = [sys.executable, "-m", "pama_ext.examples.rlhf_demo", "--no-progress"]
    policy = warm_policy(runs)  # fidelity.py's warm-up, shared with its sweep
    prompt_sets = {"held_out": [], "training": ["--eval-prompts", str(training_prompt_sample(runs / "training_prompts.txt"))]}
    doc = {"machine": {"platform": platform.platform(), "processor": platform.processor()},
           "seeds": SEEDS, "settings": {}}
    for setting in ("gae_pair", "grpo_pair"):
        for name, extra in prompt_sets.items():
            per_method, words = {}, {}
            for method in METHODS:
                out = runs / "generalisation" / setting / name / method
                if not (out / "summary.csv").is_file():
                    t = time.perf_counter()
                    subprocess.run(demo + SETTINGS[setting] + extra + [
                        "--model", str(policy), "--methods", method, "--seeds", ",".join(map(str, SEEDS)),
                        "--steps", "40", "--eval-every", "40", "--out", str(out)], check=True, cwd=ROOT,
                        capture_output=True)
                    print(f"[generalisation] {setting} {name} {method}: {time.perf_counter() - t:.0f} s", flush=True)
                per_method[method] = final_rows(out)
                words[method] = lexicon(out)
            tok, lin = per_method["pama_token"], per_method["linear"]
            entry = {"initial": tok[-1], "median": {}, "pama_token_ahead_of_linear": {}, "responses": words,
                     "per_seed": {}}
            for m, rows in per_method.items():
                entry["median"][m] = {k: statistics.median(rows[s][k] for s in SEEDS) for k in OBJECTIVES}
                entry["per_seed"][m] = {str(s): rows[s] for s in SEEDS}
            entry["pama_token_ahead_of_linear"] = {k: sum(tok[s][k] > lin[s][k] for s in SEEDS) for k in OBJECTIVES}
            doc["settings"].setdefault(setting, {})[name] = entry
            med = entry["median"]
            print(f"{setting:10s} {name:9s} initial {tok[-1]['sentiment']:.3f} / {tok[-1]['length']:.3f} | "
                  + " | ".join(f"{m} {med[m]['sentiment']:.3f} / {med[m]['length']:.3f} HV {med[m]['hypervolume']:.3f}"
                               for m in METHODS)
                  + " | pama_token ahead " + " / ".join(str(v) for v in entry["pama_token_ahead_of_linear"].values())
                  + " of 10 | words / positive / negative per response: "
                  + ", ".join(f"{m} {words[m]['words']:.1f} / {words[m]['positive_words']:.2f} / "
                              f"{words[m]['negative_words']:.2f}" for m in METHODS), flush=True)
    out_json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
