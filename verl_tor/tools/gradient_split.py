"""Where GRPO's policy gradient lives at the start of training, split by ToR's token sets (issue 20, item 4).

At the first step the old policy is the current one (ratio = 1, inside the clip), so verl's vanilla PPO loss with
``loss_agg_mode=token-mean`` has the gradient ``g = -(1/N) Σ_t A_t ∇log π(o_t)`` (N: the batch's valid response
tokens). It is linear in the per-token advantages, so the three disjoint sets ToR builds, T_r (reasoning),
T_p \\ T_r (perception only) and the rest, split it exactly: ``g = g_{T_r} + g_{T_p \\ T_r} + g_rest``, where g_S is
the same loss with the advantages outside S set to 0. ToR-GRPO's gradient is ``g_ToR = γ_r g_{T_r} + γ_p
g_{T_p \\ T_r}``: it keeps the first two with weights 1.0 / 0.5 and drops the rest.

``measure_gradient_split`` runs it on one GRPO batch the way the grid's step 1 does: responses sampled at T = 1,
verl's Geometry3K reward, verl's GRPO advantage (``compute_grpo_outcome_advantage``), ToR's sets from the real stage
(``verl_tor.tools.demo.run_tor``: verl rows, the old-policy pass with the top-p entropy, the image-free pass, the
selection ops) and each g_S from verl's own ``ppo_loss`` (one forward with grad, one ``autograd.grad`` per set).
``recipes/cpu_tiny/gradient_split.py`` runs it over seeds and writes the table.

For each set it reports ``||g_S|| / ||g||`` (how large the part is) and ``<g_S, g> / ||g||²`` (how much of g's length
it carries along g; the three sum to 1, and a part may be large yet nearly orthogonal to g, or point against it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from verl_tor.config import PAPER, ToRConfig

__all__ = [
    "SETS",
    "GradientSplit",
    "compute_grpo_advantages",
    "compute_set_gradients",
    "measure_gradient_split",
    "sample_grpo_batch",
    "split_masks",
    "summarize_seeds",
]

SETS = ("reasoning", "perception_only", "rest")
"""The disjoint token sets, in the paper's order: T_r, T_p \\ T_r, and the tokens in neither (weight 0 under ToR)."""

SET_LABELS = {"reasoning": "T_r", "perception_only": "T_p \\ T_r", "rest": "rest"}


@dataclass
class GradientSplit:
    """One batch's gradient split. Shares are ``nan`` when ``||g|| = 0`` (every group's rewards equal)."""

    token_share: dict[str, float]
    """|S| / N per set (N: valid response tokens). A set of random tokens of this share would have, in
    expectation, this projection share too: the baseline for ``projection_share``."""
    informative_share: dict[str, float]
    """|S ∩ {A ≠ 0}| / |{A ≠ 0}| per set: the set's share of the tokens that can move the gradient (the stage ranks
    every valid token, ``tor.rank_tokens=all``, so part of each set sits in equal-reward groups)."""
    norm_share: dict[str, float]
    """||g_S|| / ||g|| per set."""
    projection_share: dict[str, float]
    """<g_S, g> / ||g||² per set; the three sum to 1."""
    tor_norm_ratio: float
    """||g_ToR|| / ||g||, g_ToR the gradient of the loss on ToR's weighted advantages w_t·A_t."""
    tor_cos: float
    """cos(g_ToR, g)."""
    zero_advantage_share: float
    """Share of valid tokens whose advantage is exactly 0 (verl's GRPO on a group whose rewards are all equal)."""
    equal_reward_share: float
    """Share of valid tokens in groups whose rewards are all equal (A = 0 up to verl's float32 rounding)."""
    reward_mean: float
    grad_norm: float
    """||g||, the full GRPO gradient's norm (all parameters)."""
    n_tokens: int
    residual: float
    """||g - Σ_S g_S|| / ||g||: float rounding only (the split is exact in exact arithmetic)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready scalars (``extra`` entries whose name starts with ``_`` are tensors, left out)."""
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return {**out, **{k: v for k, v in self.extra.items() if not k.startswith("_")}}


def sample_grpo_batch(
    model: Any,
    processor: Any,
    problems: Sequence[Any],
    n: int = 4,
    seed: int = 0,
    max_new_tokens: int = 48,
    reward: Callable[[str, Any], float] | None = None,
) -> tuple[list[list[torch.Tensor]], list[float]]:
    """``n`` responses per problem at T = 1 (``verl_tor.figures.evaluate.sample_responses``) and their rewards.

    ``reward(text, problem)`` defaults to verl's Geometry3K scorer (``score_response(...)["score"]``: 0.9·accuracy +
    0.1·format), on the text decoded without special tokens as verl's reward manager decodes it.
    Returns ``(responses [problem][sample], rewards)``, the rewards flat in problem-major order.
    """
    from verl_tor.figures.evaluate import sample_responses, score_response

    reward = reward or (lambda text, problem: score_response(text, problem.answer)["score"])
    responses = sample_responses(
        model, processor, problems, n=n, temperature=1.0, seed=seed, max_new_tokens=max_new_tokens
    )
    tokenizer = processor.tokenizer
    rewards = [
        float(reward(tokenizer.decode(ids, skip_special_tokens=True), problem))
        for problem, group in zip(problems, responses)
        for ids in group
    ]
    return responses, rewards


def compute_grpo_advantages(rewards: Sequence[float], lengths: Sequence[int], uids: Sequence[str]) -> torch.Tensor:
    """verl's GRPO outcome advantage (``core_algos.compute_grpo_outcome_advantage``: (r - group mean) / (group std +
    1e-6)), broadcast over each response's tokens. Returns (B, T) float32, 0 on padding."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    lengths_t = torch.tensor(list(lengths))
    mask = (torch.arange(int(lengths_t.max()))[None] < lengths_t[:, None]).float()  # (B, T)
    scores = torch.zeros_like(mask)
    scores[torch.arange(len(lengths_t)), lengths_t - 1] = torch.tensor(list(rewards), dtype=torch.float32)
    advantages, _ = compute_grpo_outcome_advantage(scores, mask, np.array(list(uids), dtype=object))
    return advantages


def split_masks(reasoning: torch.Tensor, perception: torch.Tensor, response_mask: torch.Tensor) -> dict:
    """The disjoint sets ``SETS`` as (B, T) bool masks covering ``response_mask``."""
    valid = response_mask.bool()
    r = reasoning.bool() & valid
    p = perception.bool() & valid & ~r
    return {"reasoning": r, "perception_only": p, "rest": valid & ~r & ~p}


def _nest(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.nested.as_nested_tensor([padded[i, : int(n)] for i, n in enumerate(lengths)], layout=torch.jagged)


def _current_log_probs(model: Any, rows: Sequence[dict]) -> torch.Tensor:
    """log π(input_ids[s+1] | ...) of every position of every row, with grad, as a jagged nested tensor (what verl's
    engine hands ``ppo_loss`` as ``model_output["log_probs"]``)."""
    out = []
    device = next(model.parameters()).device
    for row in rows:
        input_ids = row["input_ids"].long().to(device)
        pos = row["position_ids"].to(device)
        pos = pos.unsqueeze(1) if pos.dim() == 2 else pos.unsqueeze(0)  # (4, 1, L): verl's non-packed path
        mm = {k: v.to(device) for k, v in row["multi_modal_inputs"].items() if isinstance(v, torch.Tensor)}
        logits = model(input_ids=input_ids[None], position_ids=pos, **mm).logits[0].float()  # (L, V)
        labels = torch.roll(input_ids, -1)  # verl: input_ids_rmpad_rolled
        out.append(torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1).cpu())
    return torch.nested.as_nested_tensor(out, layout=torch.jagged)


def compute_set_gradients(
    model: Any,
    rows: Sequence[dict],
    advantages: dict[str, torch.Tensor],
    actor_config: Any = None,
) -> dict[str, torch.Tensor]:
    """The parameter gradient of verl's ``ppo_loss`` (vanilla, token-mean) for each advantage tensor, at ratio = 1.

    One forward with grad over ``rows``; ``old_log_probs`` are the same log-probs detached (the first step: the old
    policy is the current one). Each name in ``advantages`` ((B, T), 0 on padding) gets one ``autograd.grad``.

    Returns:
        name -> flat float64 gradient over every parameter (zeros for a parameter the loss does not reach).
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    from verl_tor.stage import rows_to_tensordict
    from verl_tor.tools.in_process import build_actor_config

    config = actor_config or build_actor_config(
        "actor_rollout_ref.actor.loss_agg_mode=token-mean", "actor_rollout_ref.actor.use_kl_loss=false"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    lengths = torch.tensor([len(r["responses"]) for r in rows])
    was_training = model.training
    model.eval()  # the figure reader has no dropout; eval keeps the pass deterministic all the same
    try:
        log_probs = _current_log_probs(model, rows)
        base = rows_to_tensordict([{"prompts": r["prompts"], "responses": r["responses"]} for r in rows])
        old = no_padding_2_padding(log_probs.detach(), base)  # (B, T): ratio = 1 exactly
        mask = (torch.arange(old.shape[1])[None] < lengths[:, None]).to(torch.int64)
        grads = {}
        for name, adv in advantages.items():
            data = base.clone()
            data["old_log_probs"] = _nest(old, lengths)
            data["response_mask"] = _nest(mask, lengths)
            data["advantages"] = _nest(adv.float(), lengths)
            tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
            loss, _ = ppo_loss(config, model_output={"log_probs": log_probs}, data=data)
            parts = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads[name] = torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(parts, params)]
            )
    finally:
        model.train(was_training)
    return grads


def measure_gradient_split(
    model: Any,
    processor: Any,
    problems: Sequence[Any],
    responses: list[list[torch.Tensor]],
    rewards: Sequence[float],
    config: ToRConfig | None = None,
) -> GradientSplit:
    """The gradient split of one GRPO batch (module docstring).

    Args:
        problems: ``Problem``s; ``responses[i]`` are the responses to ``problems[i]`` (one GRPO group each).
        rewards: one per response, problem-major.
        config: the ``tor`` block (default: the paper's, ``PAPER``: top-p entropy 0.95, ρ = 0.3/0.3, γ = 1.0/0.5,
            batch scope, image removed).
    """
    from verl_tor.tools.demo import build_batch, run_tor

    cfg = config or ToRConfig(enable=True, **PAPER)
    if cfg.apply != "advantage" or cfg.mode != "tor":
        raise ValueError(f"tor.apply={cfg.apply!r}, tor.mode={cfg.mode!r}: the split needs apply=advantage, mode=tor")
    items = [{"image": p.image, "question": p.question} for p in problems]
    rows, keys = build_batch(processor, items, responses)
    if len(rewards) != len(rows):
        raise ValueError(f"{len(rewards)} rewards for {len(rows)} responses; give one per response")
    lengths = torch.tensor([len(r["responses"]) for r in rows])
    advantages = compute_grpo_advantages(rewards, lengths.tolist(), [r["uid"] for r in rows])  # (B, T)
    store, metrics, tensors, _, _ = run_tor(
        model, processor, rows, keys, cfg, progress=False, advantages=_nest(advantages, lengths)
    )
    valid = tensors["response_mask"].bool()
    expected = torch.arange(advantages.shape[1])[None] < lengths[:, None]
    if valid.shape != expected.shape or not torch.equal(valid, expected):
        raise RuntimeError(f"the stage's response mask {tuple(valid.shape)} does not match the rows' lengths")
    # what the ToR trainer hands the loss (tor.apply=advantage): the stored advantages, now w_t·A_t
    stored = store.kv_batch_get(keys, "train", ["advantages"])["advantages"].unbind()
    weighted = torch.zeros_like(advantages)
    for i, row in enumerate(stored):
        weighted[i, : len(row)] = row.float()
    masks = split_masks(tensors["reasoning"], tensors["perception"], valid)
    wanted = {"all": advantages, **{s: advantages * masks[s] for s in SETS}, "tor": weighted}
    grads = compute_set_gradients(model, rows, wanted)

    g = grads["all"]
    norm2 = float(g @ g)
    norm = norm2**0.5
    nan = float("nan")
    n_tokens = int(valid.sum())
    informative = valid & advantages.ne(0)
    n_informative = int(informative.sum())
    rewards_t = torch.tensor(list(rewards))
    groups = [rewards_t[i : i + len(responses[0])] for i in range(0, len(rows), len(responses[0]))]
    equal_rows = torch.cat([torch.full((len(grp),), bool((grp == grp[0]).all())) for grp in groups])
    g_tor = grads["tor"]
    tor_norm = float(g_tor.norm())
    return GradientSplit(
        token_share={s: float(masks[s].sum()) / n_tokens for s in SETS},
        informative_share={
            s: float((masks[s] & informative).sum()) / n_informative if n_informative else nan for s in SETS
        },
        norm_share={s: float(grads[s].norm()) / norm if norm else nan for s in SETS},
        projection_share={s: float(grads[s] @ g) / norm2 if norm else nan for s in SETS},
        tor_norm_ratio=tor_norm / norm if norm else nan,
        tor_cos=float(g_tor @ g) / (tor_norm * norm) if norm and tor_norm else nan,
        zero_advantage_share=float((advantages.eq(0) & valid).sum()) / n_tokens,
        equal_reward_share=float((equal_rows[:, None] & valid).sum()) / n_tokens,
        reward_mean=float(rewards_t.mean()),
        grad_norm=norm,
        n_tokens=n_tokens,
        residual=float((g - sum(grads[s] for s in SETS)).norm()) / norm if norm else 0.0,
        extra={
            "tor_metrics": {k: float(v) for k, v in metrics.items()},
            "_grads": grads,
            "_masks": masks,
            "_response_mask": valid,
            "_weights": tensors["weights"],
            "_advantages": advantages,
        },
    )


def summarize_seeds(results: dict[Any, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over seeds of every scalar (nested dicts flattened as ``a/b``); ``nan`` entries left out."""
    flat: dict[str, list[float]] = {}
    for result in results.values():
        for key, value in _flatten(result).items():
            flat.setdefault(key, []).append(value)
    out = {}
    for key, values in flat.items():
        kept = [v for v in values if v == v]
        out[key] = (
            {"mean": float(np.mean(kept)), "min": float(min(kept)), "max": float(max(kept)), "n": len(kept)}
            if kept
            else {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
        )
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in d.items():
        if key.startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """The markdown table of a ``summarize_seeds`` summary: mean (min-max) over seeds."""

    def cell(key: str) -> str:
        s = summary.get(key)
        if not s or s["n"] == 0:
            return "n/a"
        return f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})"

    lines = [
        "| tokens | token share | of A ≠ 0 tokens | \\|\\|g_S\\|\\| / \\|\\|g\\|\\| | <g_S, g> / \\|\\|g\\|\\|² |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in SETS:
        row = (
            cell(f"token_share/{s}"),
            cell(f"informative_share/{s}"),
            cell(f"norm_share/{s}"),
            cell(f"projection_share/{s}"),
        )
        lines.append(f"| {SET_LABELS[s]} | " + " | ".join(row) + " |")
    lines.append(f"| ToR (w = 1.0 / 0.5 / 0) | | | {cell('tor_norm_ratio')} | cos(g_ToR, g) = {cell('tor_cos')} |")
    lines.append("")
    lines.append(
        f"zero-advantage tokens: {cell('zero_advantage_share')}; tokens in equal-reward groups: "
        f"{cell('equal_reward_share')}; mean reward: {cell('reward_mean')}; ||g||: {cell('grad_norm')}"
    )
    return "\n".join(lines)
