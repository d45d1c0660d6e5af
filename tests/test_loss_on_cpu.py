"""tor.apply=loss through verl's real ppo_loss on nested TensorDicts, against the hand formula."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from verl_tor.loss import TOR_WEIGHTS_KEY, fold_tor_weights, tor_ppo_loss

PROMPT_LENS, RESPONSE_LENS = [2, 3, 2], [4, 2, 3]


def nested(rows):
    return torch.nested.as_nested_tensor([torch.as_tensor(r, dtype=torch.float32) for r in rows], layout=torch.jagged)


@pytest.fixture(scope="module")
def actor_config():
    from verl_tor.tools.in_process import build_actor_config

    return build_actor_config(
        "actor_rollout_ref.actor.clip_ratio_low=0.2",
        "actor_rollout_ref.actor.clip_ratio_high=0.28",  # DAPO clip-higher
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_coef=0.01",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
    )


def make_batch(seed=0):
    """3 trajectories; per-token tensors are response-length rows, model log-probs full-sequence (verl's layout)."""
    g = torch.Generator().manual_seed(seed)
    old = [torch.randn(n, generator=g) * 0.3 - 1.0 for n in RESPONSE_LENS]
    # current policy: ratios spread over [e^-0.6, e^0.6] so both clip sides and dual-clip are exercised
    new = [o + torch.linspace(-0.6, 0.6, len(o)) for o in old]
    adv = [torch.full((n,), a) for n, a in zip(RESPONSE_LENS, [1.5, -2.0, 0.7])]
    weights = [torch.tensor([1.0, 0.0, 0.5, 1.0]), torch.tensor([0.5, 0.0]), torch.tensor([0.0, 1.0, 1.0])]
    ref = [o + 0.1 for o in old]
    full = []  # verl convention: the log-prob of response token t sits at sequence position (prompt_len + t - 1)
    for p, n in zip(PROMPT_LENS, new):
        full.append(torch.cat([torch.zeros(p - 1), n, torch.zeros(1)]))
    values = torch.cat(full).requires_grad_(True)  # the leaf we differentiate against
    offsets = torch.tensor([0, *torch.tensor([len(f) for f in full]).cumsum(0).tolist()])
    log_probs = torch.nested.nested_tensor_from_jagged(values, offsets)
    data = TensorDict(
        {
            "prompts": nested([torch.ones(p) for p in PROMPT_LENS]).long(),
            "responses": nested([torch.ones(n) for n in RESPONSE_LENS]).long(),
            "response_mask": nested([torch.ones(n) for n in RESPONSE_LENS]),
            "old_log_probs": nested(old),
            "advantages": nested(adv),
            "ref_log_prob": nested(ref),
        },
        batch_size=3,
    )
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    return data, (log_probs, values), dict(old=old, new=new, adv=adv, weights=weights, ref=ref)


def hand_loss(raw, weighted: bool, eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_coef=0.01):
    """Token-mean of w_t · dual-clipped PPO surrogate + kl_coef · low-var-KL (unweighted), written out."""
    pg_sum, kl_sum, n = 0.0, 0.0, 0
    for old, new, adv, w, ref in zip(raw["old"], raw["new"], raw["adv"], raw["weights"], raw["ref"]):
        ratio = torch.exp(new - old)
        surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
        surrogate = torch.where(adv < 0, torch.minimum(surrogate, -adv * clip_c), surrogate)
        pg_sum = pg_sum + ((w if weighted else 1.0) * surrogate).sum()
        kl = (ref - new).clamp(-20, 20)
        kl_sum = kl_sum + (torch.exp(kl) - kl - 1).clamp(-10, 10).sum()
        n += len(old)
    return pg_sum / n + kl_coef * kl_sum / n


def run_loss(fn, config, data, log_probs):
    nested_log_probs, leaf = log_probs
    loss, metrics = fn(config, {"log_probs": nested_log_probs}, data)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def test_loss_wrapper_equals_hand_formula(actor_config):
    from verl.workers.utils.losses import ppo_loss

    data, log_probs, raw = make_batch()
    data[TOR_WEIGHTS_KEY] = nested(raw["weights"])
    loss, _, metrics = run_loss(tor_ppo_loss, actor_config, data, log_probs)
    torch.testing.assert_close(loss, hand_loss(raw, weighted=True))
    # and it is not the unweighted loss
    stock, _, _ = run_loss(ppo_loss, actor_config, data.exclude(TOR_WEIGHTS_KEY), log_probs)
    torch.testing.assert_close(stock, hand_loss(raw, weighted=False))
    assert abs(float(stock - loss)) > 1e-3
    assert TOR_WEIGHTS_KEY in data.keys(), "the micro-batch must not be mutated"


def test_apply_advantage_equals_apply_loss_for_vanilla(actor_config):
    from verl.workers.utils.losses import ppo_loss

    data, log_probs, raw = make_batch(seed=1)
    by_loss = data.clone()
    by_loss[TOR_WEIGHTS_KEY] = nested(raw["weights"])
    by_adv = data.clone()
    by_adv["advantages"] = nested([a * w for a, w in zip(raw["adv"], raw["weights"])])
    loss_l, grad_l, _ = run_loss(tor_ppo_loss, actor_config, by_loss, log_probs)
    loss_a, grad_a, _ = run_loss(ppo_loss, actor_config, by_adv, log_probs)
    torch.testing.assert_close(loss_l, loss_a)
    torch.testing.assert_close(grad_l, grad_a)


def test_without_tor_weights_the_wrapper_is_stock_bit_for_bit(actor_config):
    from verl.workers.utils.losses import ppo_loss

    data, log_probs, _ = make_batch(seed=2)
    loss_w, grad_w, _ = run_loss(tor_ppo_loss, actor_config, data, log_probs)
    loss_s, grad_s, _ = run_loss(ppo_loss, actor_config, data, log_probs)
    assert torch.equal(loss_w, loss_s) and torch.equal(grad_w, grad_s)


def test_fold_multiplies_existing_rollout_is_weights():
    data, _, raw = make_batch()
    data["rollout_is_weights"] = nested([torch.full((n,), 2.0) for n in RESPONSE_LENS])
    data[TOR_WEIGHTS_KEY] = nested(raw["weights"])
    folded = fold_tor_weights(data)
    assert TOR_WEIGHTS_KEY not in folded.keys()
    got = torch.nested.to_padded_tensor(folded["rollout_is_weights"], -1.0)
    want = torch.nested.to_padded_tensor(nested([2 * w for w in raw["weights"]]), -1.0)
    assert torch.equal(got, want)
    data[TOR_WEIGHTS_KEY] = nested([torch.ones(n + 1) for n in RESPONSE_LENS])
    with pytest.raises(ValueError, match="different per-row lengths"):
        fold_tor_weights(data)


@pytest.mark.parametrize("loss_mode", ["gspo", "cispo", "gpg", "sapo", "dppo_tv", "clip_cov", "kl_cov", "dro"])
def test_wrapper_reweights_other_registered_losses(actor_config, loss_mode):
    """Zero weights everywhere must zero the policy-gradient part of every wrappable loss (KL stays)."""
    import dataclasses

    config = dataclasses.replace(
        actor_config,
        use_kl_loss=False,
        policy_loss=dataclasses.replace(
            actor_config.policy_loss, loss_mode=loss_mode, **({"dro_beta": 0.1} if loss_mode == "dro" else {})
        ),
    )
    data, log_probs, raw = make_batch(seed=3)
    data[TOR_WEIGHTS_KEY] = nested([torch.zeros(n) for n in RESPONSE_LENS])
    loss, grad, _ = run_loss(tor_ppo_loss, config, data, log_probs)
    assert float(loss.abs()) == 0.0 and float(grad.abs().sum()) == 0.0
    data[TOR_WEIGHTS_KEY] = nested([torch.ones(n) for n in RESPONSE_LENS])
    loss1, grad1, _ = run_loss(tor_ppo_loss, config, data, log_probs)
    assert float(grad1.abs().sum()) > 0.0


def test_loss_wrapper_reaches_a_verl_ray_worker_through_set_loss_fn(actor_config, ray_cluster):
    """What ``tor.apply=loss`` does on a cluster: the trainer pickles ``build_tor_loss_fn(actor_config)`` to every
    actor worker through verl's ONE_TO_ALL ``set_loss_fn``; the worker (which loaded the plugin on ``import verl``)
    then calls it as verl's engine does. Same loss and gradient as in this process."""
    from verl.single_controller.base import Worker
    from verl.single_controller.base.decorator import Dispatch, register
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    from verl_tor.loss import build_tor_loss_fn

    class LossWorker(Worker):  # the two methods ActorRolloutRefWorker / TrainingWorker use
        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def set_loss_fn(self, loss_fn):
            self.loss_fn = loss_fn

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def weighted_loss(self, seed):
            import sys

            # verl imported its plugins when this worker started; nothing here imported verl_tor.integration.plugin
            loaded_by_verl = "verl_tor.integration.plugin" in sys.modules
            from verl_tor.integration import hooks

            data, log_probs, raw = make_batch(seed)
            data[TOR_WEIGHTS_KEY] = nested(raw["weights"])
            loss, grad, _ = run_loss(
                lambda config, out, d: self.loss_fn(model_output=out, data=d), None, data, log_probs
            )
            return {"loss": loss, "grad": grad, "loaded_by_verl": loaded_by_verl, "hooks": dict(hooks._INSTALLED)}

    pool = RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1)
    wg = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=RayClassWithInitArgs(cls=ray_cluster.remote(LossWorker)))
    wg.set_loss_fn(build_tor_loss_fn(actor_config))
    (remote,) = wg.weighted_loss(1)

    data, log_probs, raw = make_batch(1)
    data[TOR_WEIGHTS_KEY] = nested(raw["weights"])
    loss, grad, _ = run_loss(tor_ppo_loss, actor_config, data, log_probs)
    torch.testing.assert_close(remote["loss"], loss, rtol=0, atol=0)
    torch.testing.assert_close(remote["grad"], grad, rtol=0, atol=0)
    torch.testing.assert_close(loss, hand_loss(raw, weighted=True))
    assert remote["loaded_by_verl"], "the worker did not load verl_tor through verl's plugin entry point"
    assert set(remote["hooks"]) == {
        "register_trainer_mode",
        "wrap_validate_config",
        "fix_qwen2_vl",
        "install_top_p_entropy",
        "fix_mrope_position_ids",
    }  # and no local-backend hook: the worker's environment does not select it
