"""The ToR stage end to end on a tiny real Qwen2.5-VL: verl rows -> image-free pass -> weights, checked
against an independent computation on prompts rebuilt from scratch without the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verl_tor.config import ToRConfig
from verl_tor.stage import ToRStage, make_view_builder, rows_to_tensordict
from verl_tor.testing import InMemoryKV, KVMeta, LocalLogProbScorer, build_verl_row, compute_sequence_log_probs

QUESTIONS = ["Find the area of the rectangle.", "Find the hypotenuse of the right triangle."]


def chat_prompt(processor, question, image=None):
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")["input_ids"][0]


@pytest.fixture(scope="module")
def batch(tiny_processor, geometry_images):
    """2 prompts x 2 responses with an image, plus 1 text-only trajectory; old-policy pass done by the scorer."""
    g = torch.Generator().manual_seed(0)
    vocab = len(tiny_processor.tokenizer) - 20  # plain BPE ids, no special tokens
    rows, keys, plan = [], [], []
    for p, (question, image) in enumerate(
        [(QUESTIONS[0], geometry_images[0]), (QUESTIONS[1], geometry_images[1]), (QUESTIONS[0], None)]
    ):
        for s in range(2 if image is not None else 1):
            response = torch.randint(20, vocab, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g)
            row = build_verl_row(
                tiny_processor,
                chat_prompt(tiny_processor, question, image),
                response,
                [image] if image is not None else None,
            )
            row["uid"] = f"p{p}"
            rows.append(row)
            keys.append(f"p{p}_{s}_0")
            plan.append((question, image, response))
    return rows, keys, plan


def run_stage(tiny_model, tiny_processor, batch, cfg):
    rows, keys, _ = batch
    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    scorer = LocalLogProbScorer.for_model(store, tiny_model)
    scorer.compute_old_log_prob(keys)
    from tensordict import TensorDict

    old = store.kv_batch_get(keys, "train", ["old_log_probs"])["old_log_probs"]
    ones = torch.nested.nested_tensor_from_jagged(torch.ones_like(old.values()), old.offsets())
    store.kv_batch_put(keys, "train", fields=TensorDict({"advantages": ones}, batch_size=len(keys)))
    stage = ToRStage(
        config=cfg,
        score=scorer,
        make_meta=KVMeta,
        build_view=make_view_builder(cfg, tiny_processor),
        store=store,
        temperature=1.0,
    )
    metrics, timing = {}, {}
    stage.run(KVMeta(keys=keys, partition_id="train"), metrics, timing, step=3)
    return store, scorer, metrics


def test_stage_weights_match_an_independent_computation(tiny_model, tiny_processor, batch):
    from verl_tor.ops import compute_tor_weights

    cfg = ToRConfig(enable=True, apply="loss", scope="group")
    store, scorer, metrics = run_stage(tiny_model, tiny_processor, batch, cfg)
    rows, keys, plan = batch

    # independent: with-image and from-scratch image-free prompts through the HF model, no verl_tor code
    width = max(len(r["responses"]) for r in rows)
    old, noimg, entropy, mask = (torch.zeros(len(rows), width) for _ in range(4))
    for i, (row, (question, image, response)) in enumerate(zip(rows, plan)):
        n = len(response)
        lp, h = compute_sequence_log_probs(tiny_model, row, with_entropy=True)
        old[i, :n], entropy[i, :n], mask[i, :n] = lp[-n - 1 : -1], h[-n - 1 : -1], 1
        scratch = build_verl_row(tiny_processor, chat_prompt(tiny_processor, question), response, None)
        noimg[i, :n] = (
            compute_sequence_log_probs(tiny_model, scratch)[0][-n - 1 : -1] if image is not None else old[i, :n]
        )
    sensitivity = (old - noimg).abs() * mask
    index = np.array([r["uid"] for r in rows], dtype=object)
    want, want_metrics = compute_tor_weights(entropy, sensitivity, mask, cfg, index=index, step=3)

    got = torch.nested.to_padded_tensor(store.kv_batch_get(keys, "train", ["tor_weights"])["tor_weights"], 0.0)
    torch.testing.assert_close(got, want)
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert metrics["tor/no_image_frac"] == pytest.approx(1 / 5)
    assert sensitivity[-1].abs().sum() == 0  # the text-only row
    assert (sensitivity[:-1] > 1e-4).any()
    # one image-free call over all rows, no entropy, and nothing left behind
    views = [c for c in scorer.calls if c["partition_id"] == "tor_noimg"]
    assert len(views) == 1 and views[0]["n"] == len(rows) and views[0]["calculate_entropy"] is False
    # what verl's engine reads of a row, incl. loss_mask (FSDPEngine.forward_backward_batch sums it)
    assert {"input_ids", "position_ids", "multi_modal_inputs", "prompts", "responses", "loss_mask"} <= views[0][
        "fields"
    ]
    assert "tor_noimg" not in store.data


@pytest.mark.parametrize("view", ["blank", "noise"])
def test_other_views_run_and_differ_from_remove(tiny_model, tiny_processor, batch, view):
    base = ToRConfig(enable=True, apply="loss")
    _, _, m_remove = run_stage(tiny_model, tiny_processor, batch, base)
    _, _, m_view = run_stage(tiny_model, tiny_processor, batch, base.replace(image_view=view))
    assert m_view["tor/sensitivity_mean/selected"] != pytest.approx(m_remove["tor/sensitivity_mean/selected"])
    assert m_view["tor/reasoning_frac"] == pytest.approx(m_remove["tor/reasoning_frac"])  # entropy side unchanged


def test_entropy_diff_asks_the_scorer_for_entropy(tiny_model, tiny_processor, batch):
    cfg = ToRConfig(enable=True, sensitivity="entropy_diff", apply="loss")
    _, scorer, metrics = run_stage(tiny_model, tiny_processor, batch, cfg)
    views = [c for c in scorer.calls if c["partition_id"] == "tor_noimg"]
    assert views[0]["calculate_entropy"] is True
    assert metrics["tor/sensitivity_mean/selected"] > metrics["tor/sensitivity_mean/rest"]


def test_reasoning_only_skips_the_image_free_pass(tiny_model, tiny_processor, batch):
    _, scorer, metrics = run_stage(tiny_model, tiny_processor, batch, ToRConfig(enable=True, mode="reasoning_only"))
    assert [c["partition_id"] for c in scorer.calls] == ["train"]  # only the old-policy pass of the fixture
    assert metrics.get("tor/perception_frac", 0.0) == 0.0 and metrics["tor/reasoning_frac"] > 0
