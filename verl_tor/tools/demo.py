"""``verl-tor demo``: one real ToR step on CPU, on a tiny random Qwen2.5-VL built offline.

Phases (each with a progress bar):
1. build a tiny Qwen2.5-VL and its processor (``verl_tor.tiny``), save them, and load them back through verl's
   own loaders (``verl.utils.hf_processor``) and transformers' ``from_pretrained``;
2. render synthetic geometry problems with PIL (the answer depends on the picture) and sample responses;
3. store the trajectories exactly as verl's agent loop does (``verl_tor.tools.in_process.build_verl_row``, verl's code);
4. the old-policy pass (log-probs + entropy) through verl's engine forward (``FSDPEngineWithLMHead.forward_step``,
   non-packed path on CPU) and verl's GRPO advantage (``compute_grpo_outcome_advantage``);
5. the real ToR stage: image-free views -> extra log-prob pass (the same engine forward; the image-free rows take
   verl's no-pixel branch, with verl_tor's fix) -> S_t -> selection -> weights -> metrics;
6. one loss/backward step through verl's ``ppo_loss``, without and with ToR;
then a table of the ``tor/*`` metrics and an HTML token map.

The rewards are a toy (the tiny model is random, so the geometry answers are always wrong): each response gets
a pseudo-score from its token ids so that GRPO advantages are non-zero. Everything else is the production path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from verl_tor.config import ToRConfig, ToRConfigError


@dataclass
class DemoResult:
    metrics: dict[str, float]
    losses: dict[str, tuple[float, float]]
    """name -> (loss, gradient norm) of one ppo_loss backward."""
    html_path: str
    seconds: dict[str, float] = field(default_factory=dict)
    n_tokens: int = 0
    scorer: str = ""
    """What ran the old-policy and image-free passes (``EngineLogProbScorer``: verl's engine forward)."""


def _progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=True, dynamic_ncols=True)


def sample_responses(model, processor, items: list[dict], n: int, max_new_tokens: int, seed: int, progress: bool):
    """``n`` sampled responses (token-id tensors) per item ({``image`` or ``images``, ``question``/``messages``})."""
    from verl_tor.views import VisionTokenIds

    gen = torch.Generator().manual_seed(seed)
    # a random model happily emits <|image_pad|> etc.; a real rollout would not, and verl's row code refuses it
    banned = [[t] for t in VisionTokenIds.from_processor(processor).all]
    out_all = []
    device = next(model.parameters()).device
    for item in _progress(items, "sample responses", enabled=progress):
        enc = encode_prompt(processor, item)
        with torch.no_grad():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            out = model.generate(
                **{k: v.to(device) for k, v in enc.items()},
                do_sample=True,
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                bad_words_ids=banned,
                pad_token_id=processor.tokenizer.pad_token_id,
            ).cpu()
        start = enc["input_ids"].shape[1]
        responses = []
        for j in range(n):
            response = out[j, start:]
            keep = response != processor.tokenizer.pad_token_id
            responses.append(response[keep] if keep.any() else response[:1])
        out_all.append(responses)
    return out_all


def item_images(item: dict) -> list:
    return list(item.get("images") or ([item["image"]] if item.get("image") is not None else []))


def item_messages(item: dict) -> list[dict]:
    if "messages" in item:
        return item["messages"]
    content = [{"type": "image"} for _ in item_images(item)] + [{"type": "text", "text": item["question"]}]
    return [{"role": "user", "content": content}]


def encode_prompt(processor, item: dict) -> dict:
    text = processor.apply_chat_template(item_messages(item), add_generation_prompt=True, tokenize=False)
    images = item_images(item) or None
    return dict(processor(text=[text], images=images, return_tensors="pt"))


def build_batch(processor, items: list[dict], responses: list[list[torch.Tensor]]):
    """verl V1 rows (by verl's own agent-loop code) for every (item, response); uid = item index."""
    from verl_tor.tools.in_process import build_verl_row

    rows, keys = [], []
    for i, (item, item_responses) in enumerate(zip(items, responses)):
        prompt_ids = encode_prompt(processor, item)["input_ids"][0]
        for j, response in enumerate(item_responses):
            row = build_verl_row(processor, prompt_ids, response, item_images(item) or None)
            row["uid"] = f"prompt{i}"
            rows.append(row)
            keys.append(f"prompt{i}_{j}_0")
    return rows, keys


def run_old_policy_pass(model, rows: list[dict], keys: list[str], cfg: ToRConfig, progress: bool, make_scorer=None):
    """Store the rows in an in-memory TransferQueue and run verl's old-policy pass over them (log-probs + entropy).

    Returns ``(store, scorer, timing)``. ``make_scorer(store)`` gives the worker stand-in (default:
    ``LocalLogProbScorer``, the model's own forward; ``verl-tor demo`` uses verl's engine forward, ``engine_scorer``).
    """
    from verl_tor.stage import rows_to_tensordict
    from verl_tor.tools.in_process import InMemoryKV, LocalLogProbScorer

    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    scorer = (make_scorer or (lambda kv: LocalLogProbScorer.for_model(kv, model)))(store)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    for _ in _progress(range(1), "old-policy pass", enabled=progress):
        # tor.entropy=top_p: the flag the ToR trainer sets for verl's old-policy pass (verl_tor.integration.engine)
        top_p = cfg.entropy_top_p if cfg.enable and cfg.entropy == "top_p" else None
        scorer.compute_old_log_prob(keys, entropy_top_p=top_p)
    timing["old_log_prob"] = time.perf_counter() - t0
    return store, scorer, timing


def run_tor(
    model,
    processor,
    rows: list[dict],
    keys: list[str],
    cfg: ToRConfig,
    progress: bool,
    advantages=None,
    make_scorer=None,
):
    """Old-policy pass + the real ToR stage over an in-memory store.

    Returns ``(store, metrics, stage tensors, timing, scorer)``; ``scorer.calls`` lists the passes it ran.

    ``make_scorer(store)`` gives the worker stand-in for both passes (default: ``LocalLogProbScorer``, the model's
    own forward; ``verl-tor demo`` uses verl's engine forward, see ``engine_scorer``). Without ``advantages``
    (``verl-tor inspect``: no rewards) the weights themselves are stored (``apply=loss``), and
    ``rank_tokens=informative`` is refused.
    """
    from tensordict import TensorDict

    from verl_tor.stage import ToRStage, make_view_builder
    from verl_tor.tools.in_process import KVMeta

    if advantages is None and cfg.rank_tokens == "informative":
        raise ToRConfigError(
            "tor.rank_tokens='informative' ranks tokens with a non-zero advantage, but no advantages were given "
            "(no rewards). Fix: set tor.rank_tokens=all, or pass the advantages."
        )
    store, scorer, timing = run_old_policy_pass(model, rows, keys, cfg, progress, make_scorer)
    if advantages is not None:
        store.kv_batch_put(keys, "train", fields=TensorDict({"advantages": advantages}, batch_size=len(keys)))
    elif cfg.apply == "advantage":
        cfg = cfg.replace(apply="loss")  # nothing to scale: store the weights themselves
    captured: dict[str, Any] = {}
    stage = ToRStage(
        config=cfg,
        score=scorer,
        make_meta=KVMeta,
        build_view=make_view_builder(cfg, processor) if cfg.needs_image_free_pass else None,
        store=store,
        temperature=1.0,
        on_weights=lambda **kw: captured.update(kw),
    )
    metrics: dict[str, float] = {}
    for _ in _progress(range(1), "ToR stage (image-free pass + selection)", enabled=progress):
        stage.run(KVMeta(keys=keys, partition_id="train"), metrics, timing, step=1)
    return store, metrics, captured["tensors"], timing, scorer


def engine_scorer(model):
    """``store -> EngineLogProbScorer``: both passes through verl's real ``FSDPEngineWithLMHead.forward_step``
    (``verl_tor.tools.in_process.setup_cpu_engine``: process-wide, so the demo runs in a process of its own)."""
    from verl_tor.tools.in_process import EngineLogProbScorer, setup_cpu_engine

    engine = setup_cpu_engine(model)
    return lambda store: EngineLogProbScorer(store, engine)


def write_token_map(
    path: str,
    processor,
    rows,
    items_per_row,
    tensors,
    metrics,
    title: str,
    limit: int,
    keys: list[str] | None = None,
    cfg: ToRConfig | None = None,
    rewards: list[float] | None = None,
    reward_absent: str = "",
    reward_label: str = "reward",
) -> str:
    """The token map of a one-step run (``--one-step``, ``verl-tor inspect``).

    Cards are titled by prompt and rollout (from ``keys``, ``build_batch``'s ``prompt{i}_{j}_0``) and show the
    reward (``rewards``, one per row; absent with ``reward_absent`` when None), the response's ``\\boxed{}`` answer
    and the item's ground truth (``item["ground_truth"]``, or ``item["ground_truth_absent"]`` saying why there is
    none). ``cfg`` (scope, mode, rank_tokens) lets the page mark the tokens the seeded tie-break decided.
    """
    from verl_tor.viz import (
        build_rollouts,
        card_facts,
        compute_tie_marks,
        number_rollouts,
        render_token_map,
        rollout_title,
        segments_for,
        why_ties_unmarked,
    )

    keys = keys if keys is not None else [f"row{i}_0_0" for i in range(len(rows))]
    cfg = cfg or ToRConfig(enable=True)
    valid = tensors["response_mask"].bool()
    numbers = number_rollouts(keys)
    order = sorted(range(len(rows)), key=lambda i: numbers[i][:2])[:limit]
    rollouts = build_rollouts(
        processor.tokenizer,
        [rows[i]["responses"] for i in order],
        tensors["entropy"],
        tensors["sensitivity"],
        tensors["weights"],
        tensors["reasoning"],
        tensors["perception"],
        prompts=[items_per_row[i].get("question", "") for i in order],
        images=[(item_images(items_per_row[i]) or [None])[0] for i in order],
        rows=order,
        tie_marks=compute_tie_marks(tensors, segments_for(cfg.scope, keys), cfg.mode, cfg.rank_tokens),
    )
    for r, i in zip(rollouts, order):
        item = items_per_row[i]
        r.title, r.subtitle = rollout_title(*numbers[i]), f"key {keys[i]}"
        r.facts = card_facts(
            "".join(r.tokens),
            reward=rewards[i] if rewards is not None else None,
            reward_absent=reward_absent,
            reward_label=reward_label,
            ground_truth=item.get("ground_truth", item.get("answer")),
            ground_truth_absent=item.get("ground_truth_absent", "the item has none"),
        )
    page = render_token_map(
        rollouts,
        thresholds=tensors["thresholds"],
        summary={k: v for k, v in metrics.items() if k.startswith("tor/")},
        title=title,
        all_entropy=tensors["entropy"][valid].tolist(),
        all_sensitivity=(tensors["sensitivity"][valid].tolist() if tensors["sensitivity"] is not None else []),
        ties_unmarked=why_ties_unmarked(cfg.mode, cfg.rank_tokens),
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def run_demo(
    cfg: ToRConfig,
    out_dir: str,
    n_prompts: int = 4,
    n: int = 4,
    max_new_tokens: int = 24,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Run the demo; returns the metrics, the losses (stock GRPO and ToR-GRPO) and the path of the token map.

    ``tor.apply=loss`` applies the weights through the trainer's loss wrapper (``verl_tor.loss``). With
    ``cfg.enable`` False the run is verl's stock GRPO step only: no ToR metrics, one loss, no token map
    (``html_path`` is ``""``)."""
    from transformers import AutoModelForImageTextToText
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.utils import hf_processor

    from verl_tor import tiny

    for name, value in (("n_prompts", n_prompts), ("n", n), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"run_demo: {name}={value!r}; give an integer >= 1")
    seconds: dict[str, float] = {}
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)

    # 1. model + processor, through the real loading code
    t0 = time.perf_counter()
    ckpt = os.path.join(out_dir, "tiny_qwen2_5_vl")
    for _ in _progress(range(1), "build tiny Qwen2.5-VL", enabled=progress):
        tiny.save_tiny_checkpoint(ckpt, seed=seed)
        processor = hf_processor(ckpt)
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    if processor is None or not hasattr(processor, "get_rope_index"):
        raise RuntimeError(f"verl could not load a Qwen2.5-VL processor from {ckpt}")
    seconds["build"] = time.perf_counter() - t0

    # 2. problems, rollouts, verl rows
    t0 = time.perf_counter()
    problems = [tiny.make_geometry_problem(seed + i) for i in range(n_prompts)]
    responses = sample_responses(model, processor, problems, n, max_new_tokens, seed, progress)
    rows, keys = build_batch(processor, problems, responses)
    seconds["rollout"] = time.perf_counter() - t0

    # 3. GRPO advantages from a toy outcome reward (verl's estimator)
    lengths = torch.tensor([len(r["responses"]) for r in rows])
    mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).float()
    scores = torch.zeros_like(mask)
    for i, r in enumerate(rows):  # toy reward on the last token (the random model never solves the problem)
        scores[i, len(r["responses"]) - 1] = float(int(r["responses"].sum()) % 3 == 0)
    uids = np.array([r["uid"] for r in rows], dtype=object)
    advantages, _ = compute_grpo_outcome_advantage(scores, mask, uids)

    # 4. old-policy pass + the ToR stage, through verl's engine forward (top-p entropy: verl computes it on the
    # packed flash-attn path only, so that case scores with the model's own forward and the same top-p flag)
    make_scorer = engine_scorer(model) if cfg.entropy == "full" else None
    nested_advantages = _nest(advantages, mask)
    if cfg.enable:
        store, metrics, tensors, timing, scorer = run_tor(
            model, processor, rows, keys, cfg, progress, advantages=nested_advantages, make_scorer=make_scorer
        )
    else:  # tor.enable=false means it: verl's stock GRPO step, no image-free pass, no weights
        store, scorer, timing = run_old_policy_pass(model, rows, keys, cfg, progress, make_scorer)
        metrics, tensors = {}, None
    passes = ", ".join(f"{c['partition_id']} ({c['n']} rows)" for c in scorer.calls)
    scorer_name = f"{type(scorer).__name__}: {passes}"
    seconds.update({f"tor_{k}": v for k, v in timing.items()})

    # 5. one loss/backward step through verl's ppo_loss, stock vs ToR (ToR applied as the trainer applies it)
    losses = {}
    arms = [("stock GRPO", advantages, None)]  # (name, advantages, tor_weights)
    if cfg.enable and cfg.apply == "advantage":  # the stage scaled the stored advantages: w_t·A_t
        arms.append((f"ToR-GRPO ({cfg.mode})", tensors["weights"] * advantages, None))
    elif cfg.enable:  # apply=loss: the trainer's loss wrapper folds tor_weights into rollout_is_weights
        arms.append((f"ToR-GRPO ({cfg.mode})", advantages, tensors["weights"]))
    from verl_tor.tools.in_process import build_actor_config

    actor_config = build_actor_config("actor_rollout_ref.actor.loss_agg_mode=token-mean")  # hydra: compose once
    for name, arm_advantages, tor_weights in _progress(arms, "loss + backward", enabled=progress):
        losses[name] = _loss_step(
            model, rows, store, keys, arm_advantages, mask, config=actor_config, tor_weights=tor_weights
        )

    html_path = ""
    if cfg.enable:
        items_per_row = [p for p in problems for _ in range(n)]
        html_path = write_token_map(
            os.path.join(out_dir, "token_map.html"),
            processor,
            rows,
            items_per_row,
            tensors,
            metrics,
            "verl-tor demo: tokens ToR reweights",
            limit=cfg.log_token_maps_rollouts * 2,
            keys=keys,
            cfg=cfg,
            rewards=scores.sum(dim=1).tolist(),
            reward_label="toy reward (token ids sum % 3 == 0)",
        )
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"metrics": metrics, "losses": losses, "seconds": seconds}, f, indent=2, sort_keys=True)
    return DemoResult(
        metrics=metrics,
        losses=losses,
        html_path=html_path,
        seconds=seconds,
        n_tokens=int(mask.sum()),
        scorer=scorer_name,
    )


def _td(fields: dict, n: int):
    from tensordict import TensorDict

    return TensorDict(fields, batch_size=n)


def _nest(padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.nested.as_nested_tensor(
        [padded[i, : int(m)] for i, m in enumerate(mask.sum(1).tolist())], layout=torch.jagged
    )


def _loss_step(
    model,
    rows,
    store,
    keys,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: Any = None,
    tor_weights: torch.Tensor | None = None,
):
    """Current-policy log-probs with grad -> verl's ppo_loss (vanilla, token-mean) -> backward; returns
    ``(loss, gradient norm)``. With ``tor_weights`` ((B, T), ``tor.apply=loss``) the loss is the trainer's loss
    wrapper (``verl_tor.loss.build_tor_loss_fn``: the weights folded into ``rollout_is_weights``)."""
    from functools import partial

    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    from verl_tor.loss import TOR_WEIGHTS_KEY, build_tor_loss_fn
    from verl_tor.stage import rows_to_tensordict
    from verl_tor.tools.in_process import build_actor_config

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
    config = config or build_actor_config("actor_rollout_ref.actor.loss_agg_mode=token-mean")
    loss_fn = partial(ppo_loss, config=config)
    if tor_weights is not None:
        data[TOR_WEIGHTS_KEY] = _nest(tor_weights, mask)
        loss_fn = build_tor_loss_fn(config)
    loss, _ = loss_fn(model_output={"log_probs": log_probs}, data=data)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    model.eval()
    return float(loss.detach()), float(grad_norm)


QUIET_LOGGERS = ("verl.plugin.platform.platform_manager", "torch.fx._symbolic_trace")
"""Loggers whose warnings say nothing to a demo user: verl's platform probe (no GPU: it falls back to its nvidia
platform, which the walk-through does not use) and torch.fx's note on ``is_fx_tracing``."""


@contextlib.contextmanager
def quiet_libraries(log_path: str):
    """Keep the libraries' notices out of the walk-through's output; they go to ``log_path`` instead.

    verl warns once per optional engine it cannot import (torchtitan, veomni, automodel, mindspeed, megatron), prints
    its model monkey-patch lines on stdout, and logs its platform probe; torch.fx logs a note, transformers draws
    progress bars for a 4 MB checkpoint. None of it is about ToR. Errors still reach the terminal.
    """
    import importlib
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    for name in QUIET_LOGGERS:  # each sets its own level when imported: import first, then quieten
        importlib.import_module(name)
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    bars = hf_logging.is_progress_bar_enabled()
    with open(log_path, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* engine is not available", category=UserWarning)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            if bars:
                hf_logging.enable_progress_bar()


def main(args: argparse.Namespace, cfg: ToRConfig) -> int:
    """``verl-tor demo --one-step`` into ``args.out_dir`` (the CLI gives each run a fresh folder)."""
    t0 = time.perf_counter()
    with quiet_libraries(os.path.join(args.out_dir, "libraries.log")):
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
    if not cfg.enable:
        print("tor.enable=false: ToR is off, so this is verl's stock GRPO step (no image-free pass, no token weights,")
        print(f"no token map) on {result.n_tokens} response tokens ({args.prompts} prompts x {args.n} responses)")
    else:
        print(
            f"ToR on {result.n_tokens} response tokens ({args.prompts} prompts x {args.n} responses), mode={cfg.mode},"
            f" apply={cfg.apply}"
        )
    print(f"log-prob passes: {result.scorer}")
    width = max((len(k) for k in result.metrics), default=len("loss: stock GRPO"))
    print(f"{'metric':<{width}}  value")
    for key in sorted(result.metrics):
        print(f"{key:<{width}}  {result.metrics[key]:.4f}")
    for name, (loss, grad_norm) in result.losses.items():
        print(f"{'loss: ' + name:<{width}}  {loss:.6f}  (grad norm {grad_norm:.4f})")
    if result.html_path:
        print(f"token map: {result.html_path}")
    print(f"total {total:.1f} s")
    return 0
