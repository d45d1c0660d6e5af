"""What a ToR step costs on CPU, as ratios measured side by side in one process.

For a tiny and a small random Qwen2.5-VL, through verl's own ``FSDPEngineWithLMHead.forward_step`` (its non-packed
path on CPU: ``apply_monkey_patch`` model forward, with verl_tor's no-pixel fix; one micro-batch per pass, as verl's
worker runs it), on the same batch of verl rows (geometry images + prompts + random responses):

- ``old pass``: verl's old-policy pass over the with-image rows (log-probs + entropy), as ``_compute_old_log_prob``;
- ``image-free pass``: the ToR stage's extra pass (views built + scored, no entropy);
- ``select``: ranking + weights + metrics;
- ``update``: a vanilla actor update: the engine's forward with verl's ``ppo_loss`` as its loss function -> backward.

Ratios: image-free / old pass (target <= 0.8: it skips the vision tower and the image tokens), and
(old + update + ToR stage) / (old + update) for the whole step (target <= 1.15 on CPU). Peak memory is measured
per phase in a child process (ru_maxrss above the state after loading the model and data).

    python benchmarks/bench_stage.py [--rollouts 8] [--response-length 128] [--image-size 336]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    # name: (text layers, hidden, heads, kv heads, intermediate, vision depth, vision hidden)
    "tiny": (2, 64, 4, 2, 128, 2, 32),
    "small": (8, 256, 8, 4, 768, 4, 128),
}
PHASES = ("old_pass", "image_free_pass", "select", "update")


def setup(size: str, rollouts: int, response_length: int, image_size: int, seed: int = 0):
    import tempfile

    import torch
    from transformers import AutoModelForImageTextToText
    from verl.utils import hf_processor

    from verl_tor import tiny
    from verl_tor.config import ToRConfig
    from verl_tor.stage import rows_to_tensordict
    from verl_tor.tools.demo import build_batch
    from verl_tor.tools.in_process import InMemoryKV, setup_cpu_engine

    global _ENGINE
    layers, hidden, heads, kv, inter, vdepth, vhidden = SIZES[size]
    text = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
    )
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    section[0] += head_dim // 2 - sum(section)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    vision = dict(
        depth=vdepth,
        hidden_size=vhidden,
        intermediate_size=2 * vhidden,
        out_hidden_size=hidden,
        fullatt_block_indexes=[vdepth - 1],
    )
    ckpt = tempfile.mkdtemp(prefix=f"bench_{size}_")
    tiny.save_tiny_checkpoint(
        ckpt, seed=seed, max_pixels=image_size * image_size, text_config=text, vision_config=vision
    )
    processor = hf_processor(ckpt)  # verl's loader (binds get_rope_index)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    _ENGINE = setup_cpu_engine(model)  # verl's engine around verl's Qwen2.5-VL forward (no flash-attn on CPU)
    g = torch.Generator().manual_seed(seed)
    n_prompts = max(rollouts // 4, 1)
    items = [tiny.make_geometry_problem(seed + i) for i in range(n_prompts)]
    for item in items:
        item["image"] = item["image"].resize((image_size, image_size))
    vocab = len(processor.tokenizer) - 20
    responses = [[torch.randint(20, vocab, (response_length,), generator=g) for _ in range(4)] for _ in items]
    rows, keys = build_batch(processor, items, responses)
    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    return model, processor, rows, keys, store, ToRConfig(enable=True)


def prepare(model, processor, rows, keys, store, cfg) -> None:
    """What the later phases need from the old pass (old_log_probs, entropy); run before any measurement."""
    from verl_tor.tools.in_process import EngineLogProbScorer

    EngineLogProbScorer(store, _ENGINE).compute_old_log_prob(keys)


def run_phase(phase: str, model, processor, rows, keys, store, cfg) -> float:
    import torch
    from tensordict import TensorDict

    from verl_tor.stage import ToRStage, make_view_builder
    from verl_tor.tools.demo import _nest
    from verl_tor.tools.in_process import EngineLogProbScorer, KVMeta

    scorer = EngineLogProbScorer(store, _ENGINE)
    meta = KVMeta(keys=keys, partition_id="train", extra_info={"calculate_entropy": True, "temperature": 1.0})
    stage = ToRStage(
        config=cfg.replace(apply="loss"),
        score=scorer,
        make_meta=KVMeta,
        build_view=make_view_builder(cfg, processor),
        store=store,
    )
    t0 = time.perf_counter()
    if phase == "old_pass":
        scorer(meta)
    elif phase == "image_free_pass":
        stage.score_image_free(KVMeta(keys=keys, partition_id="train"), width=max(len(r["responses"]) for r in rows))
    elif phase == "select":
        timing: dict = {}
        cfg_select = cfg.replace(apply="loss", mode="reasoning_only")  # ranking + weights only
        ToRStage(config=cfg_select, score=scorer, make_meta=KVMeta, build_view=None, store=store).run(
            KVMeta(keys=keys, partition_id="train"), {}, timing, step=1
        )
    elif phase == "update":
        config = _ACTOR_CONFIG  # built once, outside the timing
        lengths = torch.tensor([len(r["responses"]) for r in rows])
        mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).float()
        advantages = torch.randn(len(rows), 1) * mask
        store.kv_batch_put(
            keys, "train", fields=TensorDict({"advantages": _nest(advantages, mask)}, batch_size=len(keys))
        )
        _update(model, store, keys, config)
    return time.perf_counter() - t0


def _update(model, store, keys, config) -> float:
    """One actor update over the batch: the engine's forward with verl's ppo_loss, then backward."""
    from functools import partial

    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    data = store.kv_batch_get(keys, "train")
    tu.assign_non_tensor(
        data,
        use_remove_padding=False,
        calculate_entropy=False,
        temperature=1.0,
        dp_size=1,
        batch_num_tokens=None,
        global_batch_size=None,
    )
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = _ENGINE.forward_step(data, loss_function=partial(ppo_loss, config=config), forward_only=False)
    loss.backward()
    model.eval()
    return float(loss.detach())


_ACTOR_CONFIG = None
_ENGINE = None


def child(args) -> dict:
    import torch

    from verl_tor.tools.in_process import build_actor_config

    global _ACTOR_CONFIG
    _ACTOR_CONFIG = build_actor_config("actor_rollout_ref.actor.loss_agg_mode=token-mean")

    torch.set_num_threads(os.cpu_count() or 1)
    state = setup(args.size, args.rollouts, args.response_length, args.image_size)
    # select and update read the old pass's outputs; the two passes start from the same state (model + rows), so
    # their peak memory above it compares like with like (a prior old pass would leave its peak in ru_maxrss)
    if args.phase not in ("old_pass", "image_free_pass"):
        prepare(*state)
    # peak RSS above the loaded model + data, including the first (warm-up) run: later runs reuse its memory
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_phase(args.phase, *state)  # warm-up
    times = [run_phase(args.phase, *state) for _ in range(args.repeats)]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = state[2]
    return {
        "phase": args.phase,
        "seconds": statistics.median(times),
        "extra_peak_mb": (peak_kb - base_kb) / 1024,
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "image_tokens": sum(int((r["prompts"] == state[0].config.image_token_id).sum()) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(child(args)))
        return

    import torch
    import verl

    print(
        f"# cores={os.cpu_count()} torch={torch.__version__} verl={verl.__version__} threads={torch.get_num_threads()}"
    )
    print(
        f"# command: python benchmarks/bench_stage.py --rollouts {args.rollouts} --response-length "
        f"{args.response_length} --image-size {args.image_size} --repeats {args.repeats}"
    )
    print("| model | phase | seconds | extra peak MB | tokens (image) |")
    print("| --- | --- | --- | --- | --- |")
    summary = {}
    for size in args.sizes.split(","):
        res = {}
        for phase in PHASES:
            cmd = [
                sys.executable,
                __file__,
                "--size",
                size,
                "--phase",
                phase,
                "--rollouts",
                str(args.rollouts),
                "--response-length",
                str(args.response_length),
                "--image-size",
                str(args.image_size),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            res[phase] = json.loads(out.stdout.strip().splitlines()[-1])
            r = res[phase]
            print(
                f"| {size} | {phase} | {r['seconds']:.3f} | {r['extra_peak_mb']:.0f} | "
                f"{r['tokens']} ({r['image_tokens']}) |"
            )
        summary[size] = res
    print()
    print("| model | image-free / old pass (time) | image-free / old pass (peak mem) | ToR step / vanilla step |")
    print("| --- | --- | --- | --- |")
    for size, res in summary.items():
        old, free, sel, upd = (res[p]["seconds"] for p in PHASES)
        old_mb, free_mb = res["old_pass"]["extra_peak_mb"], res["image_free_pass"]["extra_peak_mb"]
        mem = f"{free_mb / old_mb:.2f}" if old_mb >= 1 else "n/a (< 1 MB)"
        print(f"| {size} | {free / old:.2f} | {mem} | {(old + upd + free + sel) / (old + upd):.2f} |")


if __name__ == "__main__":
    main()
