"""The share of GRPO's policy gradient that T_r, T_p \\ T_r and the rest carry at the start of training (issue 20).

Per sampling seed: the grid's step-1 batch (``--prompts`` train problems of ``--task``, ``--responses`` samples each at
T = 1, verl's Geometry3K reward, verl's GRPO advantage), ToR's sets from the real stage with the paper's values
(top-p entropy 0.95, |Δ log p| with the image removed, ρ_r = ρ_p = 0.3 over the batch), and the gradient of verl's
token-mean loss at ratio = 1 split over the sets (``verl_tor.tools.gradient_split``). Prints a markdown table (mean
and min-max over seeds) and writes every seed's numbers to ``--out``.

    python recipes/cpu_tiny/gradient_split.py --checkpoint verl_tor/assets/figure_reader_plus --seeds 1 2 3 4 5 \\
        --out gradient_split.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without an install


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run(args: argparse.Namespace) -> dict:
    """Every seed's split and the summary over seeds, as written to ``--out``."""
    import torch

    from verl_tor.figures import load_figure_reader, make_problem, split_seeds
    from verl_tor.tools.gradient_split import measure_gradient_split, sample_grpo_batch, summarize_seeds

    torch.set_num_threads(args.threads)  # a 1M-parameter model: more threads buy little on a shared machine
    model, processor = load_figure_reader(args.checkpoint)
    per_seed = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        # the step-1 batch of a run with this seed: its own train problems, its own samples
        problems = [make_problem(s, args.task) for s in split_seeds("train", args.prompts, seed=seed)]
        responses, rewards = sample_grpo_batch(
            model, processor, problems, n=args.responses, seed=seed, max_new_tokens=args.max_new_tokens
        )
        split = measure_gradient_split(model, processor, problems, responses, rewards)
        per_seed[seed] = {**split.as_dict(), "seconds": time.perf_counter() - t0}
        print(
            f"seed {seed}: mean reward {split.reward_mean:.3f}, ||g|| {split.grad_norm:.4g}, projection shares "
            + ", ".join(f"{k} {v:.3f}" for k, v in split.projection_share.items())
            + f" ({per_seed[seed]['seconds']:.1f} s)",
            flush=True,
        )
    return {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "checkpoint": args.checkpoint,
        "task": args.task,
        "prompts": args.prompts,
        "responses": args.responses,
        "max_new_tokens": args.max_new_tokens,
        "seeds": {str(k): v for k, v in per_seed.items()},
        "summary": summarize_seeds(per_seed),
    }


def main(argv: list[str] | None = None) -> int:
    from verl_tor.figures.model import FIGURE_READER_PLUS_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default=FIGURE_READER_PLUS_CHECKPOINT, help="figure-reader checkpoint directory")
    p.add_argument("--task", default="area_plus", choices=("area", "area_plus"), help="the figure task")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="sampling seeds (one batch each)")
    p.add_argument("--prompts", type=int, default=8, help="problems per batch (the grid's 8)")
    p.add_argument("--responses", type=int, default=4, help="responses per problem (the grid's 4)")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="response length cap (the area_plus grid's MAX_RESPONSE_LENGTH)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON file for every seed's numbers and the summary")
    args = p.parse_args(argv)
    for name in ("prompts", "responses", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: give an integer >= 1")
    if args.responses < 2:
        p.error(f"--responses={args.responses}: GRPO needs >= 2 responses per problem for a group baseline")

    from verl_tor.tools.gradient_split import format_table

    result = run(args)
    print()
    print(f"GRPO gradient split at step 1: {args.checkpoint}, task {args.task}, seeds {args.seeds}, mean (min-max)")
    print()
    print(format_table(result["summary"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(_json_safe(result), f, indent=2, sort_keys=True)
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
