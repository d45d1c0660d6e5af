"""ToR on the shipped figure reader: perception tokens land on the digits read from the figure, through the real
stage (verl_tor.tools.grounding -> verl_tor.tools.demo.run_tor -> ToRStage), and each broken sensitivity path is caught.

The check and its margins come from five batches of this test's size (12 held-out problems x 4 samples at T=1.0,
val seeds 0-4, image_view=remove, the paper's ρ = 0.3); the ranges are next to each constant:
- T_p holds figure-derived tokens (side digits read + restated) at >= LIFT_MIN x their share of all tokens;
- T_p catches >= READ_RECALL_MIN of the read side digits (chance: ρ_p = 0.3);
- S_t's zero point: the median |Δ log p| of template tokens (which the image cannot change) is <= ZERO_POINT_MAX.
A wrong temperature in the image-free pass leaves T_p's grounding intact (measured: the side digits' |Δ log p| of
2-4 nats dwarfs what a temperature does to confident tokens), so the zero point is what catches it: every
template token then moves by its own log-probability's temperature dependence.
"""

from __future__ import annotations

import pytest
import torch

LIFT_MIN = 2.0
"""Real path: 2.57-3.04. Log-probs shifted by one token: 1.17-1.58; image kept in the view: 0.91-1.02 (T_p is the
tie-breaking draw among all-zero scores); verl_tor.tiny's random model on the reference responses: 1.25-2.35."""
READ_RECALL_MIN = 0.95
"""Real path: 1.00 on every batch. Shifted: 0.55-0.87; image kept: 0.23-0.33 (chance: 0.3); random model: 0.29-0.62."""
ZERO_POINT_MAX = 0.002
"""Real path: median 0.0004-0.0005 nats (90th percentile <= 0.0018). Image-free pass at T=0.8 instead of the old
pass's 1.0: 0.0057-0.0059 (T=0.5: 0.0064, T=2.0: 0.76 on two 16 x 4 batches); random model: 0.66-0.74. (Shifted:
0.0012-0.0013, caught by the two criteria above.)"""


def check_sensitivity_path(m) -> list[str]:
    """The failed criteria of a ``ToRMeasurement`` (empty: grounded, and S_t's zero point is right)."""
    g = m.grounding()
    template = m.sensitivity[m.mask_of("template")]
    failures = []
    if not g["lift"] >= LIFT_MIN:
        failures.append(f"T_p precision {g['precision']:.3f} is {g['lift']:.2f}x chance ({g['chance']:.3f})")
    if not g["read_recall"] >= READ_RECALL_MIN:
        failures.append(f"T_p catches {g['read_recall']:.2f} of the read side digits")
    if not float(template.median()) <= ZERO_POINT_MAX:
        failures.append(f"median |Δ log p| of template tokens is {float(template.median()):.4f} nats")
    return failures


@pytest.fixture(scope="module")
def batch():
    from verl_tor.figures import load_figure_reader, make_problem, sample_responses, split_seeds

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1M-parameter model: one thread is as fast, and robust to a busy machine
    try:
        model, processor = load_figure_reader()
        problems = [make_problem(s) for s in split_seeds("val", 12, seed=0)]
        responses = sample_responses(model, processor, problems, n=4, temperature=1.0, seed=0)
        yield model, processor, problems, responses
    finally:
        torch.set_num_threads(threads)


def test_reference_tokens_get_the_generator_s_ground_truth(batch):
    from verl_tor.tools.grounding import label_tokens, reference_responses

    _, processor, problems, _ = batch
    tok = processor.tokenizer
    for problem, (ids,) in zip(problems[:4], reference_responses(tok, problems[:4])):
        kinds, parsed = label_tokens(tok, ids)
        assert parsed and kinds[-1] == "template"  # the end-of-turn token
        read = [tok.decode([t]) for t, k in zip(ids.tolist(), kinds) if k == "read"]
        assert read == [str(problem.width), str(problem.height)]
        computed = "".join(tok.decode([t]) for t, k in zip(ids.tolist(), kinds) if k == "computed")
        assert computed == str(problem.width * problem.height)


def test_trained_model_perception_tokens_are_grounded(batch):
    from verl_tor.tools.grounding import measure_tor

    model, processor, problems, responses = batch
    m = measure_tor(model, processor, problems, responses)
    assert float(m.parsed.float().mean()) >= 0.6  # most samples follow the format, so the ground truth covers them
    assert check_sensitivity_path(m) == []
    assert m.metrics["tor/perception_frac"] == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("control", ["image_kept", "shifted", "wrong_temperature"])
def test_a_broken_sensitivity_path_fails_the_check(batch, control):
    from verl_tor.tools.grounding import measure_tor

    model, processor, problems, responses = batch
    m = measure_tor(model, processor, problems, responses, control=control, wrong_temperature=0.8)
    failures = check_sensitivity_path(m)
    expected = {"image_kept": "x chance", "shifted": "read side digits", "wrong_temperature": "template"}[control]
    assert any(expected in f for f in failures), (control, failures)


def test_random_model_is_not_grounded(batch):
    """verl_tor.tiny's random model, same processor, teacher-forced on the reference responses: T_p at chance."""
    from verl_tor.tiny import build_tiny_qwen2_5_vl
    from verl_tor.tools.grounding import measure_tor, reference_responses

    _, processor, problems, _ = batch
    model = build_tiny_qwen2_5_vl(seed=0, processor=processor)
    m = measure_tor(model, processor, problems, reference_responses(processor.tokenizer, problems))
    failures = check_sensitivity_path(m)
    assert any("read side digits" in f for f in failures) and any("template" in f for f in failures), failures
