"""``verl-tor demo``: one real ToR step on CPU, on a tiny random Qwen2.5-VL built offline.

Phases (each with a progress bar):
1. build a tiny Qwen2.5-VL and its processor (``verl_tor.tiny``), save them, and load them back through verl's
   own loaders (``verl.utils.hf_processor``) and transformers' ``from_pretrained``;
2. render synthetic geometry problems with PIL (the answer depends on the picture) and sample responses;
3. store the trajectories exactly as verl's agent loop does (``verl_tor.testing.build_verl_row``, verl's code);
4. the old-policy pass (log-probs + entropy) and verl's GRPO advantage (``compute_grpo_outcome_advantage``);
5. the real ToR stage: image-free views -> extra log-prob pass -> S_t -> selection -> weights -> metrics;
6. one loss/backward step through verl's ``ppo_loss``, without and with ToR;
then a table of the ``tor/*`` metrics and an HTML token map.

The rewards are a toy (the tiny model is random, so the geometry answers are always wrong): each response gets
a pseudo-score from its token ids so that GRPO advantages are non-zero. Everything else is the production path.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from verl_tor.config import ToRConfig


@dataclass
class DemoResult:
    metrics: dict[str, float]
    losses: dict[str, tuple[float, float]]
    """name -> (loss, gradient norm) of one ppo_loss backward."""
    html_path: str
    seconds: dict[str, float] = field(default_factory=dict)
    n_tokens: int = 0


def _progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=True, dynamic_ncols=True)


def run_demo(
    cfg: ToRConfig,
    out_dir: str,
    n_prompts: int = 4,
    n: int = 4,
    max_new_tokens: int = 24,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Run the demo; returns the metrics, the two losses and the path of the token map."""
    from transformers import AutoModelForImageTextToText
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.utils import hf_processor

    from verl_tor import tiny
    from verl_tor.stage import ToRStage, make_view_builder, rows_to_tensordict
    from verl_tor.testing import InMemoryKV, KVMeta, LocalLogProbScorer, build_verl_row
    from verl_tor.viz import build_rollouts, render_token_map

    seconds: dict[str, float] = {}
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)

    # 1. model + processor, through the real loading code
    t0 = time.perf_counter()
    ckpt = os.path.join(out_dir, "tiny_qwen2_5_vl")
    for _ in _progress(range(1), "build tiny Qwen2.5-VL", enabled=progress):
        tiny.save_tiny_checkpoint(ckpt, seed=seed)
        processor = hf_processor(ckpt)
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
        model.eval()
    if processor is None or not hasattr(processor, "get_rope_index"):
        raise RuntimeError(f"verl could not load a Qwen2.5-VL processor from {ckpt}")
    seconds["build"] = time.perf_counter() - t0

    # 2. problems and rollouts
    t0 = time.perf_counter()
    problems = [tiny.make_geometry_problem(seed + i) for i in range(n_prompts)]
    rows, keys, uids, images = [], [], [], []
    gen = torch.Generator().manual_seed(seed)
    # a random model happily emits <|image_pad|> etc.; a real rollout would not, and verl's row code refuses it
    from verl_tor.views import VisionTokenIds

    banned = [[t] for t in VisionTokenIds.from_processor(processor).all]
    for i, prob in enumerate(_progress(problems, "sample responses", enabled=progress)):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prob["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], images=[prob["image"]], return_tensors="pt")
        with torch.no_grad():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                bad_words_ids=banned,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        prompt_ids = enc["input_ids"][0]
        for j in range(n):
            response = out[j, prompt_ids.numel() :]
            response = response[response != processor.tokenizer.pad_token_id]
            if response.numel() == 0:
                response = out[j, prompt_ids.numel() : prompt_ids.numel() + 1]
            row = build_verl_row(processor, prompt_ids, response, [prob["image"]])
            # toy outcome reward on the last token, so GRPO has something to rank
            score = float(int(response.sum()) % 3 == 0)
            row["rm_scores"] = torch.zeros(response.numel())
            row["rm_scores"][-1] = score
            row["uid"] = f"prompt{i}"
            rows.append(row)
            keys.append(f"prompt{i}_{j}_0")
            uids.append(f"prompt{i}")
            images.append(prob["image"])
    seconds["rollout"] = time.perf_counter() - t0

    # 3. store as verl does
    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    meta = KVMeta(keys=keys, partition_id="train", extra_info={"temperature": 1.0})
    scorer = LocalLogProbScorer.for_model(store, model)

    # 4. old-policy pass + GRPO advantage (verl's)
    t0 = time.perf_counter()
    from verl.workers.utils.padding import response_from_nested

    for _ in _progress(range(1), "old-policy pass", enabled=progress):
        meta.extra_info.update({"calculate_entropy": True, "compute_loss": False})
        scorer.compute_log_prob(meta)
        got = store.kv_batch_get(keys, "train", ["log_probs", "entropy", "response_mask"])
        old = response_from_nested(got["log_probs"], got["response_mask"])
        ent = response_from_nested(got["entropy"], got["response_mask"])
        store.kv_batch_put(keys, "train", fields=_td({"old_log_probs": old, "entropy": ent}, len(keys)))
    seconds["old_log_prob"] = time.perf_counter() - t0
    data = store.kv_batch_get(keys, "train", ["response_mask", "rm_scores"])
    mask = torch.nested.to_padded_tensor(data["response_mask"], 0).float()
    scores = torch.nested.to_padded_tensor(data["rm_scores"], 0.0)
    advantages, _ = compute_grpo_outcome_advantage(scores, mask, np.array(uids, dtype=object))
    store.kv_batch_put(keys, "train", fields=_td({"advantages": _nest(advantages, mask)}, len(keys)))

    # 5. the ToR stage
    captured: dict[str, Any] = {}
    stage = ToRStage(
        config=cfg,
        score=scorer.compute_log_prob,
        make_meta=KVMeta,
        build_view=make_view_builder(cfg, processor),
        store=store,
        temperature=1.0,
        on_weights=lambda **kw: captured.update(kw),
    )
    metrics: dict[str, float] = {}
    timing: dict[str, float] = {}
    for _ in _progress(range(1), "ToR stage (image-free pass + selection)", enabled=progress):
        stage.run(meta, metrics, timing, step=1)
    seconds.update({f"tor_{k}": v for k, v in timing.items()})

    # 6. one loss/backward step through verl's ppo_loss, stock vs ToR (apply=advantage: weighted advantages)
    losses = {}
    for name, adv in _progress(
        [("stock GRPO", advantages), (f"ToR-GRPO ({cfg.mode})", _weighted(store, keys))],
        "loss + backward",
        enabled=progress,
    ):
        losses[name] = _loss_step(model, rows, store, keys, adv, mask)

    # token map
    t = captured["tensors"]
    html_path = os.path.join(out_dir, "token_map.html")
    rollouts = build_rollouts(
        processor.tokenizer,
        [r["responses"] for r in rows],
        t["entropy"],
        t["sensitivity"],
        t["weights"],
        t["reasoning"],
        t["perception"],
        prompts=[p["question"] for p in problems for _ in range(n)],
        images=images,
        limit=cfg.log_token_maps_rollouts * 2,
    )
    valid = t["response_mask"].bool()
    page = render_token_map(
        rollouts,
        thresholds=t["thresholds"],
        summary={k: v for k, v in metrics.items() if k.startswith("tor/")},
        title="verl-tor demo: tokens ToR reweights",
        all_entropy=t["entropy"][valid].tolist(),
        all_sensitivity=(t["sensitivity"][valid].tolist() if t["sensitivity"] is not None else []),
    )
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"metrics": metrics, "losses": losses, "seconds": seconds}, f, indent=2, sort_keys=True)
    return DemoResult(metrics=metrics, losses=losses, html_path=html_path, seconds=seconds, n_tokens=int(valid.sum()))


def _td(fields: dict, n: int):
    from tensordict import TensorDict

    return TensorDict(fields, batch_size=n)


def _nest(padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.nested.as_nested_tensor(
        [padded[i, : int(m)] for i, m in enumerate(mask.sum(1).tolist())], layout=torch.jagged
    )


def _weighted(store, keys) -> torch.Tensor:
    return torch.nested.to_padded_tensor(store.kv_batch_get(keys, "train", ["advantages"])["advantages"], 0.0)


def _loss_step(model, rows, store, keys, advantages: torch.Tensor, mask: torch.Tensor) -> float:
    """Current-policy log-probs with grad -> verl's ppo_loss (vanilla, token-mean) -> backward; returns the loss."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    from verl_tor.stage import rows_to_tensordict
    from verl_tor.testing import build_actor_config

    model.train()
    model.zero_grad(set_to_none=True)
    seq_log_probs = []
    for row in rows:
        pos = row["position_ids"].unsqueeze(1)
        mm = {k: v for k, v in row["multi_modal_inputs"].items() if k in ("pixel_values", "image_grid_thw")}
        logits = model(input_ids=row["input_ids"][None], position_ids=pos, **mm).logits[0].float()
        labels = torch.roll(row["input_ids"], -1)
        seq_log_probs.append(torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1))
    values = torch.cat(seq_log_probs)
    offsets = torch.tensor([0] + np.cumsum([len(x) for x in seq_log_probs]).tolist())
    log_probs = torch.nested.nested_tensor_from_jagged(values, offsets)
    data = rows_to_tensordict([{"prompts": r["prompts"], "responses": r["responses"]} for r in rows])
    got = store.kv_batch_get(keys, "train", ["old_log_probs", "response_mask"])
    data["old_log_probs"] = got["old_log_probs"]
    data["response_mask"] = got["response_mask"]
    data["advantages"] = _nest(advantages, mask)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    config = build_actor_config("actor_rollout_ref.actor.loss_agg_mode=token-mean")
    loss, _ = ppo_loss(config, {"log_probs": log_probs}, data)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    model.eval()
    return float(loss.detach()), float(grad_norm)


def main(args: argparse.Namespace, cfg: ToRConfig) -> int:
    t0 = time.perf_counter()
    result = run_demo(
        cfg,
        out_dir=args.out_dir,
        n_prompts=args.prompts,
        n=args.n,
        max_new_tokens=args.response_length,
        seed=args.seed,
        progress=not args.no_progress,
    )
    total = time.perf_counter() - t0
    print()
    print(f"ToR on {result.n_tokens} response tokens ({args.prompts} prompts x {args.n} responses), mode={cfg.mode}")
    width = max(len(k) for k in result.metrics)
    print(f"{'metric':<{width}}  value")
    for key in sorted(result.metrics):
        print(f"{key:<{width}}  {result.metrics[key]:.4f}")
    for name, (loss, grad_norm) in result.losses.items():
        print(f"{'loss: ' + name:<{width}}  {loss:.6f}  (grad norm {grad_norm:.4f})")
    print(f"token map: {result.html_path}")
    print(f"total {total:.1f} s")
    return 0
