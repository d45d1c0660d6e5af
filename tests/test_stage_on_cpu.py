"""The ToR stage end to end on a tiny real Qwen2.5-VL: verl rows -> image-free pass -> weights, checked
against an independent computation on prompts rebuilt from scratch without the image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from verl_tor.config import ToRConfig
from verl_tor.stage import VIEW_FIELDS, ToRStage, make_view_builder, rows_to_tensordict, tensordict_to_rows
from verl_tor.tools.in_process import InMemoryKV, KVMeta, LocalLogProbScorer, build_verl_row, compute_sequence_log_probs

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


class RecordingScorer:
    """A scorer that records the sequence length of every row each call is sent (the old-policy pass, called through
    the wrapped scorer's own method, is not recorded)."""

    def __init__(self, scorer, store):
        self.scorer, self.store, self.lengths = scorer, store, []

    def __call__(self, meta):
        ids = self.store.kv_batch_get(meta.keys, meta.partition_id, ["input_ids"])["input_ids"]
        self.lengths.append([int(n) for n in ids.offsets().diff()])
        return self.scorer(meta)

    def __getattr__(self, name):
        return getattr(self.scorer, name)


def run_stage(
    tiny_model, tiny_processor, batch, cfg, store=None, make_meta=KVMeta, step=3, advantages=None, on_weights=None
):
    """verl's step up to the ToR stage on ``store`` (default: the in-memory double; or the real ``transfer_queue``).

    ``advantages``: one value per row (default 1), stored on each of the row's tokens as GRPO's outcome advantage.
    The old-policy pass carries the top-p flag under ``tor.entropy=top_p``, as the ToR trainer's does."""
    rows, keys, _ = batch
    store = InMemoryKV() if store is None else store
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    scorer = RecordingScorer(LocalLogProbScorer.for_model(store, tiny_model), store)
    scorer.compute_old_log_prob(keys, entropy_top_p=cfg.entropy_top_p if cfg.entropy == "top_p" else None)
    from tensordict import TensorDict

    old = store.kv_batch_get(keys, "train", ["old_log_probs"])["old_log_probs"]
    per_row = torch.ones(len(keys)) if advantages is None else torch.as_tensor(advantages, dtype=torch.float32)
    lengths = old.offsets().diff()
    values = torch.repeat_interleave(per_row, lengths)  # one advantage per response, on each of its tokens
    adv = torch.nested.nested_tensor_from_jagged(values, old.offsets())
    # the meta verl hands to the stage is the one its last put returned (keys, partition, per-row tags)
    meta = store.kv_batch_put(keys, "train", fields=TensorDict({"advantages": adv}, batch_size=len(keys)))
    stage = ToRStage(
        config=cfg,
        score=scorer,
        make_meta=make_meta,
        build_view=make_view_builder(cfg, tiny_processor),
        store=store,
        temperature=1.0,
        on_weights=on_weights,
    )
    metrics, timing = {}, {}
    meta = stage.run(meta, metrics, timing, step=step)  # the meta verl passes on to the actor update
    return store, scorer, metrics, meta


def test_stage_weights_match_an_independent_computation(tiny_model, tiny_processor, batch):
    from verl_tor.ops import compute_tor_weights
    from verl_tor.stage import compute_row_identities, rows_to_tensordict

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
    with_image = torch.tensor([image is not None for _, image, _ in plan])[:, None] & mask.bool()
    # ties are broken by keys of each row's identity (prompt + response ids), as the stage does
    row_keys = compute_row_identities(
        rows_to_tensordict([{k: r[k] for k in ("prompts", "responses")} for r in rows]), len(rows)
    )
    want, want_metrics = compute_tor_weights(
        entropy, sensitivity, mask, cfg, index=index, step=3, sensitivity_mask=with_image, row_keys=row_keys
    )

    got = torch.nested.to_padded_tensor(store.kv_batch_get(keys, "train", ["tor_weights"])["tor_weights"], 0.0)
    torch.testing.assert_close(got, want)
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert metrics["tor/no_image_frac"] == pytest.approx(1 / 5)
    assert metrics["tor/noimg_scored_frac"] == pytest.approx(4 / 5) and metrics["tor/view_fallback_frac"] == 0
    assert sensitivity[-1].abs().sum() == 0  # the text-only row
    assert (sensitivity[:-1] > 1e-4).any()
    assert (got[-1] != cfg.perception_weight).all()  # its own group (scope=group) has no perception token
    # one image-free call over all rows (the text-only one as a 2-token placeholder), no entropy, nothing left behind
    views = [c for c in scorer.calls if c["partition_id"] == "tor_noimg"]
    assert len(views) == 1 and views[0]["n"] == len(rows) and views[0]["calculate_entropy"] is False
    (sent,) = scorer.lengths  # sequence length of every row sent to the image-free pass
    assert sent[-1] == 2 and all(n < len(r["input_ids"]) for n, r in zip(sent[:-1], rows))
    # what verl's engine reads of a row, incl. loss_mask (FSDPEngine.forward_backward_batch sums it)
    assert {"input_ids", "position_ids", "prompts", "responses", "loss_mask"} <= views[0]["fields"]
    # `remove` finds images by their tokens: the pixels stay in TransferQueue, off the driver and the view rows
    assert "multi_modal_inputs" not in views[0]["fields"]
    assert not [fields for _, fields in store.gets if fields and "multi_modal_inputs" in fields]
    # ...and rebuilds input_ids / attention_mask / position_ids from prompts + responses instead of reading them
    # (the other read of prompts: the rows' identities for tie-breaking, verl_tor.stage.IDENTITY_FIELDS)
    (view_read,) = [f for p, f in store.gets if p == "train" and f and "prompts" in f and "response_mask" in f]
    assert set(view_read) == {"prompts", "responses", "response_mask", "loss_mask"}
    assert "tor_noimg" not in store.data


def test_rows_not_scored_become_a_two_token_placeholder(tiny_processor, batch):
    """`remove` reads only prompts/responses/masks; a text-only row is not scored: a placeholder with the view's
    fields stands in for it (verl's row count per worker stays as verl balanced it)."""
    rows, _, _ = batch
    builder = make_view_builder(ToRConfig(enable=True), tiny_processor)
    text_only = rows[-1]
    read = {key: text_only[key] for key in builder.fields}
    assert not builder.has_image(read) and builder(read) is None
    placeholder = builder.placeholder(read)
    assert list(placeholder) == list(VIEW_FIELDS)
    eos = tiny_processor.tokenizer.eos_token_id
    assert placeholder["input_ids"].tolist() == [eos, eos] and placeholder["response_mask"].tolist() == [0]
    assert placeholder["loss_mask"].tolist() == [0] and placeholder["position_ids"].shape == (4, 2)
    with_image = {key: rows[0][key] for key in builder.fields}
    assert builder.has_image(with_image)
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


def store_as_verl_agent_loop(processor, prompt_ids, response, images, uid, session_id, index):
    """One trajectory put into TransferQueue by verl 0.9.1's own ``AgentLoopWorkerTQ._agent_loop_postprocess`` (its
    ``tq`` swapped for a recorder): the exact fields, types and layout a real run's rows have. The worker is a
    stand-in holding the processor, with verl's own methods bound (no reward workers: the score is given)."""
    import asyncio
    import types

    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput, AgentLoopWorker
    from verl.trainer.ppo.v1 import agent_loop_tq

    worker = types.SimpleNamespace(
        processor=processor,
        tokenizer=processor.tokenizer,
        mm_processor_kwargs=None,
        distillation_enabled=False,
        reward_loop_worker_handles=None,
    )
    for name in (
        "_compute_score",
        "_compute_teacher_logprobs",
        "_compute_multi_modal_inputs",
        "_compute_position_ids",
        "_get_mm_processor_kwargs",
    ):
        setattr(worker, name, types.MethodType(getattr(AgentLoopWorker, name), worker))
    output = AgentLoopOutput(
        prompt_ids=prompt_ids.tolist(),
        response_ids=response.tolist(),
        response_mask=[1] * len(response),
        multi_modal_data={"images": images} if images else {},
        reward_score=1.0,
        metrics=AgentLoopMetrics(),
    )
    puts = []

    class RecordingTQ:
        async def async_kv_batch_put(self, keys, fields, tags, partition_id):
            puts.append((keys, fields))

    postprocess = agent_loop_tq.AgentLoopWorkerTQ.__ray_metadata__.modified_class._agent_loop_postprocess
    real_tq, agent_loop_tq.tq = agent_loop_tq.tq, RecordingTQ()
    try:
        asyncio.run(postprocess(worker, output, False, uid=uid, session_id=session_id, global_steps=1, index=index))
    finally:
        agent_loop_tq.tq = real_tq
    ((keys, fields),) = puts
    (row,) = tensordict_to_rows(fields)
    return keys[0], row


@pytest.fixture(scope="module")
def verl_batch(tiny_processor, geometry_images, batch):
    """``batch``'s trajectories as verl's agent loop stores them (``store_as_verl_agent_loop``)."""
    rows, keys, plan = [], [], []
    for p, (question, image, response) in enumerate(batch[2]):
        uid = f"p{QUESTIONS.index(question)}{'' if image is not None else 't'}"
        session = sum(1 for k in keys if k.startswith(uid + "_"))
        images = [image] if image is not None else None
        prompt = chat_prompt(tiny_processor, question, image)
        key, row = store_as_verl_agent_loop(tiny_processor, prompt, response, images, uid, session, index=p)
        rows.append(row), keys.append(key), plan.append((question, image, response))
    return rows, keys, plan


def test_build_verl_row_holds_only_fields_of_verls_own_row(verl_batch, batch):
    """The double the in-memory tests run on (``build_verl_row``) must not carry a field verl's rows lack: the stage
    once read ``attention_mask``, which only the double had, and crashed in the real loop (issue 17.1)."""
    (real, *_), _, _ = verl_batch
    double = batch[0][0]
    assert "attention_mask" not in real
    assert set(double) - {"uid"} <= set(real), set(double) - set(real)
    for name, value in double.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, real[name]), name
    for name in double["multi_modal_inputs"]:
        assert torch.equal(double["multi_modal_inputs"][name], real["multi_modal_inputs"][name]), name


@pytest.mark.parametrize("view", ["remove", "blank", "noise"])
def test_every_view_runs_on_rows_as_verls_agent_loop_stores_them(tiny_model, tiny_processor, verl_batch, view):
    """Each image view on rows with exactly the fields verl's agent loop puts in TransferQueue (before the fix,
    ``blank``/``noise`` raised ``KeyError: 'attention_mask'`` here and in ``main_ppo``)."""
    cfg = ToRConfig(enable=True, apply="loss", image_view=view)
    store, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, verl_batch, cfg)
    assert metrics["tor/noimg_scored_frac"] == pytest.approx(4 / 5) and metrics["tor/view_fallback_frac"] == 0
    assert metrics["tor/sensitivity_mean/selected"] > metrics["tor/sensitivity_mean/rest"] > 0
    (view_call,) = [c for c in scorer.calls if c["partition_id"] == "tor_noimg"]
    assert ("multi_modal_inputs" in view_call["fields"]) is (view != "remove")
    assert {"input_ids", "position_ids", "prompts", "responses", "response_mask", "loss_mask"} <= view_call["fields"]


def test_entropy_diff_asks_the_scorer_for_entropy(tiny_model, tiny_processor, batch):
    cfg = ToRConfig(enable=True, sensitivity="entropy_diff", apply="loss")
    _, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, batch, cfg)
    views = [c for c in scorer.calls if c["partition_id"] == "tor_noimg"]
    assert views[0]["calculate_entropy"] is True
    assert metrics["tor/sensitivity_mean/selected"] > metrics["tor/sensitivity_mean/rest"]


@pytest.mark.parametrize("entropy", ["top_p", "full"])
def test_entropy_diff_compares_two_entropies_of_the_same_kind(tiny_model, tiny_processor, batch, entropy):
    """``tor.sensitivity=entropy_diff``: S_t = |H_img − H_noimg| with both entropies top-p under ``tor.entropy=top_p``
    (the old pass's is; the image-free pass must ask for it too) and both full otherwise (issue 21.4). Checked
    against entropies of the with-image row and of the prompt rebuilt without the image, computed independently."""
    from verl_tor.stage import TOP_P_FLAG

    rows, _, plan = batch
    cfg = ToRConfig(enable=True, sensitivity="entropy_diff", apply="loss", entropy=entropy, entropy_top_p=0.8)
    captured = {}
    _, scorer, _, _ = run_stage(
        tiny_model, tiny_processor, batch, cfg, on_weights=lambda **kw: captured.update(kw["tensors"])
    )
    (view_call,) = [c for c in scorer.calls if c["partition_id"] == "tor_noimg"]
    assert view_call.get(TOP_P_FLAG) == (0.8 if entropy == "top_p" else None)
    top_p = 0.8 if entropy == "top_p" else None
    want = torch.zeros_like(captured["sensitivity"])
    for i, (row, (question, image, response)) in enumerate(zip(rows, plan)):
        if image is None:
            continue  # not scored: S_t = 0
        n = len(response)
        h_img = compute_sequence_log_probs(tiny_model, row, with_entropy=True, entropy_top_p=top_p)[1][-n - 1 : -1]
        scratch = build_verl_row(tiny_processor, chat_prompt(tiny_processor, question), response, None)
        h_free = compute_sequence_log_probs(tiny_model, scratch, with_entropy=True, entropy_top_p=top_p)[1][-n - 1 : -1]
        want[i, :n] = (h_img - h_free).abs()
    torch.testing.assert_close(captured["sensitivity"], want, rtol=1e-4, atol=1e-5)


def test_reasoning_only_skips_the_image_free_pass(tiny_model, tiny_processor, batch):
    _, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, batch, ToRConfig(enable=True, mode="reasoning_only"))
    assert [c["partition_id"] for c in scorer.calls] == ["train"]  # only the old-policy pass of the fixture
    assert metrics.get("tor/perception_frac", 0.0) == 0.0 and metrics["tor/reasoning_frac"] > 0


def padded_field(store, keys, name):
    return torch.nested.to_padded_tensor(store.kv_batch_get(keys, "train", [name])[name], 0.0)


def test_text_only_prompts_get_no_perception_tokens_in_their_own_scope(tiny_model, tiny_processor, batch):
    """A text-only prompt has no S_t: with scope=sequence its response selects no T_p (before: ceil(ρ_p·n) random
    tokens among its tied zeros, weighted γ_p), while the rows with an image keep ceil(ρ_p·n) each."""
    rows, keys, _ = batch
    cfg = ToRConfig(enable=True, apply="loss", scope="sequence", mode="perception_only")
    store, _, metrics, _ = run_stage(tiny_model, tiny_processor, batch, cfg)
    weights = padded_field(store, keys, "tor_weights")
    assert (weights[-1] == 0).all()
    for row, w in zip(rows[:-1], weights[:-1]):
        assert int((w > 0).sum()) == math.ceil(0.3 * len(row["responses"]))
    assert metrics["tor/no_image_frac"] == pytest.approx(1 / 5)


def test_perception_weight_zero_skips_the_image_free_pass(tiny_model, tiny_processor, batch):
    rows, keys, _ = batch
    cfg = ToRConfig(enable=True, apply="loss", perception_weight=0.0)
    store, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, batch, cfg)
    assert [c["partition_id"] for c in scorer.calls] == ["train"] and scorer.lengths == []
    assert metrics["tor/noimg_scored_frac"] == 0.0  # the metrics say the pass was skipped
    assert "tor/perception_frac" not in metrics
    reasoning_only, _, _, _ = run_stage(tiny_model, tiny_processor, batch, cfg.replace(mode="reasoning_only"))
    torch.testing.assert_close(
        padded_field(store, keys, "tor_weights"), padded_field(reasoning_only, keys, "tor_weights")
    )


def test_a_rollout_whose_view_cannot_be_built_falls_back_and_is_counted(tiny_model, tiny_processor, batch, caplog):
    """A response holding a vision token has no image-free view: its row gets S_t = 0 and no T_p, the step goes on,
    warns once and counts it; only when every row with an image is affected does the step fail."""
    import logging

    from verl_tor.tools.in_process import build_verl_row
    from verl_tor.views import ViewError

    rows, keys, plan = batch
    # a stray <|vision_end|> (an <|image_pad|> would already break verl's own position ids upstream)
    pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")

    def spoiled(i):
        question, image, response = plan[i]
        bad = torch.cat([response[:2], torch.tensor([pad]), response[2:]])
        row = build_verl_row(tiny_processor, chat_prompt(tiny_processor, question, image), bad, [image])
        row["uid"] = rows[i]["uid"]
        return row

    bad_rows = [spoiled(0)] + rows[1:]
    cfg = ToRConfig(enable=True, apply="loss", mode="perception_only")
    with caplog.at_level(logging.WARNING, logger="verl_tor"):
        store, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, (bad_rows, keys, plan), cfg)
    warnings = [r for r in caplog.records if "no image-free view" in r.getMessage()]
    assert len(warnings) == 1 and keys[0] in warnings[0].getMessage() and "vision tokens" in warnings[0].getMessage()
    assert metrics["tor/view_fallback_frac"] == pytest.approx(1 / 5)
    assert metrics["tor/noimg_scored_frac"] == pytest.approx(3 / 5)
    weights = padded_field(store, keys, "tor_weights")
    assert (weights[0] == 0).all() and (weights[1:4] > 0).any(dim=1).all()
    assert scorer.lengths[-1][0] == 2  # sent as a placeholder
    every_image_row_bad = [spoiled(i) for i in range(4)] + rows[4:]
    with pytest.raises(ViewError, match=f"no response of this batch has an image-free view; row '{keys[0]}'"):
        run_stage(tiny_model, tiny_processor, (every_image_row_bad, keys, plan), cfg)


def test_noise_is_seeded_from_the_step_so_a_resumed_run_draws_the_same(tiny_processor, batch):
    rows, _, _ = batch
    cfg = ToRConfig(enable=True, image_view="noise")
    read = lambda b, i: {k: rows[i][k] for k in b.fields}  # noqa: E731
    running = make_view_builder(cfg, tiny_processor)
    for step in (1, 2, 3):
        seen = [running(read(running, i), step=step, identity=i)["multi_modal_inputs"]["pixel_values"] for i in (0, 1)]
    resumed = make_view_builder(cfg, tiny_processor)  # a new process resuming at step 3
    again = [resumed(read(resumed, i), step=3, identity=i)["multi_modal_inputs"]["pixel_values"] for i in (0, 1)]
    for a, b in zip(seen, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other_step = resumed(read(resumed, 0), step=4, identity=0)["multi_modal_inputs"]["pixel_values"]
    assert not torch.equal(other_step, seen[0])
    assert not torch.equal(
        seen[0] - rows[0]["multi_modal_inputs"]["pixel_values"], seen[1] - rows[1]["multi_modal_inputs"]["pixel_values"]
    )


def test_noise_follows_the_row_not_its_place_in_the_batch(tiny_model, tiny_processor, batch):
    """Rows reach TransferQueue in the order their generations finish: the same trajectory must get the same noise
    (hence the same image-free log-probs) in any batch order (issue 21.5; seeding by position fails this)."""
    rows, keys, _ = batch
    cfg = ToRConfig(enable=True, image_view="noise", apply="loss")
    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    scorer = LocalLogProbScorer.for_model(store, tiny_model)
    stage = ToRStage(cfg, scorer, KVMeta, make_view_builder(cfg, tiny_processor), store)
    width = max(len(r["responses"]) for r in rows)
    by_key = {}
    for order in ([0, 1, 2, 3, 4], [3, 0, 4, 2, 1], [1, 3, 2, 0, 4]):
        meta = KVMeta(keys=[keys[i] for i in order], partition_id="train")
        free = stage.score_image_free(meta, width, step=5)
        assert free.scored.tolist() == [i < 4 for i in order]  # the 4 rows with an image
        for row, i in enumerate(order):
            by_key.setdefault(keys[i], []).append(free.log_prob[row])
    for key, seen in by_key.items():
        for other in seen[1:]:
            torch.testing.assert_close(other, seen[0], rtol=0, atol=0, msg=key)
    # the noise reaches the log-probs: another step's draw gives other values
    other_step = stage.score_image_free(KVMeta(keys=list(keys), partition_id="train"), width, step=6)
    assert not torch.equal(other_step.log_prob[0], by_key[keys[0]][0])


@pytest.mark.parametrize("apply", ["advantage", "loss"])
def test_rank_tokens_informative_ranks_and_scores_only_rows_that_can_learn(tiny_model, tiny_processor, batch, apply):
    """Prompt p0's two responses have advantage 0 (a GRPO group with equal rewards): under rank_tokens=informative
    they are not scored (2-token placeholders), get weight 0, and T_r / T_p are ceil(ρ·N) of the N informative
    tokens; the paper's `all` ranks every token."""
    rows, keys, _ = batch
    advantages = [0.0, 0.0, 1.0, -1.0, 0.5]
    cfg = ToRConfig(enable=True, apply=apply, rank_tokens="informative")
    store, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, batch, cfg, advantages=advantages)
    lengths = [len(r["responses"]) for r in rows]
    n_informative, n_valid = sum(lengths[2:]), sum(lengths)
    assert metrics["tor/informative_frac"] == pytest.approx(n_informative / n_valid)
    assert metrics["tor/reasoning_frac"] == pytest.approx(math.ceil(0.3 * n_informative) / n_informative)
    n_image_informative = sum(lengths[2:4])  # the text-only row is informative but has no S_t
    assert metrics["tor/perception_frac"] == pytest.approx(math.ceil(0.3 * n_image_informative) / n_informative)
    assert metrics["tor/noimg_scored_frac"] == pytest.approx(2 / 5)
    assert scorer.lengths[-1][:2] == [2, 2] and min(scorer.lengths[-1][2:4]) > 2
    stored = padded_field(store, keys, "advantages" if apply == "advantage" else "tor_weights")
    assert (stored[:2] == 0).all() and (stored[2:] != 0).any(dim=1).all()
    # the paper's default ranks all tokens, informative or not
    _, scorer_all, metrics_all, _ = run_stage(tiny_model, tiny_processor, batch, cfg.replace(rank_tokens="all"))
    assert metrics_all["tor/reasoning_frac"] == pytest.approx(math.ceil(0.3 * n_valid) / n_valid)
    assert "tor/informative_frac" not in metrics_all and min(scorer_all.lengths[-1][:4]) > 2


def test_a_batch_without_informative_rows_skips_the_image_free_call(tiny_model, tiny_processor, batch):
    cfg = ToRConfig(enable=True, rank_tokens="informative")
    store, scorer, metrics, _ = run_stage(tiny_model, tiny_processor, batch, cfg, advantages=[0.0] * 5)
    assert scorer.lengths == [] and metrics["tor/noimg_scored_frac"] == 0.0
    assert (padded_field(store, batch[1], "advantages") == 0).all()


# ---------------------------------------------------------------------- verl's own per-row lengths
TRAINER_BASE = [
    "algorithm.adv_estimator=grpo",
    "actor_rollout_ref.rollout.n=4",
    "data.train_batch_size=2",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
    "trainer.n_gpus_per_node=1",
]


def make_trainer(*overrides):
    """verl's V1 trainer of the recipes' config (``tor_sync`` unless overridden), as main_ppo builds it."""
    from pathlib import Path

    import verl  # noqa: F401  - loads the plugin
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.v1 import get_trainer_cls

    config_dir = str(Path(__file__).resolve().parents[1] / "verl_tor" / "recipes" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("tor_trainer", overrides=[*TRAINER_BASE, *overrides])
    return get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)


@pytest.fixture
def verl_store(monkeypatch):
    """An in-memory TransferQueue, seen by verl's trainer and by its batch-padding code."""
    import verl.trainer.ppo.padding_utils as padding_utils
    import verl.trainer.ppo.v1.trainer_base as trainer_base

    store = InMemoryKV()
    monkeypatch.setattr(trainer_base, "tq", store)
    monkeypatch.setattr(padding_utils, "tq", store)
    return store


MULTI_TURN_MASK = [1] * 8 + [0] * 4 + [1] * 9  # 21 response tokens, 4 of them a masked tool observation


def build_padded_multi_turn_batch(tiny_model, tiny_processor, geometry_images, store):
    """2 prompts x 4 rollouts with images, rollout 1 a multi-turn one (a masked tool observation inside its
    response), rm_scores on the last token; then verl's own `upsample_batch_to_divisible_size` pads the batch to a
    multiple of 12 with its text-only padding rows (1 masked response token); then the old-policy pass."""
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size

    g = torch.Generator().manual_seed(1)
    vocab = len(tiny_processor.tokenizer) - 20
    rows, keys, tags = [], [], []
    for p in range(2):
        prompt = chat_prompt(tiny_processor, QUESTIONS[p], geometry_images[p])
        for s in range(4):
            n = 21 if (p, s) == (0, 1) else int(torch.randint(6, 12, (1,), generator=g))
            response = torch.randint(20, vocab, (n,), generator=g)
            row = build_verl_row(tiny_processor, prompt, response, [geometry_images[p]])
            if (p, s) == (0, 1):
                row["response_mask"] = row["loss_mask"] = torch.tensor(MULTI_TURN_MASK)
            row["uid"] = f"p{p}"
            score = torch.zeros(n)
            score[int(row["response_mask"].nonzero().max())] = float(s % 2 == 0) * 0.9 + 0.1
            row["rm_scores"] = score
            rows.append(row)
            keys.append(f"p{p}_{s}_0")
            tags.append({"seq_len": len(row["input_ids"])})
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows), tags=tags)
    meta = upsample_batch_to_divisible_size(KVMeta(keys=keys, tags=tags, partition_id="train"), 12, 0)
    meta = KVMeta(keys=list(meta.keys), tags=list(meta.tags), partition_id="train")
    LocalLogProbScorer.for_model(store, tiny_model).compute_old_log_prob(meta.keys)
    return meta


@pytest.mark.parametrize("apply", ["advantage", "loss"])
def test_stored_fields_keep_verls_row_lengths_through_padding_multi_turn_and_ppo_loss(
    tiny_model, tiny_processor, geometry_images, verl_store, apply
):
    """Every per-token field the stage writes keeps verl's stored per-row length (not the valid-token count), so
    verl's `ppo_loss` consumes them for any micro-batch: a padding row alone, the multi-turn row alone, all rows."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    from verl_tor.loss import tor_ppo_loss
    from verl_tor.tools.in_process import build_actor_config

    store = verl_store
    meta = build_padded_multi_turn_batch(tiny_model, tiny_processor, geometry_images, store)
    keys = list(meta.keys)
    padding = [i for i, tag in enumerate(meta.tags) if tag.get("is_padding")]
    assert len(keys) == 12 and len(padding) == 4

    stock = make_trainer("trainer.v1.trainer_mode=sync")
    stock._compute_advantage(meta, {})
    grpo = padded_field(store, keys, "advantages")  # verl's own GRPO advantage, before ToR rewrites it

    trainer = make_trainer("tor.enable=true", f"tor.apply={apply}")
    trainer.tor_stage = ToRStage(
        config=trainer.tor_config,
        score=LocalLogProbScorer.for_model(store, tiny_model),
        make_meta=KVMeta,
        build_view=make_view_builder(trainer.tor_config, tiny_processor),
        store=store,
    )
    trainer.timing_raw, trainer.global_steps = {}, 1
    metrics: dict = {}
    trainer._compute_advantage(meta, metrics)

    written = ["advantages"] + (["tor_weights"] if apply == "loss" else [])
    got = store.kv_batch_get(keys, "train", ["response_mask", "old_log_probs", *written])
    want_lengths = got["response_mask"].offsets().diff()
    assert want_lengths[1] == 21 and (want_lengths[padding] == 1).all()
    for name in ("old_log_probs", *written):
        assert torch.equal(got[name].offsets().diff(), want_lengths), name
    mask = padded_field(store, keys, "response_mask").bool()
    if apply == "advantage":
        weights = torch.where(grpo != 0, padded_field(store, keys, "advantages") / grpo, 0.0)
    else:
        weights = padded_field(store, keys, "tor_weights")
        torch.testing.assert_close(padded_field(store, keys, "advantages"), grpo)  # verl's, untouched
    assert (weights[~mask] == 0).all()  # padding tokens and the masked tool observation
    assert (weights[1, 12:][mask[1, 12:]] > 0).any()  # the tokens after the tool observation are still weighted
    assert metrics["tor/no_image_frac"] == 0.0  # over real responses: verl's padding rows are not counted
    assert metrics["tor/noimg_scored_frac"] == 1.0

    # verl's ppo_loss on the stored fields, as the actor worker receives them (the engine sets batch_num_tokens to
    # the mini-batch's valid tokens); current = old policy (ratio 1), so the vanilla clipped surrogate of a token is
    # -A_t·w_t, and token-mean sums it over the micro-batch's valid tokens / batch_num_tokens
    config = build_actor_config("actor_rollout_ref.actor.loss_agg_mode=token-mean")
    loss_fn = ppo_loss if apply == "advantage" else tor_ppo_loss
    seq_log_probs = store.kv_batch_get(keys, "train", ["log_probs"])["log_probs"]
    for micro in ([padding[0]], [1], list(range(len(keys)))):
        sub = [keys[i] for i in micro]
        data = store.kv_batch_get(sub, "train", ["prompts", "responses", "response_mask", "old_log_probs", *written])
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=None)
        log_probs = torch.nested.as_nested_tensor([seq_log_probs[i] for i in micro], layout=torch.jagged)
        loss, _ = loss_fn(config, {"log_probs": log_probs}, data)
        m = mask[micro]
        want = -(grpo[micro] * weights[micro])[m].sum() / int(mask.sum())
        torch.testing.assert_close(loss.float(), want.float(), rtol=1e-5, atol=1e-6)


def test_enable_false_with_rank_tokens_informative_is_stock_sync(
    tiny_model, tiny_processor, geometry_images, verl_store
):
    store = verl_store
    meta = build_padded_multi_turn_batch(tiny_model, tiny_processor, geometry_images, store)
    results = []
    for overrides in (["trainer.v1.trainer_mode=sync"], ["tor.enable=false", "tor.rank_tokens=informative"]):
        trainer, metrics = make_trainer(*overrides), {}
        trainer._compute_advantage(meta, metrics)
        results.append((type(trainer).__name__, padded_field(store, meta.keys, "advantages"), metrics))
    assert [r[0] for r in results] == ["PPOTrainerSync", "ToRTrainerSync"]
    assert torch.equal(results[0][1], results[1][1]) and results[0][2] == results[1][2]


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
