"""What ``tor.rank_tokens=informative`` saves: rows and time of the image-free pass, measured side by side in one run.

In GRPO every token of a group whose rewards are all equal has advantage 0: it cannot change the policy gradient.
``rank_tokens=all`` (the paper) still scores those responses in the image-free pass and ranks their tokens;
``informative`` sends them to the pass as 2-token placeholders and ranks only tokens with a non-zero advantage.

A batch of ``--prompts`` geometry prompts x ``--n`` rollouts (random response tokens, a tiny random Qwen2.5-VL built
offline) where a share ``--equal-share`` of the groups have all-equal rewards (advantage 0) and the others 0/1
rewards through verl's GRPO advantage. Both arms run the real ToR stage (``ToRStage.run``: views, the image-free pass
through verl's own ``FSDPEngineWithLMHead.forward_step`` on CPU, selection, weights) on the same stored batch, in
alternation, ``--repeats`` times each after a warm-up; the table shows medians and the ratio informative / all.

    python benchmarks/bench_informative.py [--prompts 8] [--n 4] [--equal-share 0.5] [--response-length 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def build(prompts: int, n: int, equal_share: float, response_length: int, image_size: int, seed: int = 0):
    """The stored batch after verl's old-policy pass and GRPO advantage, and the engine scoring it."""
    import tempfile

    import numpy as np
    import torch
    from tensordict import TensorDict
    from transformers import AutoModelForImageTextToText
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.utils import hf_processor

    from verl_tor import tiny
    from verl_tor.stage import rows_to_tensordict
    from verl_tor.tools.demo import _nest, build_batch
    from verl_tor.tools.in_process import EngineLogProbScorer, InMemoryKV, setup_cpu_engine

    ckpt = tempfile.mkdtemp(prefix="bench_informative_")
    tiny.save_tiny_checkpoint(ckpt, seed=seed, max_pixels=image_size * image_size)
    processor = hf_processor(ckpt)  # verl's loader (binds get_rope_index)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    engine = setup_cpu_engine(model)  # verl's engine around verl's Qwen2.5-VL forward (no flash-attn on CPU)
    g = torch.Generator().manual_seed(seed)
    items = [tiny.make_geometry_problem(seed + i) for i in range(prompts)]
    for item in items:
        item["image"] = item["image"].resize((image_size, image_size))
    vocab = len(processor.tokenizer) - 20
    responses = [[torch.randint(20, vocab, (response_length,), generator=g) for _ in range(n)] for _ in items]
    rows, keys = build_batch(processor, items, responses)
    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    EngineLogProbScorer(store, engine).compute_old_log_prob(keys)

    # rewards: the first round(share * prompts) groups all equal (0.9: right answer every time), the rest 0/1
    n_equal = round(equal_share * prompts)
    scores = torch.zeros(len(rows), response_length)
    for i in range(len(rows)):
        group, member = divmod(i, n)
        scores[i, -1] = 0.9 if group < n_equal else float(member % 2)
    mask = torch.ones(len(rows), response_length)
    uids = np.array([r["uid"] for r in rows], dtype=object)
    advantages, _ = compute_grpo_outcome_advantage(scores, mask, uids)
    store.kv_batch_put(keys, "train", fields=TensorDict({"advantages": _nest(advantages, mask)}, batch_size=len(keys)))
    return processor, engine, store, keys, n_equal


class CountingScorer:
    """verl's engine forward as the worker group's ``compute_log_prob``, counting the tokens each call scores."""

    def __init__(self, store, engine):
        from verl_tor.tools.in_process import EngineLogProbScorer

        self.scorer, self.store, self.rows, self.tokens = EngineLogProbScorer(store, engine), store, 0, 0

    def __call__(self, meta):
        ids = self.store.kv_batch_get(meta.keys, meta.partition_id, ["input_ids"])["input_ids"]
        lengths = ids.offsets().diff()
        self.rows += int((lengths > 2).sum())  # 2-token placeholders are not scored rows
        self.tokens += int(lengths.sum())
        return self.scorer(meta)


def run_stage(rank_tokens: str, processor, engine, store, keys) -> dict:
    """One ToR stage over the stored batch (apply=loss: the stored advantages stay as they are for the next run)."""
    from verl_tor.config import ToRConfig
    from verl_tor.stage import ToRStage, make_view_builder
    from verl_tor.tools.in_process import KVMeta

    cfg = ToRConfig(enable=True, apply="loss", rank_tokens=rank_tokens)
    scorer = CountingScorer(store, engine)
    stage = ToRStage(
        config=cfg, score=scorer, make_meta=KVMeta, build_view=make_view_builder(cfg, processor), store=store
    )
    metrics, timing = {}, {}
    t0 = time.perf_counter()
    stage.run(KVMeta(keys=keys, partition_id="train"), metrics, timing, step=1)
    return {
        "stage_s": time.perf_counter() - t0,
        "noimg_s": timing.get("tor_noimg", 0.0),
        "rows": scorer.rows,
        "tokens": scorer.tokens,
        "reasoning_frac": metrics["tor/reasoning_frac"],
        "perception_frac": metrics["tor/perception_frac"],
        "informative_frac": metrics.get("tor/informative_frac", 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="rollouts per prompt (GRPO group size)")
    parser.add_argument("--equal-share", type=float, default=0.5, help="share of groups with all-equal rewards")
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not 0 <= args.equal_share < 1:
        parser.error("--equal-share: give a share in [0, 1) (at least one group must be informative)")

    import torch
    import verl

    torch.set_num_threads(os.cpu_count() or 1)
    processor, engine, store, keys, n_equal = build(
        args.prompts, args.n, args.equal_share, args.response_length, args.image_size
    )
    arms = ("all", "informative")
    for arm in arms:  # warm-up
        run_stage(arm, processor, engine, store, keys)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):  # alternate, so both arms see the same machine load
        for arm in arms:
            runs[arm].append(run_stage(arm, processor, engine, store, keys))

    print(f"# bench_informative: {sys.executable} {' '.join(sys.argv)}")
    print(
        f"# cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}, "
        f"verl {verl.__version__}, python {platform.python_version()}"
    )
    print(
        f"# batch: {args.prompts} prompts x {args.n} rollouts, {args.response_length} response tokens, "
        f"{args.image_size}x{args.image_size} images; {n_equal} of {args.prompts} groups with all-equal rewards; "
        f"median of {args.repeats}"
    )
    print()
    print(
        "| rank_tokens | rows scored | tokens sent | image-free pass s | stage s | ranked / valid tokens "
        "| reasoning_frac of ranked | perception_frac of ranked |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    med = {}
    for arm in arms:
        r = runs[arm]
        med[arm] = {k: statistics.median(x[k] for x in r) for k in r[0]}
        m = med[arm]
        print(
            f"| {arm} | {int(m['rows'])} | {int(m['tokens'])} | {m['noimg_s']:.3f} | {m['stage_s']:.3f} | "
            f"{m['informative_frac']:.3f} | {m['reasoning_frac']:.3f} | {m['perception_frac']:.3f} |"
        )
    a, b = med["all"], med["informative"]
    print()
    print("| informative / all | rows scored | tokens sent | image-free pass time | stage time |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| ratio | {b['rows'] / a['rows']:.3f} | {b['tokens'] / a['tokens']:.3f} | "
        f"{b['noimg_s'] / a['noimg_s']:.3f} | {b['stage_s'] / a['stage_s']:.3f} |"
    )


if __name__ == "__main__":
    main()
