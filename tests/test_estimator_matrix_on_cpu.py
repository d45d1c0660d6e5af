"""Every advantage estimator × policy loss verl registers: accepted or refused by ToR, and where accepted, the ToR
weights reach the gradient.

- The matrix in recipes/README.md is what ToR's validation says today (``verl_tor.integration.support``), over verl's
  own registries: a verl bump that adds an estimator or a loss fails here until the table is regenerated and read.
- The estimators ToR refuses because verl's V1 trainer cannot run them really crash in verl's own
  ``_compute_advantage`` at step 1, ToR off, even with the fields they want present in TransferQueue.
- For every accepted (estimator, loss, apply): verl's real ``_compute_advantage`` (stock and ToR trainer, in-memory
  TransferQueue), then verl's real ``ppo_loss`` (through the ToR wrapper for ``apply=loss``): the gradient of every
  response token's log-prob is w_t times the stock gradient, i.e. zero on weight-0 tokens and γ-scaled on the others.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from test_trainer_on_cpu import FixedScorer, add_sequences, make_trainer, padded
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

from verl_tor.integration.trainer import CRITIC_ESTIMATORS, REFUSED_ESTIMATORS
from verl_tor.loss import TOR_WEIGHTS_KEY, tor_ppo_loss
from verl_tor.stage import MULTI_MODAL_FIELD, VIEW_FIELDS, ToRStage, rows_to_tensordict
from verl_tor.tools.in_process import InMemoryKV, KVMeta

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "recipes" / "README.md"


@pytest.fixture(scope="module")
def matrix():
    from verl_tor.integration.support import support_matrix

    return support_matrix()


def test_recipes_readme_carries_the_current_matrix(matrix):
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    from verl_tor.integration.support import render_into, render_support_matrix

    assert {e for e, _ in matrix} == set(ADV_ESTIMATOR_REGISTRY) and {m for _, m in matrix} == set(POLICY_LOSS_REGISTRY)
    text = README.read_text(encoding="utf-8")
    table = render_support_matrix(matrix)
    assert render_into(text, table) == text, (
        "stale: run `python -m verl_tor.integration.support --write recipes/README.md`"
    )
    assert REFUSED_ESTIMATORS.keys() <= ADV_ESTIMATOR_REGISTRY.keys()
    for estimator in REFUSED_ESTIMATORS:  # refused under every loss and apply, opt-in or not
        assert all(
            matrix[(estimator, m)][a][g]
            for m in POLICY_LOSS_REGISTRY
            for a in ("advantage", "loss")
            for g in (False, True)
        )
    for estimator in CRITIC_ESTIMATORS:  # refused by default, with the opt-in named; accepted once opted in
        cell = matrix[(estimator, "vanilla")]
        assert "tor.allow_gae=true" in cell["advantage"][False] and cell["advantage"][True] is None
    assert matrix[("grpo", "vanilla")] == {"advantage": {False: None, True: None}, "loss": {False: None, True: None}}


def fill_store(store: InMemoryKV, n_prompts: int = 3, n: int = 4, seed: int = 0) -> KVMeta:
    """A batch as verl's old-log-prob pass leaves it, with one success per group (every estimator, pass@k included,
    then has non-zero advantages) and the optional fields some estimators ask for (values, reward_baselines,
    sum_pi_squared, a per-component reward)."""
    g = torch.Generator().manual_seed(seed)
    keys, rows = [], []
    for p in range(n_prompts):
        for s in range(n):
            length = 3 + (p + 2 * s) % 5
            scores = torch.zeros(length)
            scores[-1] = float(s == p % n)
            keys.append(f"p{p}_{s}_0")
            rows.append(
                {
                    "uid": f"p{p}",
                    "response_mask": torch.ones(length, dtype=torch.int64),
                    "rm_scores": scores,
                    "old_log_probs": -torch.rand(length, generator=g) * 2 - 0.2,
                    "entropy": torch.rand(length, generator=g) * 2,
                    "values": torch.randn(length, generator=g) * 0.1,
                    "reward_baselines": torch.full((length,), 0.25),
                    "sum_pi_squared": torch.rand(length, generator=g),
                    "acc": float(s == p % n),
                }
            )
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    return KVMeta(keys=keys, partition_id="train")


SUM_PI_SQUARED = ["actor_rollout_ref.actor.calculate_sum_pi_squared=true"]
REFUSED_CRASHES = {
    # estimator: [(extra overrides, the exception verl raises, its message, the verl function raising it)]
    "remax": [
        ([], TypeError, r"compute_remax_outcome_advantage\(\) missing .*'reward_baselines'", "compute_advantage")
    ],
    "gdpo": [
        (["+algorithm.gdpo_reward_keys=[acc]"], KeyError, r"\"prompts\" not found", "compute_gdpo_outcome_advantage"),
        ([], AssertionError, r"GDPO requires 'algorithm.gdpo_reward_keys'", "compute_gdpo_outcome_advantage"),
    ],
    "optimal_token_baseline": [(SUM_PI_SQUARED, AssertionError, r"requires sum_pi_squared", "compute_advantage")],
    "tir_optimal_token_baseline": [(SUM_PI_SQUARED, AssertionError, r"requires sum_pi_squared", "compute_advantage")],
}
"""The crash each refusal prevents, as verl 0.9.1's V1 trainer raises it (its reason in ``REFUSED_ESTIMATORS`` must
name the exception and the missing input)."""

REASON_NAMES = {
    "remax": ("TypeError", "reward_baselines", "compute_remax_outcome_advantage"),
    "gdpo": ("KeyError", "AssertionError", "prompts", "gdpo_reward_keys", "compute_gdpo_outcome_advantage"),
    "optimal_token_baseline": ("AssertionError", "sum_pi_squared"),
    "tir_optimal_token_baseline": ("AssertionError", "sum_pi_squared"),
}


def test_every_refused_estimator_has_its_crash_on_record():
    assert REFUSED_CRASHES.keys() == REFUSED_ESTIMATORS.keys() == REASON_NAMES.keys()


@pytest.mark.parametrize("estimator", sorted(REFUSED_ESTIMATORS))
def test_refusal_names_the_estimator_the_crash_and_the_fix(estimator):
    """What a user reads: the field and value, the reason (the exception verl would raise and the input it lacks),
    and the fix; raised by the config check, before Ray starts."""
    from verl_tor.config import ToRConfig, ToRConfigError
    from verl_tor.integration.trainer import check_adv_estimator

    reason = REFUSED_ESTIMATORS[estimator]
    for name in REASON_NAMES[estimator]:
        assert name in reason, (estimator, name, reason)
    with pytest.raises(ToRConfigError) as err:
        check_adv_estimator(estimator, ToRConfig(enable=True))
    message = str(err.value)
    assert f"algorithm.adv_estimator={estimator!r}" in message and reason in message
    assert "Fix: use an estimator verl's V1 trainer runs" in message
    for crash in REFUSED_CRASHES[estimator]:  # the exception the crash test below sees is the one the reason names
        assert crash[1].__name__ in reason


@pytest.mark.parametrize(
    "estimator,extra,error,match,raised_in",
    [(e, *crash) for e in sorted(REFUSED_CRASHES) for crash in REFUSED_CRASHES[e]],
    ids=[f"{e}-{crash[1].__name__}" for e in sorted(REFUSED_CRASHES) for crash in REFUSED_CRASHES[e]],
)
def test_refused_estimators_crash_in_verls_own_v1_trainer_without_tor(
    monkeypatch, estimator, extra, error, match, raised_in
):
    """The claim behind the refusal: verl's stock sync trainer (ToR off) dies in ``_compute_advantage`` at step 1,
    even with the inputs the estimator wants set in the config and present in TransferQueue, with the exception the
    reason names, raised in verl's own code (not in this test's in-memory TransferQueue or fixtures)."""
    import traceback

    import verl
    import verl.trainer.ppo.v1.trainer_base as trainer_base

    store = InMemoryKV()
    monkeypatch.setattr(trainer_base, "tq", store)
    trainer = make_trainer("trainer.v1.trainer_mode=sync", f"algorithm.adv_estimator={estimator}", *extra)
    meta = fill_store(store)
    with pytest.raises(Exception) as err:
        trainer._compute_advantage(meta, {})
    assert type(err.value) is error, f"{type(err.value).__name__}: {err.value}"
    assert err.match(match)
    frames = traceback.extract_tb(err.value.__traceback__)[1:]  # below this test's own call
    verl_dir = str(Path(verl.__file__).parent)
    assert frames[0].name == "_compute_advantage" and frames[0].filename.startswith(verl_dir)
    ours = [f for f in frames if not f.filename.startswith(verl_dir) and "tensordict" not in f.filename]
    assert not ours, [f"{f.filename}:{f.lineno} {f.name}" for f in ours]
    verl_frames = [f for f in frames if f.filename.startswith(verl_dir)]
    assert verl_frames[-1].name == raised_in, verl_frames[-1]


class EveryRowHasAnImage:
    """``verl_tor.stage.Views`` for rows that all have an image; the "view" is the row itself (this test is about
    where the weights go, not about S_t)."""

    fields = (*VIEW_FIELDS, MULTI_MODAL_FIELD)

    def has_image(self, row):
        return True

    def __call__(self, row, step=0, position=0):
        return dict(row)

    def placeholder(self, row):
        raise AssertionError("every row has an image and is scored")


def advantages_and_weights(monkeypatch, estimator: str) -> dict[str, torch.Tensor]:
    """verl's advantage of ``estimator`` without ToR, with ToR ``apply=advantage`` and with ToR ``apply=loss``."""
    import verl.trainer.ppo.v1.trainer_base as trainer_base

    out = {}
    for name, overrides in {
        "stock": ["trainer.v1.trainer_mode=sync"],
        "advantage": ["tor.enable=true", "tor.apply=advantage", "tor.allow_gae=true"],
        "loss": ["tor.enable=true", "tor.apply=loss", "tor.allow_gae=true"],
    }.items():
        store = InMemoryKV()
        monkeypatch.setattr(trainer_base, "tq", store)
        trainer = make_trainer(f"algorithm.adv_estimator={estimator}", "critic.enable=false", *overrides)
        meta = fill_store(store)
        if name != "stock":
            add_sequences(store, meta)
            g = torch.Generator().manual_seed(11)
            noimg = {
                k: -torch.rand(int(store.data["train"][k]["response_mask"].numel()), generator=g) * 3 for k in meta.keys
            }
            trainer.tor_stage = ToRStage(
                config=trainer.tor_config,
                score=FixedScorer(store, noimg),
                make_meta=KVMeta,
                build_view=EveryRowHasAnImage(),
                store=store,
            )
            trainer.timing_raw, trainer.global_steps = {}, 3
        trainer._compute_advantage(meta, {})
        out[name] = padded(store, meta, "advantages")
        if name == "loss":
            out["weights"] = padded(store, meta, TOR_WEIGHTS_KEY)
        out["mask"], out["old"] = padded(store, meta, "response_mask"), padded(store, meta, "old_log_probs")
    return out


@functools.cache
def actor_config():
    """verl's ActorConfig as a run builds it: no KL loss, no entropy bonus (only the surrogate), DAPO clip-higher."""
    from verl_tor.tools.in_process import build_actor_config

    return build_actor_config(
        "actor_rollout_ref.actor.use_kl_loss=false",
        "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
    )


def policy_gradient(loss_mode: str, advantages, mask, old, weights=None):
    """d(verl's ppo_loss)/d(log_prob of each response token), ToR wrapper when ``weights`` is given. (B, T)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    base = actor_config()
    policy_loss = dataclasses.replace(
        base.policy_loss, loss_mode=loss_mode, dro_beta=0.1 if loss_mode == "dro" else None
    )
    config = dataclasses.replace(base, policy_loss=policy_loss)
    lengths = [int(n) for n in mask.sum(1).tolist()]
    rows = lambda t: torch.nested.as_nested_tensor([t[i, :n] for i, n in enumerate(lengths)], layout=torch.jagged)  # noqa: E731
    new = old + torch.linspace(-0.6, 0.6, old.shape[1])  # ratios on both clip sides
    leaf = torch.cat([torch.cat([torch.zeros(1), new[i, :n], torch.zeros(1)]) for i, n in enumerate(lengths)])
    leaf.requires_grad_(True)
    offsets = torch.tensor([0, *torch.tensor([n + 2 for n in lengths]).cumsum(0).tolist()])
    data = TensorDict(
        {
            "prompts": torch.nested.as_nested_tensor(
                [torch.ones(2, dtype=torch.long)] * len(lengths), layout=torch.jagged
            ),
            "responses": rows(torch.ones_like(mask).long()),
            "response_mask": rows(mask),
            "old_log_probs": rows(old),
            "advantages": rows(advantages),
        },
        batch_size=len(lengths),
    )
    if weights is not None:
        data[TOR_WEIGHTS_KEY] = rows(weights)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    torch.manual_seed(0)  # clip_cov / kl_cov draw tokens at random
    fn = ppo_loss if weights is None else tor_ppo_loss
    loss, _ = fn(config, {"log_probs": torch.nested.nested_tensor_from_jagged(leaf, offsets)}, data)
    (grad,) = torch.autograd.grad(loss, leaf)
    return torch.stack(
        [
            torch.nn.functional.pad(grad[o + 1 : o + 1 + n], (0, mask.shape[1] - n))
            for o, n in zip(offsets[:-1].tolist(), lengths)
        ]
    )


ACCEPTED = sorted(set(ADV_ESTIMATOR_REGISTRY) - set(REFUSED_ESTIMATORS))
"""Every estimator ToR runs (``gae`` with ``tor.allow_gae=true``)."""


@pytest.mark.parametrize("estimator", ACCEPTED)
def test_weights_reach_the_gradient_for_every_accepted_pair(monkeypatch, matrix, estimator):
    got = advantages_and_weights(monkeypatch, estimator)
    w, stock = got["weights"], got["stock"]
    assert stock.abs().sum() > 0, "the estimator gave all-zero advantages: the check below would prove nothing"
    torch.testing.assert_close(got["loss"], stock)  # apply=loss leaves verl's advantages alone...
    torch.testing.assert_close(got["advantage"], stock * w)  # ...apply=advantage multiplies them by w_t
    assert {0.0, 0.5, 1.0} == set(w[got["mask"] > 0].tolist())  # every weight class is exercised
    checked = 0
    for loss_mode in sorted({m for e, m in matrix if e == estimator}):
        for apply in ("advantage", "loss"):
            if matrix[(estimator, loss_mode)][apply][True] is not None:  # refused (allow_gae only opens gae)
                continue
            g1 = policy_gradient(loss_mode, stock, got["mask"], got["old"])
            if apply == "advantage":
                gw = policy_gradient(loss_mode, got["advantage"], got["mask"], got["old"])
            else:
                gw = policy_gradient(loss_mode, stock, got["mask"], got["old"], weights=w)
            torch.testing.assert_close(gw, w * g1, msg=lambda m, cell=(estimator, loss_mode, apply): f"{cell}: {m}")
            assert ((w == 0) & (g1 != 0)).any() and ((w == 0.5) & (g1 != 0)).any(), (estimator, loss_mode, apply)
            checked += 1
    assert checked >= 10, checked
