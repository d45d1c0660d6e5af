"""Repeatable DAPO batches on the local backend: verl's sync replay buffer picks surplus groups in dispatch order.

With dynamic sampling (``algorithm.filter_groups.enable=true``, ToR-DAPO's recipe) verl 0.9.1's sync
``ReplayBuffer.sample`` refills one prompt at a time for every group it filters out, waits for every dispatched group,
then keeps ``train_batch_size`` of the finished ones and discards the surplus. ``_select_prompt_uids`` keeps them by
``sorted(sampleable_keys, key=<the prompt's global step>)``: within a step every key ties, so the kept groups are the
first ones in the iteration order of a Python ``set`` of uid strings -- verl makes uids with ``uuid.uuid4()``, so
that order is a fresh random one in every run, and two runs with the same seed train on different groups (issue
17.8: the same 1-step ToR-DAPO run gave rewards 0.544 / 0.594 / 0.544).

The fix keeps verl's own selection and only breaks its ties by dispatch order: the uids are handed to it ordered by
their first appearance in TransferQueue (``tq.kv_list`` lists a partition's keys in insertion order, and verl puts a
prompt's key, status ``pending``, when it dispatches the prompt, in dataloader order), and ``sorted`` is stable. The
kept groups are then the first ``train_batch_size`` unfiltered prompts in dataloader order, however many surplus
prompts were dispatched (that number follows how the buffer's polls interleave with finishing generations): the
step's batch repeats. What still does not repeat is the number of prompts a step consumes from the dataloader, so
step 2 of two DAPO runs may start from different prompts (see ``tests/test_main_ppo_views_on_cpu.py``).

Installed by ``verl_tor.local.install`` where the hf rollout is selected (the backend whose generations repeat);
without dynamic sampling the selection takes every sampleable group and the order changes nothing.
"""

from __future__ import annotations

import functools

__all__ = ["order_selection_by_dispatch"]


def order_selection_by_dispatch() -> bool:
    """Wrap ``ReplayBuffer._select_prompt_uids`` (idempotent). Returns whether it wrapped now."""
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    original = ReplayBuffer._select_prompt_uids
    if getattr(original, "__verl_tor__", False):
        return False

    @functools.wraps(original)
    def _select_prompt_uids(self, partition_id, sampleable_keys, batch_size):
        dispatched = {uid: i for i, uid in enumerate(self.prompt_global_steps[partition_id])}  # kv_list order
        ordered = sorted(sampleable_keys, key=lambda uid: (dispatched.get(uid, len(dispatched)), uid))
        return original(self, partition_id, ordered, batch_size)

    _select_prompt_uids.__verl_tor__ = True
    _select_prompt_uids.__wrapped_original__ = original
    ReplayBuffer._select_prompt_uids = _select_prompt_uids
    return True
