"""GRPO's step-1 gradient split by ToR's token sets (``verl_tor.tools.gradient_split``,
``recipes/cpu_tiny/gradient_split.py``), on the shipped figure reader (area task: it solves ~2/3 of the problems at
T = 1, so its groups have mixed rewards and g is not 0).

Checked: the sets are disjoint and cover the valid tokens; g_{T_r} + g_{T_p \\ T_r} + g_rest = g and the projection
shares sum to 1; g (through verl's ppo_loss at ratio = 1) equals the formula -(1/N) Σ_t A_t ∇log π(o_t) written here;
the stage's weighted advantages give g_ToR = 1.0·g_{T_r} + 0.5·g_{T_p \\ T_r}; a seed gives the same numbers twice;
the script writes its JSON and table.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, RESPONSES, SEED = 4, 4, 1


def _batch(model, processor, seed: int):
    from verl_tor.figures import make_problem, split_seeds
    from verl_tor.tools.gradient_split import sample_grpo_batch

    problems = [make_problem(s, "area") for s in split_seeds("train", PROMPTS, seed=seed)]
    responses, rewards = sample_grpo_batch(model, processor, problems, n=RESPONSES, seed=seed)
    return problems, responses, rewards


@pytest.fixture(scope="module")
def reader():
    from verl_tor.figures import load_figure_reader

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1M-parameter model: one thread is as fast, and robust to a busy machine
    try:
        yield load_figure_reader()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split(reader):
    from verl_tor.tools.gradient_split import measure_gradient_split

    model, processor = reader
    problems, responses, rewards = _batch(model, processor, SEED)
    return problems, responses, rewards, measure_gradient_split(model, processor, problems, responses, rewards)


def test_sets_are_disjoint_and_cover_the_valid_tokens(split):
    from verl_tor.tools.gradient_split import SETS

    *_, s = split
    masks = s.extra["_masks"]
    valid = s.extra["_response_mask"]
    counts = sum(masks[k].int() for k in SETS)
    assert int(counts.max()) == 1  # no token in two sets
    assert torch.equal(counts.bool(), valid) and int(counts.sum()) == s.n_tokens  # every valid token in one
    assert sum(s.token_share.values()) == pytest.approx(1.0)
    informative = valid & s.extra["_advantages"].ne(0)
    for k in SETS:
        assert s.informative_share[k] == pytest.approx(float((masks[k] & informative).sum() / informative.sum()))
    assert sum(s.informative_share.values()) == pytest.approx(1.0)
    assert s.token_share["reasoning"] == pytest.approx(0.3, abs=1 / s.n_tokens + 1e-9)  # ceil(ρ_r·N) tokens


def test_the_three_parts_sum_to_the_grpo_gradient(split):
    from verl_tor.tools.gradient_split import SETS

    _, _, rewards, s = split
    assert len(set(rewards)) > 1 and s.grad_norm > 0  # mixed rewards: a non-trivial gradient to split
    grads = s.extra["_grads"]
    total = sum(grads[k] for k in SETS)
    torch.testing.assert_close(total, grads["all"], rtol=1e-5, atol=1e-6 * s.grad_norm)
    assert s.residual < 1e-5
    assert sum(s.projection_share.values()) == pytest.approx(1.0, abs=1e-5)
    for k in SETS:  # ||g_S||² ≥ <g_S, g>²/||g||² (Cauchy-Schwarz): each norm share bounds its projection share
        assert s.norm_share[k] >= abs(s.projection_share[k]) - 1e-9


def test_grpo_gradient_is_the_token_mean_formula(reader, split):
    from verl_tor.tools.demo import build_batch

    model, processor = reader
    problems, responses, _, s = split
    rows, _ = build_batch(processor, [{"image": p.image, "question": p.question} for p in problems], responses)
    advantages = s.extra["_advantages"]
    params = [p for p in model.parameters() if p.requires_grad]
    surrogate = torch.zeros(())
    for i, row in enumerate(rows):  # -(1/N) Σ_t A_t log π(o_t | o_<t, image, question)
        pos = row["position_ids"].unsqueeze(1)
        mm = {k: v for k, v in row["multi_modal_inputs"].items() if isinstance(v, torch.Tensor)}
        logits = model(input_ids=row["input_ids"][None], position_ids=pos, **mm).logits[0].float()
        lr = len(row["responses"])
        start = len(row["prompts"]) - 1  # the logits at position s predict token s + 1
        lp = torch.log_softmax(logits[start : start + lr], -1).gather(-1, row["responses"][:, None]).squeeze(-1)
        surrogate = surrogate - (advantages[i, :lr] * lp).sum()
    grads = torch.autograd.grad(surrogate / s.n_tokens, params, allow_unused=True)
    g = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).double() for x, p in zip(grads, params)])
    torch.testing.assert_close(g, s.extra["_grads"]["all"], rtol=1e-4, atol=1e-6 * s.grad_norm)


def test_tor_gradient_is_the_weighted_sum_of_its_sets(split):
    *_, s = split
    grads = s.extra["_grads"]
    weights = s.extra["_weights"]
    masks = s.extra["_masks"]
    assert bool((weights[masks["reasoning"]] == 1.0).all()) and bool((weights[masks["perception_only"]] == 0.5).all())
    assert bool((weights[masks["rest"]] == 0).all())
    expected = 1.0 * grads["reasoning"] + 0.5 * grads["perception_only"]
    torch.testing.assert_close(grads["tor"], expected, rtol=1e-5, atol=1e-6 * s.grad_norm)
    assert s.tor_norm_ratio == pytest.approx(float(expected.norm()) / s.grad_norm, rel=1e-5)
    assert -1.0 <= s.tor_cos <= 1.0


def test_a_seed_gives_the_same_split_twice(reader, split):
    from verl_tor.tools.gradient_split import measure_gradient_split

    model, processor = reader
    problems, responses, rewards, first = split
    problems2, responses2, rewards2 = _batch(model, processor, SEED)
    assert rewards2 == rewards
    assert all(torch.equal(a, b) for ga, gb in zip(responses, responses2) for a, b in zip(ga, gb))
    again = measure_gradient_split(model, processor, problems2, responses2, rewards2)
    assert again.as_dict() == first.as_dict()


def test_script_writes_json_and_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gradient_split_script", ROOT / "recipes/cpu_tiny/gradient_split.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["gradient_split_script"] = script
    spec.loader.exec_module(script)
    from verl_tor.figures import FIGURE_READER_CHECKPOINT

    out = tmp_path / "split.json"
    argv = ["--checkpoint", FIGURE_READER_CHECKPOINT, "--task", "area", "--prompts", "2", "--seeds", "1", "2"]
    assert script.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["seeds"]) == ["1", "2"]
    for seed in result["seeds"].values():
        shares = seed["projection_share"].values()
        assert None in shares or math.isclose(sum(shares), 1.0, abs_tol=1e-5)  # None: every reward equal
    summary = result["summary"]["projection_share/reasoning"]
    assert summary["min"] <= summary["mean"] <= summary["max"]
    table = capsys.readouterr().out
    assert "| T_r |" in table and "| T_p \\ T_r |" in table and "cos(g_ToR, g)" in table
    with pytest.raises(SystemExit):
        script.main([*argv, "--responses", "1"])
    assert "--responses=1" in capsys.readouterr().err
