"""Rollout backend ``hf``: Hugging Face ``generate`` behind verl's rollout interfaces, for machines without vLLM.

verl 0.9.1 only has server rollouts (vLLM, SGLang, TRT-LLM). ``actor_rollout_ref.rollout.name=hf`` plugs a small
one in through verl's own registries (the route ``docs/extend_guide.rst`` describes), in verl's hybrid mode
(rollout and actor on the same devices, weights pushed after every update, checkpoint backend ``naive``):

- ``HFReplica`` (``RolloutReplicaRegistry``, driver side): launches one ``HFRolloutServer`` actor per replica
  next to its FSDP worker; verl's agent loop and load balancer talk to it like to a vLLM server;
- ``HFRolloutServer`` (a Ray actor): token-in-token-out ``generate`` with verl's signature -- images (the collapsed
  ``<|image_pad|>`` runs expanded to each image's grid), vision tokens banned, stop at EOS, per-token log-probs of
  the temperature-scaled policy when asked (verl's ``logprobs_mode=processed_logprobs``), a seed per request under
  ``rollout.full_determinism`` -- and ``update_weights`` (a state-dict update from the actor);
- ``HFServerAdapter`` (``_ROLLOUT_REGISTRY[("hf", "async")]``, in the FSDP worker): verl's ``BaseRollout``; its
  ``update_weights`` consumes the engine's full-tensor generator on every rank (``full_tensor()`` is a collective)
  and the replica's leader pushes the tensors to its server in buckets of
  ``rollout.checkpoint_engine.update_weights_bucket_megabytes``.

The server runs on the CPU, or on the GPU of its node when CUDA is available (``device_map``), so a user without
vLLM can try a recipe on one GPU. ``actor_rollout_ref.rollout.custom.sync_weights=false`` skips the push (the
rollout then keeps sampling from the initial weights: a diagnostic, see ``tests/test_main_ppo_on_cpu.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from typing import Any

import torch

logger = logging.getLogger("verl_tor")

__all__ = ["ROLLOUT_NAME", "HFRolloutServer", "get_replica_class", "register_hf_rollout"]

ROLLOUT_NAME = "hf"
"""``actor_rollout_ref.rollout.name`` of this backend."""

SERVER_NAME = "verl_tor_hf_server_{replica_rank}"
"""Ray actor name of a replica's server (the worker-side adapter finds it by name, as verl's vLLM adapter does)."""


def _request_seed(seed: int, global_steps: int, content: str, occurrence: int) -> int:
    """The sampling seed of the ``occurrence``-th request with this ``content`` (prompt ids + image bytes) in a step.

    verl's V1 agent loop gives no request a stable identity (its ``det-{priority}`` ids are all ``det-0`` there, and
    the ``n`` rollouts of a prompt are the same request), so identical requests are told apart by how many came
    before them in the same step: the same run samples the same tokens whatever the interleaving of prompts.
    """
    digest = hashlib.sha256(f"{seed}/{global_steps}/{content}/{occurrence}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _content_key(prompt_ids: list[int], images: list[Any] | None) -> str:
    h = hashlib.sha256(repr(list(prompt_ids)).encode())
    for image in images or []:
        h.update(image.tobytes() if hasattr(image, "tobytes") else repr(image).encode())
    return h.hexdigest()


def _sync_weights_enabled(rollout_config: Any) -> bool:
    custom = getattr(rollout_config, "custom", None) or {}
    value = custom.get("sync_weights", True) if hasattr(custom, "get") else True
    if not isinstance(value, bool):
        from verl_tor.local.errors import LocalBackendError

        raise LocalBackendError(
            f"actor_rollout_ref.rollout.custom.sync_weights={value!r} is invalid. Fix: give true or false."
        )
    return value


class HFRolloutServer:
    """One rollout replica's generation server (a Ray actor): a Hugging Face model behind verl's server calls.

    ``generate`` runs one request at a time (a lock; the model is not thread-safe), off the event loop so that
    verl's control calls (``set_global_steps``, ``wake_up``...) are served meanwhile.
    """

    def __init__(self, config: Any, model_config: Any, replica_rank: int = 0):
        from transformers import AutoModelForImageTextToText
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config.model import HFModelConfig

        self.config = omega_conf_to_dataclass(config)
        self.model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.replica_rank = replica_rank
        self.global_steps = 0
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # verl's rollout dtype (bf16 by default) on a GPU; float32 on a CPU, where bf16 matmuls are slow and would
        # make the rollout's log-probs drift from the float32 actor's
        dtype = getattr(torch, self.config.dtype) if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.model_config.local_path,
            dtype=dtype,
            device_map=str(self.device),
            trust_remote_code=self.model_config.trust_remote_code,
        ).eval()
        self.processor = self.model_config.processor
        self.tokenizer = self.model_config.tokenizer
        if self.processor is None or not hasattr(self.processor, "image_processor"):
            raise ValueError(
                f"actor_rollout_ref.rollout.name={ROLLOUT_NAME}: {self.model_config.path} has no multimodal "
                "processor. Fix: the hf rollout serves vision-language models (Qwen2-VL family); use vllm for others."
            )
        self.image_token_id = self.processor.image_token_id
        self.banned_ids = self._vision_token_ids()
        self.eos_ids = self._eos_token_ids()
        self._lock = threading.Lock()
        self._occurrences: dict[tuple[int, str], int] = {}
        """(step, content key) -> requests seen (``rollout.full_determinism``: see ``_request_seed``)."""
        self.requests_served = 0
        """Requests since the last weight push: logged then, so a run's log shows how verl's load balancer spread a
        step's requests over the replicas."""

    # ------------------------------------------------------------------ verl's server interface
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        priority: int = 0,
        **kwargs: Any,
    ):
        """verl's token-in-token-out call (``vLLMHttpServer.generate``'s signature) -> ``TokenOutput``."""
        from verl.workers.rollout.replica import TokenOutput

        if video_data:
            raise ValueError(
                f"actor_rollout_ref.rollout.name={ROLLOUT_NAME} got a request with video (request {request_id}): "
                "the hf rollout serves images and text only. Fix: use rollout.name=vllm for video data, or drop "
                "the dataset's video column (data.video_key)."
            )
        if audio_data:
            raise ValueError(
                f"actor_rollout_ref.rollout.name={ROLLOUT_NAME} got a request with audio (request {request_id}). "
                "Fix: use rollout.name=vllm."
            )
        steps = self.global_steps
        self.requests_served += 1
        seed = self._next_seed(list(prompt_ids), image_data, steps, sampling_params)
        token_ids, log_probs = await asyncio.to_thread(
            self._generate, list(prompt_ids), dict(sampling_params), image_data, seed
        )
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs,
            stop_reason="completed",
            extra_fields={"global_steps": int(steps)},
        )

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Copy a bucket of the actor's full tensors (HF names) into the model; returns how many were loaded."""
        return await asyncio.to_thread(self._load, named_tensors)

    async def set_global_steps(self, global_steps: int) -> None:
        if self.requests_served:  # Ray forwards an actor's stdout to the driver's log
            print(
                f"verl_tor hf rollout replica {self.replica_rank}: served {self.requests_served} requests on the "
                f"weights of step {self.global_steps}",
                flush=True,
            )
            self.requests_served = 0
        self.global_steps = int(global_steps)
        self._occurrences = {k: v for k, v in self._occurrences.items() if k[0] >= self.global_steps}

    async def get_weights_checksum(self) -> float:
        """Sum of every parameter (float64): tests compare it with the actor's."""
        with self._lock:
            return float(sum(p.detach().double().sum() for p in self.model.parameters()))

    # Memory management, profiling and request control are vLLM's concerns: the HF model keeps its weights,
    # has no KV cache between requests and no scheduler, so these are no-ops that keep verl's calls valid.
    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:
        return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    # ------------------------------------------------------------------ internals
    def _next_seed(
        self, prompt_ids: list[int], images: list[Any] | None, global_steps: int, sampling_params: dict
    ) -> int | None:
        """A reproducible seed under ``rollout.full_determinism``; ``None`` (fresh randomness) otherwise.

        Greedy requests (validation's default) need no seed and are not counted, so a validation pass between two
        steps leaves the training requests' seeds as an uninterrupted or a resumed run gives them; the sampling
        parameters are part of the key, so sampled validation requests do not shift training ones either.
        """
        if not self.config.full_determinism or float(sampling_params.get("temperature", 1.0)) <= 0:
            return None
        params = tuple(sampling_params.get(k) for k in ("temperature", "top_p", "top_k"))
        key = (global_steps, _content_key(prompt_ids, images) + repr(params))
        occurrence = self._occurrences.get(key, 0)
        self._occurrences[key] = occurrence + 1
        return _request_seed(self.config.seed, global_steps, key[1], occurrence)

    def _vision_token_ids(self) -> list[int]:
        tok = self.tokenizer
        names = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
        ids = [tok.convert_tokens_to_ids(n) for n in names]
        return sorted({int(i) for i in ids if i is not None and i != tok.unk_token_id})

    def _eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _encode(self, prompt_ids: list[int], images: list[Any] | None) -> dict[str, torch.Tensor]:
        """Model inputs of one prompt: each image's ``<|image_pad|>`` run expanded to its merged grid size."""
        from verl.workers.rollout.utils import qwen2_5_vl_dedup_image_tokens

        ids = qwen2_5_vl_dedup_image_tokens(prompt_ids, self.processor)  # one pad per image, as vLLM receives
        inputs: dict[str, torch.Tensor] = {}
        pads = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if images:
            vision = self.processor.image_processor(images=images, return_tensors="pt")
            grids = vision["image_grid_thw"]
            if len(pads) != len(grids):
                raise ValueError(
                    f"prompt has {len(pads)} <|image_pad|> runs for {len(grids)} images: the prompt and the "
                    "request's image_data disagree. Fix: one image placeholder per image in the dataset's prompt."
                )
            merge = self.processor.image_processor.merge_size**2
            expanded: list[int] = []
            for i, t in enumerate(ids):
                if t == self.image_token_id:
                    k = pads.index(i)
                    expanded.extend([t] * (int(grids[k].prod()) // merge))
                else:
                    expanded.append(t)
            ids = expanded
            inputs["pixel_values"] = vision["pixel_values"].to(self.device, self.model.dtype)
            inputs["image_grid_thw"] = grids.to(self.device)
        elif pads:
            raise ValueError(f"prompt has {len(pads)} <|image_pad|> runs but the request carries no image_data")
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        inputs["input_ids"] = input_ids
        inputs["attention_mask"] = torch.ones_like(input_ids)
        # transformers >= 5.3's get_rope_index reads the modality of each token (1 = image), as the processor gives
        inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return inputs

    def _max_new_tokens(self, sampling_params: dict, prompt_len: int) -> int:
        """verl's rule (``vLLMHttpServer.generate``): the request's ``max_tokens``, else the response length
        within the prompt + response budget; at least 1."""
        if "max_tokens" in sampling_params:
            max_tokens = sampling_params["max_tokens"]
        elif "max_new_tokens" in sampling_params:
            max_tokens = sampling_params["max_new_tokens"]
        else:
            cfg = self.config
            max_tokens = min(cfg.response_length, cfg.prompt_length + cfg.response_length - prompt_len)
        return max(1, int(max_tokens))

    @torch.no_grad()
    def _generate(
        self, prompt_ids: list[int], sampling_params: dict, images, seed: int | None
    ) -> tuple[list[int], list[float] | None]:
        inputs = self._encode(prompt_ids, images)
        prompt_len = inputs["input_ids"].shape[1]
        temperature = float(sampling_params.get("temperature", 1.0))
        do_sample = temperature > 0
        top_k = int(sampling_params.get("top_k", -1))
        top_p = float(sampling_params.get("top_p", 1.0))
        kwargs = dict(
            max_new_tokens=self._max_new_tokens(sampling_params, prompt_len),
            do_sample=do_sample,
            # HF's defaults are top_k=50 and whatever the checkpoint's generation_config says: state everything
            temperature=temperature if do_sample else None,
            top_k=top_k if do_sample and top_k > 0 else (0 if do_sample else None),
            top_p=top_p if do_sample else None,
            repetition_penalty=float(sampling_params.get("repetition_penalty", 1.0)),
            eos_token_id=[] if sampling_params.get("ignore_eos", self.config.ignore_eos) else self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            bad_words_ids=[[t] for t in self.banned_ids] or None,
            return_dict_in_generate=True,
            output_logits=True,
        )
        with self._lock:
            # the server's own process: reseeding the global generator gives each request its own stream
            torch.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
            out = self.model.generate(**inputs, **kwargs)
        tokens = out.sequences[0, prompt_len:]
        n = len(tokens)  # the EOS token stays, as vLLM returns it
        token_ids = [int(t) for t in tokens]
        log_probs = None
        if sampling_params.get("logprobs", False):
            logits = torch.stack(out.logits[:n], dim=1)[0].float()  # (n, V), raw scores of each step
            scaled = logits / temperature if do_sample else logits
            log_probs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:n, None].long()).squeeze(-1).tolist()
        return token_ids, log_probs

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        unknown = [name for name, _ in named_tensors if name not in params and name not in buffers]
        if unknown:
            raise KeyError(
                f"hf rollout: the actor sent weights the rollout model does not have: {unknown[:5]} "
                f"(model class {type(self.model).__name__}). Fix: the actor and rollout must load the same "
                "architecture (actor_rollout_ref.model.path)."
            )
        with self._lock, torch.no_grad():
            for name, tensor in named_tensors:
                target = params.get(name, buffers.get(name))
                target.copy_(tensor.to(target.device, target.dtype))
        return len(named_tensors)


class _ServerLocator:
    """Rank bookkeeping shared by the adapter: which replica a worker belongs to and whether it leads it."""

    @staticmethod
    def locate(config: Any, replica_rank: int) -> tuple[int, bool]:
        rank = int(os.environ.get("RANK", 0))
        world = config.tensor_model_parallel_size * config.data_parallel_size * config.pipeline_model_parallel_size
        replica = rank // world if replica_rank == -1 else replica_rank
        return replica, rank % world == 0


def _make_adapter_class():
    from verl.workers.rollout.base import BaseRollout

    class HFServerAdapter(BaseRollout):
        """verl's ``BaseRollout`` in the FSDP worker: pushes the actor's weights to this replica's HF server."""

        def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs):
            super().__init__(config, model_config, device_mesh)
            self.replica_rank, self.is_leader = _ServerLocator.locate(self.config, replica_rank)
            self.sync_weights = _sync_weights_enabled(self.config)
            self._server = None

        def _server_handle(self):
            import ray

            if self._server is None:
                self._server = ray.get_actor(SERVER_NAME.format(replica_rank=self.replica_rank))
            return self._server

        async def resume(self, tags: list[str]):
            return None  # the server never released anything

        async def release(self):
            return None

        async def update_weights(self, weights, global_steps: int | None = None, wire_format="named_tensors", **kw):
            if wire_format != "named_tensors":
                raise ValueError(
                    f"hf rollout: weight update format {wire_format!r} is not supported. Fix: use "
                    "actor_rollout_ref.rollout.checkpoint_engine.backend=naive (hybrid mode)."
                )
            bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
            bucket: list[tuple[str, torch.Tensor]] = []
            size = 0
            pushes = []
            for name, tensor in weights:  # every rank iterates: full_tensor() inside the generator is a collective
                if not (self.is_leader and self.sync_weights):
                    continue
                cpu = tensor.detach().to("cpu", copy=True)
                bucket.append((name, cpu))
                size += cpu.numel() * cpu.element_size()
                if size >= bucket_bytes:
                    pushes.append(self._server_handle().update_weights.remote(bucket))
                    bucket, size = [], 0
            if self.is_leader:
                if bucket and self.sync_weights:
                    pushes.append(self._server_handle().update_weights.remote(bucket))
                for push in pushes:
                    await push
                if global_steps is not None:
                    await self._server_handle().set_global_steps.remote(global_steps)

    HFServerAdapter.__module__ = __name__
    return HFServerAdapter


def _make_replica_class():
    import ray
    from verl.workers.rollout.replica import RolloutReplica

    class HFReplica(RolloutReplica):
        """verl ``RolloutReplica`` ``hf``: one ``HFRolloutServer`` actor on the node of the replica's worker."""

        async def launch_servers(self):
            if self.world_size != 1:
                raise ValueError(
                    f"actor_rollout_ref.rollout.name={ROLLOUT_NAME} serves one model per replica, but the rollout "
                    f"world size is {self.world_size} (tensor x data x pipeline parallel). Fix: set "
                    "actor_rollout_ref.rollout.tensor_model_parallel_size=1 (and data/pipeline parallel 1)."
                )
            from verl.plugin.platform.platform_manager import get_platform

            worker = self.workers[0]
            node_id = await worker.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
            name = SERVER_NAME.format(replica_rank=self.replica_rank)
            # see the actor's GPUs (like verl's vLLM server, which holds no Ray GPU of its own in hybrid mode)
            env_vars = {var: "1" for var in get_platform().ray_noset_envvars()}
            server = (
                ray.remote(HFRolloutServer)
                .options(
                    name=name,
                    num_cpus=0,
                    max_concurrency=self.max_concurrency,
                    runtime_env={"env_vars": env_vars},
                    scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                        node_id=node_id, soft=False
                    ),
                )
                .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
            )
            await server.set_global_steps.remote(0)  # waits for the model to load
            self.servers = [server]
            self._server_handle = server
            self._server_address = name

    HFReplica.__module__ = __name__
    return HFReplica


_CLASSES: dict[str, type] = {}


def get_replica_class() -> type:
    if "replica" not in _CLASSES:
        _CLASSES["replica"] = _make_replica_class()
    return _CLASSES["replica"]


def __getattr__(name: str):
    if name == "HFServerAdapter":
        if "adapter" not in _CLASSES:
            _CLASSES["adapter"] = _make_adapter_class()
        return _CLASSES["adapter"]
    if name == "HFReplica":
        return get_replica_class()
    raise AttributeError(name)


def register_hf_rollout() -> bool:
    """Register rollout ``hf`` in verl's replica and adapter registries (idempotent)."""
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    if ROLLOUT_NAME in RolloutReplicaRegistry._registry:
        return False
    RolloutReplicaRegistry.register(ROLLOUT_NAME, get_replica_class)
    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{__name__}.HFServerAdapter"
    return True
