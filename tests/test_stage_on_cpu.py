"""The ToR stage end to end on a tiny real Qwen2.5-VL: verl rows -> image-free pass -> weights, checked
against an independent computation on prompts rebuilt from scratch without the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from verl_tor.config import ToRConfig
from verl_tor.stage import VIEW_FIELDS, ToRStage, make_view_builder, rows_to_tensordict, tensordict_to_rows
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


def run_stage(tiny_model, tiny_processor, batch, cfg, store=None, make_meta=KVMeta):
    """verl's step up to the ToR stage on ``store`` (default: the in-memory double; or the real ``transfer_queue``)."""
    rows, keys, _ = batch
    store = InMemoryKV() if store is None else store
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    scorer = LocalLogProbScorer.for_model(store, tiny_model)
    scorer.compute_old_log_prob(keys)
    from tensordict import TensorDict

    old = store.kv_batch_get(keys, "train", ["old_log_probs"])["old_log_probs"]
    ones = torch.nested.nested_tensor_from_jagged(torch.ones_like(old.values()), old.offsets())
    # the meta verl hands to the stage is the one its last put returned (keys, partition, per-row tags)
    meta = store.kv_batch_put(keys, "train", fields=TensorDict({"advantages": ones}, batch_size=len(keys)))
    stage = ToRStage(
        config=cfg,
        score=scorer,
        make_meta=make_meta,
        build_view=make_view_builder(cfg, tiny_processor),
        store=store,
        temperature=1.0,
    )
    metrics, timing = {}, {}
    meta = stage.run(meta, metrics, timing, step=3)  # the meta verl passes on to the actor update
    return store, scorer, metrics, meta


def test_stage_weights_match_an_independent_computation(tiny_model, tiny_processor, batch):
    from verl_tor.ops import compute_tor_weights

    cfg = ToRConfig(enable=True, apply="loss", scope="group")
    store, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, batch, cfg)
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
    assert {"input_ids", "position_ids", "prompts", "responses", "loss_mask"} <= views[0]["fields"]
    # `remove` finds images by their tokens: the pixels stay in TransferQueue, off the driver and the view rows
    assert "multi_modal_inputs" not in views[0]["fields"]
    assert not [fields for _, fields in store.gets if fields and "multi_modal_inputs" in fields]
    # ...and rebuilds input_ids / attention_mask / position_ids from prompts + responses instead of reading them
    (view_read,) = [f for p, f in store.gets if p == "train" and f and "prompts" in f]
    assert set(view_read) == {"prompts", "responses", "response_mask", "loss_mask"}
    assert "tor_noimg" not in store.data


def test_rows_without_an_image_are_rebuilt_exactly_as_verl_stored_them(tiny_processor, batch):
    """`remove` reads only prompts/responses/masks; a text-only row, scored as it is, must come back identical."""
    rows, _, _ = batch
    builder = make_view_builder(ToRConfig(enable=True), tiny_processor)
    text_only = rows[-1]
    read = {key: text_only[key] for key in builder.fields}
    assert builder(read) is None
    completed = builder.complete(read)
    assert list(completed) == list(VIEW_FIELDS)
    for key in VIEW_FIELDS:
        assert torch.equal(completed[key], text_only[key]), key
    with_image = {key: rows[0][key] for key in builder.fields}
    view = builder(with_image)
    assert list(view) == list(VIEW_FIELDS) and len(view["input_ids"]) < len(rows[0]["input_ids"])


@pytest.mark.parametrize("view", ["blank", "noise"])
def test_other_views_run_and_differ_from_remove(tiny_model, tiny_processor, batch, view):
    base = ToRConfig(enable=True, apply="loss")
    _, _, m_remove, _ = run_stage(tiny_model, tiny_processor, batch, base)
    store, scorer, m_view, _ = run_stage(tiny_model, tiny_processor, batch, base.replace(image_view=view))
    assert any(p == "train" and f and "multi_modal_inputs" in f for p, f in store.gets)
    (view_call,) = [c for c in scorer.calls if c["partition_id"] == "tor_noimg"]
    assert "multi_modal_inputs" in view_call["fields"]  # the blank / noisy pixels
    assert m_view["tor/sensitivity_mean/selected"] != pytest.approx(m_remove["tor/sensitivity_mean/selected"])
    assert m_view["tor/reasoning_frac"] == pytest.approx(m_remove["tor/reasoning_frac"])  # entropy side unchanged


def test_entropy_diff_asks_the_scorer_for_entropy(tiny_model, tiny_processor, batch):
    cfg = ToRConfig(enable=True, sensitivity="entropy_diff", apply="loss")
    _, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, batch, cfg)
    views = [c for c in scorer.calls if c["partition_id"] == "tor_noimg"]
    assert views[0]["calculate_entropy"] is True
    assert metrics["tor/sensitivity_mean/selected"] > metrics["tor/sensitivity_mean/rest"]


def test_reasoning_only_skips_the_image_free_pass(tiny_model, tiny_processor, batch):
    _, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, batch, ToRConfig(enable=True, mode="reasoning_only"))
    assert [c["partition_id"] for c in scorer.calls] == ["train"]  # only the old-policy pass of the fixture
    assert metrics.get("tor/perception_frac", 0.0) == 0.0 and metrics["tor/reasoning_frac"] > 0


# ---------------------------------------------------------------------- the real TransferQueue
@pytest.fixture(scope="module")
def transfer_queue(ray_cluster):
    """verl 0.9.1's TransferQueue (SimpleStorage backend) on local Ray, as the trainer's driver sees it."""
    import transfer_queue as tq
    from omegaconf import OmegaConf

    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 2}}}))
    try:
        yield tq
    finally:
        tq.close()


def _tor_outputs(store, keys):
    got = store.kv_batch_get(keys=keys, partition_id="train", select_fields=["tor_weights", "advantages"])
    return {name: torch.nested.to_padded_tensor(got[name], 0.0) for name in got.keys()}


@pytest.mark.parametrize("apply", ["loss", "advantage"])
def test_stage_on_the_real_transfer_queue_matches_the_double(tiny_model, tiny_processor, batch, transfer_queue, apply):
    tq = transfer_queue
    _, keys, _ = batch
    cfg = ToRConfig(enable=True, apply=apply, scope="group")
    double, _, want_metrics, _ = run_stage(tiny_model, tiny_processor, batch, cfg)
    want = _tor_outputs(double, keys)
    try:
        real, scorer, metrics, meta = run_stage(tiny_model, tiny_processor, batch, cfg, tq, tq.KVBatchMeta)
        # verl's workers read only `meta.fields` (verl.utils.transferqueue_utils.kv_batch_meta2batch_meta): the meta
        # the stage hands on must name every field the actor update reads, the ToR one included
        written = {"tor_weights", "advantages"} if apply == "loss" else {"advantages"}
        needed = {"input_ids", "position_ids", "multi_modal_inputs", "responses", "response_mask", "old_log_probs"}
        assert isinstance(meta, tq.KVBatchMeta) and list(meta.keys) == keys
        assert written | needed <= set(meta.fields)
        # what verl's tqbridge hands the actor worker for that meta, through verl's own code
        from verl.utils.transferqueue_utils import _meta_to_realdata

        worker_data = _meta_to_realdata(meta)
        assert written | needed <= set(worker_data.keys())
        for name in written:
            got = torch.nested.to_padded_tensor(worker_data[name], 0.0)
            torch.testing.assert_close(got, want[name], rtol=0, atol=0)
        if apply == "loss":  # the loss wrapper's input, as the worker builds it
            from verl_tor.loss import fold_tor_weights

            folded = fold_tor_weights(worker_data)
            torch.testing.assert_close(
                torch.nested.to_padded_tensor(folded["rollout_is_weights"], 0.0),
                torch.nested.to_padded_tensor(worker_data["tor_weights"], 0.0),
            )
        got = _tor_outputs(real, keys)
        assert set(got) == set(want) == ({"tor_weights", "advantages"} if apply == "loss" else {"advantages"})
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
        assert metrics == want_metrics
        assert [c["partition_id"] for c in scorer.calls] == ["train", "tor_noimg"]
        assert not tq.kv_list("tor_noimg").get("tor_noimg")  # the image-free rows did not outlive the step
    finally:
        tq.kv_clear(keys=keys, partition_id="train")


def test_the_double_behaves_like_the_real_transfer_queue(transfer_queue):
    """The contract InMemoryKV stands in for: ragged tensors, python objects, partial puts, selects, clears."""
    rows = [
        {
            "input_ids": torch.arange(n),
            "position_ids": torch.arange(4 * n).view(4, n),
            "uid": f"p{n % 2}",
            "multi_modal_inputs": {"pixel_values": torch.full((4 * n, 6), float(n))} if n != 4 else {},
        }
        for n in (3, 5, 4)
    ]
    keys = ["a", "b", "c"]
    extra = TensorDict(
        {"old_log_probs": torch.nested.as_nested_tensor([-torch.rand(n) for n in (2, 3)], layout=torch.jagged)},
        batch_size=2,
    )
    results = []
    for store in (InMemoryKV(), transfer_queue):
        store.kv_batch_put(keys=keys, partition_id="contract", fields=rows_to_tensordict(rows))
        store.kv_batch_put(keys=["c", "a"], partition_id="contract", fields=extra)
        everything = tensordict_to_rows(store.kv_batch_get(keys=keys[::-1], partition_id="contract"))
        some = store.kv_batch_get(keys=["a", "c"], partition_id="contract", select_fields=["uid", "old_log_probs"])
        skipped = store.kv_batch_get(keys=["b"], partition_id="contract", select_fields=["input_ids", "values"])
        common = store.kv_batch_get(keys=["c", "b"], partition_id="contract", select_fields=["uid", "old_log_probs"])
        store.kv_clear(keys=keys, partition_id="contract")
        with pytest.raises(ValueError):
            store.kv_batch_get(keys=["a"], partition_id="contract")
        results.append((everything, tensordict_to_rows(some), sorted(skipped.keys()), sorted(common.keys())))
    (want_all, want_some, want_skipped, want_common), (got_all, got_some, got_skipped, got_common) = results
    # a field missing from any requested sample is left out, not an error
    assert got_skipped == want_skipped == ["input_ids"]
    assert got_common == want_common == ["uid"]
    assert "old_log_probs" not in got_all[0] and "old_log_probs" in got_some[0]
    for want_rows, got_rows in ((want_all, got_all), (want_some, got_some)):
        assert [sorted(r) for r in got_rows] == [sorted(r) for r in want_rows]
        for want, got in zip(want_rows, got_rows):
            for name, value in want.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(got[name], value, rtol=0, atol=0)
                elif isinstance(value, dict):
                    assert got[name].keys() == value.keys()
                    for k in value:
                        torch.testing.assert_close(got[name][k], value[k], rtol=0, atol=0)
                else:
                    assert got[name] == value
