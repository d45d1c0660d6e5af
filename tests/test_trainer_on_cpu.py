"""The tor_sync and tor_colocate_async trainers through verl's real PPOTrainer code, with TransferQueue replaced by an
in-memory double.

- With ``tor.enable=false`` each is bit-identical to the verl mode it extends (advantages and metrics of verl's own
  ``_compute_advantage``).
- Each presents the verl mode it extends to verl's mode-keyed logic: replay buffer, prompt persistence for refill,
  TransferQueue checkpoint, in-flight re-issue (``tor_sync`` takes the sync branches, ``tor_colocate_async`` the async
  ones, exactly as verl's own ``sync`` / ``colocate_async``).
- With ToR on, ``_compute_advantage`` runs verl's GRPO advantage and then the stage, whose weights land in the
  stored advantages (``apply=advantage``) or in ``tor_weights`` (``apply=loss``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from verl_tor.config import ToRConfig
from verl_tor.tools.in_process import InMemoryKV, KVMeta

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "algorithm.adv_estimator=grpo",
    "actor_rollout_ref.rollout.n=4",
    "data.train_batch_size=2",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
    "trainer.n_gpus_per_node=1",
]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "verl_tor" / "recipes" / "config"), version_base=None):
        return hydra_compose("tor_trainer", overrides=[*BASE, *overrides])


def make_trainer(*overrides: str):
    import verl  # noqa: F401  - loads the plugin
    from verl.trainer.ppo.v1 import get_trainer_cls

    cfg = compose(*overrides)
    return get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)


def fill_store(store: InMemoryKV, seed: int = 0, n_prompts: int = 2, n: int = 4) -> KVMeta:
    """A GRPO batch as verl's old-log-prob pass leaves it: uid, response_mask, rm_scores, old_log_probs, entropy."""
    g = torch.Generator().manual_seed(seed)
    keys, rows = [], []
    for p in range(n_prompts):
        for s in range(n):
            length = int(torch.randint(3, 9, (1,), generator=g))
            scores = torch.zeros(length)
            scores[-1] = float(torch.randint(0, 2, (1,), generator=g))  # outcome reward on the last token
            keys.append(f"p{p}_{s}_0")
            rows.append(
                {
                    "uid": f"p{p}",
                    "response_mask": torch.ones(length, dtype=torch.int64),
                    "rm_scores": scores,
                    "old_log_probs": -torch.rand(length, generator=g) * 3,
                    "entropy": torch.rand(length, generator=g) * 2,
                }
            )
    from verl_tor.stage import rows_to_tensordict

    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    return KVMeta(keys=keys, partition_id="train")


@pytest.fixture
def kv(monkeypatch):
    import verl.trainer.ppo.v1.trainer_base as trainer_base

    store = InMemoryKV()
    monkeypatch.setattr(trainer_base, "tq", store)
    return store


def padded(store: InMemoryKV, meta: KVMeta, name: str) -> torch.Tensor:
    return torch.nested.to_padded_tensor(store.kv_batch_get(meta.keys, "train", [name])[name], 0.0)


MODES = {"tor_sync": "sync", "tor_colocate_async": "colocate_async"}


def test_tor_sync_presents_itself_as_sync():
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    trainer = make_trainer("tor.enable=false")
    assert trainer.trainer_mode == "sync"
    assert trainer._configured_trainer_mode == "tor_sync"
    assert type(trainer.replay_buffer) is ReplayBuffer  # not ReplayBufferAsync


def test_tor_colocate_async_presents_itself_as_colocate_async():
    from verl.trainer.ppo.v1 import PPOTrainerColocateAsync
    from verl.trainer.ppo.v1.replay_buffer import ReplayBufferAsync

    trainer = make_trainer("trainer.v1.trainer_mode=tor_colocate_async", "tor.enable=true")
    assert isinstance(trainer, PPOTrainerColocateAsync) and type(trainer).__name__ == "ToRTrainerColocateAsync"
    assert trainer.trainer_mode == "colocate_async"
    assert trainer._configured_trainer_mode == "tor_colocate_async"
    assert type(trainer.replay_buffer) is ReplayBufferAsync
    # verl reads its settings from trainer.v1.<trainer_mode>: the colocate_async block, not a missing tor_* one
    assert trainer.replay_buffer.trainer_mode == "colocate_async"
    assert trainer.replay_buffer.trainer_config == trainer.config.trainer.v1.colocate_async
    assert trainer.parameter_sync_step == 1


class RecordingKV(InMemoryKV):
    """The double plus the TransferQueue calls verl's async branches make (checkpoint, listing)."""

    def __init__(self):
        super().__init__()
        self.saved: list[str] = []
        self.listed: list[str] = []

    def save_checkpoint(self, path, metadata=None):
        self.saved.append(path)

    def kv_list(self, partition_id):
        self.listed.append(partition_id)
        return {}


@pytest.mark.parametrize("tor_mode", list(MODES))
def test_verls_mode_keyed_logic_takes_the_branch_of_the_extended_mode(kv, monkeypatch, tmp_path, tor_mode):
    """Prompt persistence (refill), TransferQueue checkpoint and in-flight re-issue: a ToR trainer takes exactly the
    branches verl's own trainer of the extended mode takes."""
    import types

    import verl.trainer.ppo.v1.trainer_base as trainer_base
    from tensordict import NonTensorStack, TensorDict

    outcomes = {}
    for mode in (tor_mode, MODES[tor_mode]):
        store = RecordingKV()
        monkeypatch.setattr(trainer_base, "tq", store)
        trainer = make_trainer(f"trainer.v1.trainer_mode={mode}", f"trainer.default_local_dir={tmp_path / mode}")
        trainer.global_steps = 3
        trainer.agent_loop_manager = types.SimpleNamespace(generate_sequences=lambda batch: None)
        trainer.actor_rollout_wg = types.SimpleNamespace(save_checkpoint=lambda *a, **k: None)
        trainer.train_dataloader = types.SimpleNamespace(state_dict=lambda: {})
        prompts = TensorDict({"uid": NonTensorStack("u0", "u1"), "input_ids": torch.ones(2, 3)}, batch_size=2)
        trainer._submit_batch_to_rollout(prompts)
        trainer._save_checkpoint()
        outcomes[mode] = {
            "prompt_fields_persisted": sorted(store.data["train"]["u0"].keys()),
            "tq_checkpoints": len(store.saved),
            "reissued": trainer._reissue_inflight_prompts(),
            "listed": list(store.listed),
        }
    assert outcomes[tor_mode] == outcomes[MODES[tor_mode]], outcomes
    if tor_mode == "tor_colocate_async":  # the async branches, not the sync ones
        assert outcomes[tor_mode]["tq_checkpoints"] == 1 and outcomes[tor_mode]["listed"] == ["train"]
        assert "input_ids" in outcomes[tor_mode]["prompt_fields_persisted"]
    else:
        assert outcomes[tor_mode]["tq_checkpoints"] == 0 and outcomes[tor_mode]["listed"] == []
        assert outcomes[tor_mode]["prompt_fields_persisted"] == []


@pytest.mark.parametrize("tor_mode", list(MODES))
def test_tor_disabled_is_bit_identical_to_the_extended_verl_mode(kv, tor_mode):
    results = []
    for overrides in ([f"trainer.v1.trainer_mode={MODES[tor_mode]}"], [f"trainer.v1.trainer_mode={tor_mode}"]):
        store = InMemoryKV()
        import verl.trainer.ppo.v1.trainer_base as trainer_base

        trainer_base.tq = store
        trainer = make_trainer(*overrides, "tor.enable=false")
        meta = fill_store(store, seed=3)
        metrics: dict = {}
        trainer._compute_advantage(meta, metrics)
        results.append((type(trainer).__name__, padded(store, meta, "advantages"), metrics))
    (name_a, adv_a, m_a), (name_b, adv_b, m_b) = results
    verl_name = {"tor_sync": "PPOTrainerSync", "tor_colocate_async": "PPOTrainerColocateAsync"}[tor_mode]
    assert (name_a, name_b) == (verl_name, verl_name.replace("PPOTrainer", "ToRTrainer"))
    assert torch.equal(adv_a, adv_b) and m_a == m_b
    assert adv_a.abs().sum() > 0  # a real GRPO advantage, not an all-zero batch


class FixedScorer:
    """A worker-group double that writes known image-free log-probs (full-sequence layout) into the store."""

    def __init__(self, store: InMemoryKV, noimg_response_log_probs: dict[str, torch.Tensor]):
        self.store, self.values, self.metas = store, noimg_response_log_probs, []

    def __call__(self, meta):
        self.metas.append(meta)
        rows = []
        for key in meta.keys:
            resp = self.values[key.split("@")[0]]
            prompt_len = int(self.store.data[meta.partition_id][key]["prompts"].numel())
            # verl's convention: position s holds log p(token s+1); the response starts after the prompt
            full = torch.cat([torch.zeros(prompt_len - 1), resp, torch.zeros(1)])
            rows.append({"log_probs": full})
        from verl_tor.stage import rows_to_tensordict

        return self.store.kv_batch_put(meta.keys, meta.partition_id, fields=rows_to_tensordict(rows))


def add_sequences(store: InMemoryKV, meta: KVMeta) -> None:
    """Prompt/response token fields the image-free pass reads (content irrelevant for the FixedScorer)."""
    from verl_tor.stage import rows_to_tensordict

    rows = []
    for key in meta.keys:
        n = int(store.data["train"][key]["response_mask"].numel())
        prompt = torch.arange(5)
        response = torch.arange(n) + 10
        ids = torch.cat([prompt, response])
        rows.append(
            {
                "prompts": prompt,
                "responses": response,
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "position_ids": torch.arange(len(ids)).repeat(4, 1),
                "multi_modal_inputs": {},
            }
        )
    store.kv_batch_put(meta.keys, "train", fields=rows_to_tensordict(rows))


@pytest.mark.parametrize("tor_mode", list(MODES))
@pytest.mark.parametrize("apply", ["advantage", "loss"])
def test_tor_enabled_stage_runs_after_verl_advantage(kv, apply, tor_mode):
    from verl_tor.ops import compute_tor_weights
    from verl_tor.stage import MULTI_MODAL_FIELD, VIEW_FIELDS, ToRStage

    class EveryRowHasAnImage:  # the view content is the scorer's business here
        fields = (*VIEW_FIELDS, MULTI_MODAL_FIELD)

        def has_image(self, row):
            return True

        def __call__(self, row, step=0, position=0):
            return dict(row)

        def placeholder(self, row):
            raise AssertionError("every row has an image")

    stock = make_trainer(f"trainer.v1.trainer_mode={MODES[tor_mode]}")
    meta = fill_store(kv, seed=5)
    stock._compute_advantage(meta, {})
    stock_adv = padded(kv, meta, "advantages")

    trainer = make_trainer(f"trainer.v1.trainer_mode={tor_mode}", "tor.enable=true", f"tor.apply={apply}")
    assert trainer.trainer_mode == MODES[tor_mode]
    kv.data.clear()
    meta = fill_store(kv, seed=5)
    add_sequences(kv, meta)
    g = torch.Generator().manual_seed(11)
    noimg = {k: -torch.rand(int(kv.data["train"][k]["response_mask"].numel()), generator=g) * 3 for k in meta.keys}
    scorer = FixedScorer(kv, noimg)
    trainer.tor_stage = ToRStage(
        config=trainer.tor_config,
        score=scorer,
        make_meta=KVMeta,
        build_view=EveryRowHasAnImage(),
        store=kv,
        temperature=1.0,
    )
    trainer.timing_raw = {}
    trainer.global_steps = 7
    metrics: dict = {}
    trainer._compute_advantage(meta, metrics)

    # the independent computation: the same inputs straight into the op
    mask = padded(kv, meta, "response_mask")
    old = padded(kv, meta, "old_log_probs")
    entropy = padded(kv, meta, "entropy")
    width = mask.shape[1]
    noimg_padded = torch.stack([torch.nn.functional.pad(noimg[k], (0, width - len(noimg[k]))) for k in meta.keys])
    sensitivity = (old - noimg_padded).abs() * mask
    index = np.array([k.split("_")[0] for k in meta.keys], dtype=object)
    from verl_tor.stage import IDENTITY_FIELDS, compute_row_identities

    row_keys = compute_row_identities(kv.kv_batch_get(meta.keys, meta.partition_id, list(IDENTITY_FIELDS)), len(meta))
    want_w, want_metrics = compute_tor_weights(
        entropy, sensitivity, mask, ToRConfig(enable=True), index=index, step=7, row_keys=row_keys
    )
    if apply == "advantage":
        torch.testing.assert_close(padded(kv, meta, "advantages"), stock_adv * want_w)
    else:
        torch.testing.assert_close(padded(kv, meta, "advantages"), stock_adv)
        torch.testing.assert_close(padded(kv, meta, "tor_weights"), want_w)
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["tor/no_image_frac"] == 0.0
    assert {"tor_noimg", "tor_select"} <= set(trainer.timing_raw)
    # the scorer saw only the image-free partition, and the partition is gone afterwards
    assert [m.partition_id for m in scorer.metas] == ["tor_noimg"]
    assert scorer.metas[0].extra_info["calculate_entropy"] is False
    assert "tor_noimg" not in kv.data
    assert ((want_w > 0).sum() > 0) and ((want_w == 0) & (mask > 0)).any()


def test_build_stage_wires_the_actor_scorer_and_transfer_queue():
    import transfer_queue

    from verl_tor.integration.trainer import build_stage

    class WG:
        def compute_log_prob(self, meta):
            raise AssertionError("not called here")

    trainer = make_trainer("tor.enable=true", "tor.mode=reasoning_only")
    trainer.actor_rollout_wg = WG()
    trainer.processor = None  # reasoning_only needs no image-free pass, hence no processor
    stage = build_stage(trainer)
    assert stage.store is transfer_queue
    assert stage.score.__func__ is WG.compute_log_prob
    trainer = make_trainer("tor.enable=true")
    trainer.actor_rollout_wg, trainer.processor = WG(), None
    from verl_tor.config import ToRConfigError

    with pytest.raises(ToRConfigError, match="no multimodal processor"):
        build_stage(trainer)


def test_build_stage_scores_with_the_reference_policy_when_asked(tiny_processor):
    from verl_tor.integration.trainer import build_stage

    class WG:
        def compute_log_prob(self, meta):
            raise AssertionError("not called here")

        def compute_ref_log_prob(self, meta):
            raise AssertionError("not called here")

    trainer = make_trainer("tor.enable=true", "tor.scorer_policy=ref", "actor_rollout_ref.actor.use_kl_loss=true")
    trainer.actor_rollout_wg, trainer.ref_policy_wg, trainer.processor = WG(), WG(), tiny_processor
    trainer.ref_in_actor = False
    stage = build_stage(trainer)
    assert stage.score.__func__ is WG.compute_ref_log_prob and stage.extra_meta == {}
    trainer.ref_in_actor = True  # LoRA: the reference is the actor without its adapter
    stage = build_stage(trainer)
    assert stage.score.__func__ is WG.compute_log_prob and stage.extra_meta == {"no_lora_adapter": True}


def test_image_free_pass_runs_at_the_rollout_temperature(kv, tiny_model, tiny_processor, geometry_images):
    """``build_stage`` takes ``actor_rollout_ref.rollout.temperature`` (here 0.7) and the stage asks the scorer for the
    image-free log-probs at it, as verl's old-policy pass does: log π_T(o_t | ∅, q, o_<t) from a plain forward of the
    image-free sequence with logits / T, not 1.0's (which differ by far more than the tolerance)."""
    import dataclasses

    from verl_tor.integration.trainer import build_stage
    from verl_tor.stage import rows_to_tensordict
    from verl_tor.tools.demo import encode_prompt
    from verl_tor.tools.in_process import LocalLogProbScorer, build_verl_row
    from verl_tor.views import VisionTokenIds

    temperature = 0.7
    trainer = make_trainer("tor.enable=true", f"actor_rollout_ref.rollout.temperature={temperature}")
    scorer = LocalLogProbScorer.for_model(kv, tiny_model)
    trainer.actor_rollout_wg, trainer.processor = scorer, tiny_processor
    stage = build_stage(trainer)
    assert stage.temperature == temperature
    stage = dataclasses.replace(stage, store=kv, make_meta=KVMeta)  # the in-memory TransferQueue

    prompt = encode_prompt(tiny_processor, {"question": "Find its area.", "image": geometry_images[0]})["input_ids"][0]
    response = torch.tensor([40, 41, 42, 43, 44])
    row = build_verl_row(tiny_processor, prompt, response, [geometry_images[0]])
    kv.kv_batch_put(["r0"], "train", fields=rows_to_tensordict([row]))
    free = stage.score_image_free(KVMeta(keys=["r0"], partition_id="train"), width=len(response))
    assert bool(free.scored[0]) and [c["temperature"] for c in scorer.calls] == [temperature]

    # the reference: the prompt without its vision tokens + the response, the model's own forward, logits / T
    token_ids = VisionTokenIds.from_processor(tiny_processor)
    vision = {token_ids.vision_start, token_ids.vision_end, token_ids.image_pad, token_ids.video_pad}
    text_prompt = torch.tensor([t for t in prompt.tolist() if t not in vision])
    ids = torch.cat([text_prompt, response]).unsqueeze(0)
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits[0, len(text_prompt) - 1 : -1].float()  # predicts the response
    for t in (temperature, 1.0):
        want = torch.log_softmax(logits / t, dim=-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
        if t == temperature:
            torch.testing.assert_close(free.log_prob[0], want, rtol=1e-4, atol=1e-4)
        else:
            assert (free.log_prob[0] - want).abs().max() > 1e-2


@pytest.mark.parametrize("apply", ["advantage", "loss"])
def test_init_installs_the_loss_wrapper_on_the_actor_for_apply_loss(monkeypatch, tiny_processor, apply):
    """``ToRTrainerSync.init`` after verl's own ``init`` (workers built; stubbed here): builds the stage and, for
    ``tor.apply=loss`` only, hands the actor workers verl's ``ppo_loss`` wrapped by ``tor_ppo_loss`` with the run's
    actor config (``set_loss_fn``). The loop check that the weights reach the loss is in
    ``test_main_ppo_wiring_on_cpu.py``."""
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from verl_tor.loss import tor_ppo_loss

    class WG:
        def __init__(self):
            self.loss_fns = []

        def set_loss_fn(self, fn):
            self.loss_fns.append(fn)

        def compute_log_prob(self, meta):
            raise AssertionError("not called here")

    monkeypatch.setattr(PPOTrainerSync, "init", lambda self: None)
    trainer = make_trainer("tor.enable=true", f"tor.apply={apply}", "actor_rollout_ref.actor.clip_ratio_high=0.28")
    trainer.actor_rollout_wg, trainer.processor = WG(), tiny_processor
    trainer.init()
    assert trainer.tor_stage is not None
    if apply == "advantage":
        assert trainer.actor_rollout_wg.loss_fns == []
        return
    (fn,) = trainer.actor_rollout_wg.loss_fns
    assert fn.func is tor_ppo_loss
    assert fn.keywords["config"].clip_ratio_high == 0.28  # the run's ActorConfig, as verl's own partial(ppo_loss)
