"""One ToR step on a stored rollout batch, through verl's real worker on N FSDP ranks (gloo), for
``tests/test_ranks_equality_on_cpu.py``.

    python tests/tor_ranks.py --world-size 2 --shape gpu --checkpoint CKPT --batch batch.pt --out out.pt

Each rank is a process with verl's ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` environment (what Ray gives verl's
workers) and the CPU platform (``VERL_PLATFORM=cpu``). On every rank run, unchanged: verl's
``ActorRolloutRefWorker`` (role ``actor``: ``init_model`` builds the FSDP2 engine over the N ranks, with verl's
monkey patch as the config asks), its ``compute_log_prob`` / ``update_actor``, and verl's V1 trainer code with the
``tor_sync`` trainer on top (``_compute_old_log_prob``, ``_compute_advantage`` = verl's GRPO + the production
``ToRStage``, ``_update_actor``). What stands in for Ray and TransferQueue is ``SPMDWorkerGroup`` plus an
in-memory store holding the whole batch on every rank: the driver's logic runs on every rank (the same inputs give
the same decisions), and a worker call is dispatched the way verl's ``make_nd_compute_dataproto_dispatch_fn`` does
(``BatchData.chunk``: contiguous data-parallel shards), each rank computes its own shard, and the shards are
gathered back (``BatchData.concat``) and written to the store, as ``tqbridge`` would.

Shapes (``--shape``): ``simple`` = padded sequences, fixed micro-batches of 2 (every loop test's); ``gpu`` = packed
sequences (``use_remove_padding=true``), dynamic micro-batches under a token budget (the GPU recipes' batching).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TOP_P = 0.95
TOKEN_BUDGET = 170
"""Tokens per micro-batch in the ``gpu`` shape: the stored rows hold 50-93 tokens, so each rank splits its four rows
into micro-batches of 2, 1 and 1 rows (old-policy pass, update) and 2 and 2 (the shorter image-free rows)."""


def compose_config(checkpoint: str, world_size: int, shape: str, lr: float = 1e-3):
    from hydra import compose, initialize_config_dir

    common = [
        "algorithm.adv_estimator=grpo",
        "trainer.v1.trainer_mode=tor_sync",
        "tor.enable=true",
        "tor.entropy=top_p",
        f"tor.entropy_top_p={TOP_P}",
        "tor.apply=advantage",
        f"actor_rollout_ref.model.path={checkpoint}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_fused_kernels=False",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        "actor_rollout_ref.actor.shuffle=False",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.calculate_log_probs=False",
        "data.train_batch_size=2",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.actor.fsdp_config.seed=1",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={world_size}",
    ]
    if shape == "simple":
        common += [
            "actor_rollout_ref.model.use_remove_padding=False",
            "actor_rollout_ref.model.enable_gradient_checkpointing=False",
            "actor_rollout_ref.actor.use_dynamic_bsz=False",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        ]
    elif shape == "gpu":
        common += [
            "actor_rollout_ref.model.use_remove_padding=True",
            "actor_rollout_ref.model.enable_gradient_checkpointing=True",
            "actor_rollout_ref.actor.use_dynamic_bsz=True",
            f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={TOKEN_BUDGET}",
            "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
            f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={TOKEN_BUDGET}",
        ]
    else:
        raise ValueError(f"--shape {shape!r}: simple or gpu")
    with initialize_config_dir(config_dir=str(ROOT / "verl_tor" / "recipes" / "config"), version_base=None):
        return compose("tor_trainer", overrides=common)


class SPMDWorkerGroup:
    """``actor_rollout_wg`` on every rank: verl's data-parallel dispatch and collect around this rank's worker."""

    def __init__(self, worker, store, rank: int, world_size: int):
        self.worker, self.store, self.rank, self.world_size = worker, store, rank, world_size

    def _call(self, method: str, meta) -> list:
        from verl.protocol import BatchData
        from verl.utils import tensordict_utils as tu

        data = self.store.kv_batch_get(list(meta.keys), meta.partition_id)
        shard = BatchData(data).chunk(self.world_size)[self.rank].unlock_() if self.world_size > 1 else data
        for key, value in dict(meta.extra_info or {}).items():  # tqbridge: the meta's extra_info as non-tensors
            tu.assign_non_tensor_data(tensor_dict=shard, key=key, val=value)
        out = getattr(self.worker, method)(shard)
        outs = [None] * self.world_size
        torch.distributed.all_gather_object(outs, out)
        return outs

    def compute_log_prob(self, meta):
        from tensordict import TensorDict
        from verl.protocol import BatchData

        full = BatchData(self._call("compute_log_prob", meta)).concat()
        fields = {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}
        return self.store.kv_batch_put(list(meta.keys), meta.partition_id, fields=TensorDict(fields, len(meta.keys)))

    def update_actor(self, meta):
        # every rank's train_mini_batch already all-gathers the metrics over data parallel: rank 0's is the batch's
        return self._call("update_actor", meta)[0]


def record_micro_batches(log: list) -> None:
    """Spy on verl's forward_step (unchanged): the (rows, tokens) of every micro-batch this rank runs."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    original = FSDPEngineWithLMHead.forward_step

    def forward_step(self, micro_batch, loss_function, forward_only):
        log.append((int(micro_batch.batch_size[0]), int(micro_batch["input_ids"].offsets()[-1])))
        return original(self, micro_batch, loss_function, forward_only)

    FSDPEngineWithLMHead.forward_step = forward_step


def run_rank(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        VERL_PLATFORM="cpu",
    )
    torch.manual_seed(0)
    import verl  # noqa: F401  - loads verl_tor's plugin: the CPU platform, the engine hook, the trainer modes
    import verl.trainer.ppo.v1.trainer_base as trainer_base
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.utils import hf_processor
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from verl_tor.integration.trainer import build_stage
    from verl_tor.stage import rows_to_tensordict
    from verl_tor.tools.in_process import InMemoryKV, KVMeta

    config = compose_config(args.checkpoint, world_size, args.shape)
    worker = ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")
    worker.init_model()
    micro_batches: list = []
    record_micro_batches(micro_batches)

    rows = torch.load(args.batch, weights_only=False)
    keys = [f"{row['uid']}_{i}_0" for i, row in enumerate(rows)]  # verl's key layout: uid_session_trajectory
    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    trainer_base.tq = store  # verl's trainer reads and writes TransferQueue through this module attribute
    trainer = get_trainer_cls("tor_sync")(config)
    trainer.actor_rollout_wg = SPMDWorkerGroup(worker, store, rank, world_size)
    trainer.processor = hf_processor(args.checkpoint)
    seen: dict = {}
    trainer.tor_stage = dataclasses.replace(
        build_stage(trainer), store=store, on_weights=lambda step, keys, tensors: seen.update(tensors)
    )
    trainer.global_steps, trainer.timing_raw = 1, {}

    def padded(name: str) -> torch.Tensor:
        return torch.nested.to_padded_tensor(store.kv_batch_get(keys, "train", [name])[name], 0.0)

    def meta() -> KVMeta:
        return KVMeta(keys=list(keys), partition_id="train")

    metrics: dict = {}
    # the full entropy: verl's own old-policy pass (no ToR flag), then the ToR trainer's (top-p entropy)
    trainer_base.PPOTrainer._compute_old_log_prob(trainer, meta(), {})
    full_entropy = padded("entropy")
    n_micro = {"old_full": len(micro_batches)}
    trainer._compute_old_log_prob(meta(), metrics)
    n_micro["old_top_p"] = len(micro_batches)
    old_log_probs, top_p_entropy = padded("old_log_probs"), padded("entropy")
    trainer._compute_advantage(meta(), metrics)
    n_micro["noimg"] = len(micro_batches)
    update = trainer._update_actor(meta(), metrics)
    n_micro["update"] = len(micro_batches)
    # the updated policy on the same rows: equal updates give equal log-probs
    trainer_base.PPOTrainer._compute_old_log_prob(trainer, meta(), {})
    result = {
        "old_log_probs": old_log_probs,
        "full_entropy": full_entropy,
        "top_p_entropy": top_p_entropy,
        "new_log_probs": padded("old_log_probs"),
        "response_mask": padded("response_mask"),
        "advantages": padded("advantages"),
        "stage": {k: seen[k] for k in ("entropy", "sensitivity", "weights", "reasoning", "perception")},
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        "update": update is not None,
        "micro_batches": micro_batches,
        "n_micro": n_micro,
    }
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, {"micro_batches": micro_batches})
    result["micro_batches_per_rank"] = [g["micro_batches"] for g in gathered]
    if rank == 0:
        torch.save(result, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def build_batch(checkpoint: str, path: str) -> None:
    """The stored rollouts: 8 trajectories of a tiny Qwen2.5-VL, as verl's agent loop writes them (verl's own
    position ids and multi-modal inputs), in 3 GRPO groups (two with an image, one text-only), responses of 3 to 17
    tokens and outcome rewards that differ within each group."""
    from verl.utils import hf_processor

    from verl_tor import tiny
    from verl_tor.tools.demo import encode_prompt
    from verl_tor.tools.in_process import build_verl_row

    processor = hf_processor(checkpoint)
    g = torch.Generator().manual_seed(7)
    rows = []
    plan = [(0, True, 3), (1, True, 3), (2, False, 2)]
    for group, with_image, n in plan:
        problem = tiny.make_geometry_problem(group)
        image = problem["image"] if with_image else None
        question = problem["question"] if with_image else "What is two plus two?"
        prompt = encode_prompt(processor, {"question": question, "image": image})["input_ids"][0]
        for j in range(n):
            length = 3 + int(torch.randint(0, 15, (1,), generator=g))
            response = torch.randint(40, 200, (length,), generator=g)
            row = build_verl_row(processor, prompt, response, [image] if image is not None else None)
            scores = torch.zeros(length)
            scores[-1] = float(j % 2)  # rewards differ within each group: non-zero GRPO advantages
            row.update(uid=f"g{group}", rm_scores=scores)
            rows.append(row)
    torch.save(rows, path)


def _spawned(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    run_rank(rank, world_size, port, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--shape", choices=["simple", "gpu"], required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.world_size, port, args), nprocs=args.world_size, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
