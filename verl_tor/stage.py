"""The ToR stage: image-free views -> one extra log-prob pass -> S_t -> top-ρ selection -> token weights -> metrics.

Runs on the driver, once per training step, after verl's advantage computation (see ``verl_tor.trainer``).
It talks to verl through three narrow seams so it can be tested without a cluster:

- a key-value store with TransferQueue's ``kv_batch_get / kv_batch_put / kv_clear`` (the ``transfer_queue``
  module itself in production, an in-memory double in tests);
- a scorer: a worker group method ``(KVBatchMeta) -> KVBatchMeta`` that runs verl's ``compute_log_prob``
  on the rows of a meta and writes ``log_probs`` (and ``entropy`` if asked) back into the store;
- ``verl_tor.ops.compute_tor_weights`` for the maths.

Nothing outlives the step: the image-free rows live in their own partition and are cleared in a ``finally``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tensordict import NonTensorStack, TensorDict

from verl_tor import metrics as M
from verl_tor.config import ToRConfig
from verl_tor.loss import TOR_WEIGHTS_KEY
from verl_tor.ops import compute_visual_sensitivity, select_tor_tokens

logger = logging.getLogger("verl_tor")

VIEW_PARTITION = "tor_noimg"
"""TransferQueue partition of the image-free rows; cleared at the end of every stage call."""

VIEW_KEY_SUFFIX = "@tor_noimg"

# What verl's compute_log_prob reads of a trajectory: the engine forward (input_ids, position_ids, multimodal
# inputs), the response slicing (prompts, responses, response_mask) and FSDPEngine.forward_backward_batch, which
# sums loss_mask for its token count even when forward-only. Everything else of the row (rewards, advantages,
# old log-probs...) is not needed to score the image-free view.
VIEW_FIELDS = ("prompts", "responses", "response_mask", "loss_mask", "input_ids", "attention_mask", "position_ids")
MULTI_MODAL_FIELD = "multi_modal_inputs"
REBUILT_FIELDS = ("input_ids", "attention_mask", "position_ids")
"""What ``image_view=remove`` rebuilds from ``prompts`` + ``responses`` (verl's own position-id code), so it never reads
them from TransferQueue."""


class Views(Protocol):
    """Image-free views of trajectories (``ViewBuilder``): what to read, the view, and rows without an image."""

    fields: tuple[str, ...]
    """The fields to read from TransferQueue for the views."""

    def __call__(self, row: dict) -> dict | None:
        """The image-free version of one trajectory, or ``None`` when it has no image."""
        ...

    def complete(self, row: dict) -> dict:
        """A row without an image, whole, to be scored as it is."""
        ...


class KVStore(Protocol):
    """The subset of ``transfer_queue``'s KV interface the stage uses."""

    def kv_batch_get(
        self, keys: list[str], partition_id: str, select_fields: list[str] | None = None
    ) -> TensorDict: ...

    def kv_batch_put(self, keys: list[str], partition_id: str, fields: TensorDict | None = None, tags=None) -> Any: ...

    def kv_clear(self, keys: list[str], partition_id: str) -> None: ...


@dataclass
class ToRStage:
    """One ToR stage, bound to a run's config and its scoring worker.

    Attributes:
        config: the validated ``tor`` block.
        score: ``(KVBatchMeta) -> Any``; runs verl's log-prob pass over the meta's rows (no grad) and writes
            ``log_probs`` (full sequence, nested) back to ``store``; e.g. ``actor_rollout_wg.compute_log_prob``.
        make_meta: ``(keys, partition_id, tags, extra_info) -> KVBatchMeta`` (TransferQueue's dataclass).
        build_view: the image-free views (``make_view_builder``); ``None`` when the config needs no image-free
            pass (``tor.mode`` reasoning_only / all_tokens).
        store: the TransferQueue KV interface.
        temperature: rollout temperature (log-probs are of the temperature-scaled policy, as verl's old pass).
        extra_meta: extra ``extra_info`` for the scoring call (e.g. ``no_lora_adapter`` for a ref-in-actor).
        on_weights: optional callback ``(step, rows, tensors) -> None`` for token maps.
    """

    config: ToRConfig
    score: Callable[[Any], Any]
    make_meta: Callable[..., Any]
    build_view: Views | None
    store: KVStore
    temperature: float = 1.0
    extra_meta: dict = field(default_factory=dict)
    on_weights: Callable[..., None] | None = None

    # ------------------------------------------------------------------ main entry
    def run(self, batch: Any, metrics: dict, timing_raw: dict, step: int) -> Any:
        """Compute and store the ToR weights of ``batch`` (a ``KVBatchMeta``); return the newest meta.

        ``apply=advantage`` rewrites ``advantages`` in place (w_t·A_t); ``apply=loss`` writes ``tor_weights`` for
        the loss wrapper. Metrics (``tor/*``) go into ``metrics``, timings into ``timing_raw`` (verl turns
        ``timing_raw[name]`` into ``timing_s/name``).
        """
        cfg = self.config
        keys, partition = list(batch.keys), batch.partition_id
        want = ["uid", "response_mask", "entropy", "old_log_probs"]
        if cfg.apply == "advantage":
            want.append("advantages")
        data = self.store.kv_batch_get(keys=keys, partition_id=partition, select_fields=want)
        response_mask = _padded(data["response_mask"]).to(torch.bool)  # (B, T)
        old_log_prob = _padded(data["old_log_probs"]).float()  # (B, T)
        entropy = _padded(data["entropy"]).float()  # (B, T) nats
        index = np.array(_as_list(data["uid"]), dtype=object)
        if len(index) != len(keys):
            raise RuntimeError(f"ToR: got {len(index)} uids for {len(keys)} trajectories")

        sensitivity = None
        has_image = torch.ones(len(keys), dtype=torch.bool)
        if cfg.needs_image_free_pass:
            t0 = time.perf_counter()
            noimg_log_prob, noimg_entropy, has_image = self.score_image_free(batch, response_mask.shape[1])
            sensitivity = compute_visual_sensitivity(
                old_log_prob,
                noimg_log_prob,
                method=cfg.sensitivity,
                entropy=entropy,
                noimg_entropy=noimg_entropy,
                response_mask=response_mask,
            )
            # A text-only prompt has no image to be sensitive to: S_t = 0 (the paper's S_t is undefined there).
            sensitivity = sensitivity * has_image.unsqueeze(1).to(sensitivity.dtype)
            _add_timing(timing_raw, "tor_noimg", time.perf_counter() - t0)

        t0 = time.perf_counter()
        selection = select_tor_tokens(entropy, sensitivity, response_mask, cfg, index=index, step=step)
        weights, tor_metrics = selection.weights * response_mask, dict(selection.metrics)  # (B, T)
        # over real trajectories: verl's dp-padding rows (response_mask all 0, no image) would inflate it
        real = response_mask.any(dim=1)
        tor_metrics[M.NO_IMAGE_FRAC] = float((~has_image & real).sum() / real.sum()) if bool(real.any()) else 0.0

        lengths = response_mask.sum(dim=1)
        if cfg.apply == "advantage":
            advantages = _padded(data["advantages"]).float()
            out = {"advantages": _to_nested(advantages * weights, lengths, like=data["advantages"])}
        else:
            out = {TOR_WEIGHTS_KEY: _to_nested(weights, lengths, like=data["old_log_probs"])}
        batch = (
            self.store.kv_batch_put(keys=keys, partition_id=partition, fields=TensorDict(out, batch_size=len(keys)))
            or batch
        )
        _add_timing(timing_raw, "tor_select", time.perf_counter() - t0)
        metrics.update(tor_metrics)

        if self.on_weights is not None:
            self.on_weights(
                step=step,
                keys=keys,
                tensors={
                    "entropy": entropy,
                    "sensitivity": sensitivity,
                    "weights": weights,
                    "reasoning": selection.reasoning,
                    "perception": selection.perception,
                    "response_mask": response_mask,
                    "thresholds": {
                        "entropy": tor_metrics.get(M.ENTROPY_THRESHOLD, 0.0),
                        "sensitivity": tor_metrics.get(M.SENSITIVITY_THRESHOLD, 0.0),
                    },
                },
            )
        return batch

    # ------------------------------------------------------------------ the extra forward pass
    def score_image_free(self, batch: Any, width: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Log-probs of the same responses with the image removed: ``log π(o_t | ∅, q, o_<t)``.

        Returns:
            noimg_log_prob: (B, width) float32, 0 on padding (and equal to the with-image log-prob on rows
                without an image, which are scored as they are).
            noimg_entropy: (B, width) or None (only for ``sensitivity=entropy_diff``).
            has_image: (B,) bool.
        """
        keys, partition = list(batch.keys), batch.partition_id
        views = self.build_view
        if views is None:
            raise RuntimeError(f"ToR: tor.mode={self.config.mode!r} needs image-free views, but the stage has none")
        rows = self.store.kv_batch_get(keys=keys, partition_id=partition, select_fields=list(views.fields))
        view_rows, has_image = [], []
        for row in tensordict_to_rows(rows):
            view = views(row)
            has_image.append(view is not None)
            # a row without an image is scored as it is (its S_t is set to 0): complete what was not read
            view_rows.append(view if view is not None else views.complete(row))
        has_image_t = torch.tensor(has_image, dtype=torch.bool)

        view_keys = [k + VIEW_KEY_SUFFIX for k in keys]
        want_entropy = self.config.needs_image_free_entropy
        try:
            self.store.kv_batch_put(
                keys=view_keys,
                partition_id=VIEW_PARTITION,
                fields=rows_to_tensordict(view_rows),
                tags=[dict(tag) for tag in batch.tags],
            )
            meta = self.make_meta(
                keys=view_keys,
                partition_id=VIEW_PARTITION,
                tags=[dict(tag) for tag in batch.tags],
                extra_info={
                    **dict(batch.extra_info or {}),
                    "calculate_entropy": want_entropy,
                    "compute_loss": False,
                    "temperature": self.temperature,
                    **self.extra_meta,
                },
            )
            output = self.score(meta)
            if output is not None and hasattr(output, "__len__") and len(output) != len(view_keys):
                raise RuntimeError(f"ToR: scorer returned {len(output)} rows for {len(view_keys)}")
            select = ["log_probs"] + (["entropy"] if want_entropy else [])
            scored = self.store.kv_batch_get(keys=view_keys, partition_id=VIEW_PARTITION, select_fields=select)
            response_mask = rows["response_mask"]
            log_prob = _response_padded(scored["log_probs"], response_mask, width)
            noimg_entropy = _response_padded(scored["entropy"], response_mask, width) if want_entropy else None
        finally:
            self.store.kv_clear(keys=view_keys, partition_id=VIEW_PARTITION)
        return log_prob, noimg_entropy, has_image_t


# ---------------------------------------------------------------------- tensor plumbing
def _as_list(value: Any) -> list:
    if isinstance(value, NonTensorStack):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return list(value)


def _padded(t: torch.Tensor) -> torch.Tensor:
    """(B, j) nested jagged -> (B, max_j) zero-padded; plain tensors pass through."""
    if t.is_nested:
        return torch.nested.to_padded_tensor(t, 0.0)
    return t


def _to_nested(padded: torch.Tensor, lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, T) padded -> per-row first ``lengths[i]`` values, in the layout of ``like`` (nested or padded)."""
    if not like.is_nested:
        return padded.to(like.dtype)
    rows = [padded[i, : int(n)].to(like.dtype) for i, n in enumerate(lengths.tolist())]
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _response_padded(seq_values: torch.Tensor, response_mask: torch.Tensor, width: int) -> torch.Tensor:
    """Slice the response part of full-sequence model outputs, padded to ``width``.

    Args:
        seq_values: (B, j_seq) nested: one value per sequence position, already shifted by verl so that position
            ``s`` holds the quantity for token ``s+1`` (verl's ``response_from_nested`` convention).
        response_mask: (B, j_resp) nested; the response of each row is the last ``j_resp`` tokens.
    """
    from verl.workers.utils.padding import response_from_nested

    nested = response_from_nested(seq_values, response_mask)
    out = torch.nested.to_padded_tensor(nested, 0.0).float()
    if out.shape[1] < width:
        out = torch.nn.functional.pad(out, (0, width - out.shape[1]))
    return out


def tensordict_to_rows(rows: TensorDict) -> list[dict]:
    """A TransferQueue batch -> one dict per trajectory of plain tensors (nested fields unbound) / python objects."""
    columns: dict[str, list] = {}
    for key in rows.keys():
        value = rows[key]
        if isinstance(value, NonTensorStack):
            columns[key] = value.tolist()
        elif isinstance(value, torch.Tensor):
            columns[key] = list(value.unbind(0))
        else:
            columns[key] = list(value)
    n = rows.batch_size[0]
    return [{key: col[i] for key, col in columns.items()} for i in range(n)]


def rows_to_tensordict(rows: list[dict]) -> TensorDict:
    """Per-trajectory dicts -> a TransferQueue batch in verl's V1 layout (jagged along the sequence).

    Sequence fields are always nested, even when every row has the same length (``torch.stack`` would silently
    change the layout verl's engine expects). Position ids are (4, L) per row: nested from (L, 4) and transposed,
    because a jagged tensor is ragged in its first component dimension (design.md, "nested-tensor trap").
    """
    out: dict[str, Any] = {}
    for key in rows[0].keys():
        values = [r[key] for r in rows]
        if all(isinstance(v, torch.Tensor) for v in values):
            if key == "position_ids" and values[0].dim() == 2:
                out[key] = torch.nested.as_nested_tensor(
                    [v.transpose(0, 1).contiguous() for v in values], layout=torch.jagged
                ).transpose(1, 2)
            else:
                out[key] = torch.nested.as_nested_tensor(values, layout=torch.jagged)
        else:
            out[key] = NonTensorStack(*values)
    return TensorDict(out, batch_size=len(rows))


def _add_timing(timing_raw: dict, name: str, seconds: float) -> None:
    timing_raw[name] = timing_raw.get(name, 0.0) + seconds


class ViewBuilder:
    """``row -> image-free row | None`` for ``config.image_view``, bound to the run's processor.

    ``fields`` is what the stage reads from TransferQueue for it. ``remove`` (the paper's view) finds the image by
    its tokens, drops the pixels and rebuilds ``input_ids`` / ``attention_mask`` / ``position_ids`` from ``prompts``
    + ``responses``, so it reads neither the pixels (a batch of 6144 rollouts of 1024-patch images carries ~28 GB of
    float32 ``pixel_values``) nor the fields it rebuilds; ``blank`` and ``noise`` need the pixels. ``complete(row)``
    gives a row without an image back whole, to be scored as it is.
    """

    def __init__(self, config: ToRConfig, processor: Any):
        from verl_tor.ops import make_generator
        from verl_tor.views import VisionTokenIds

        self.config, self.processor = config, processor
        self.token_ids = VisionTokenIds.from_processor(processor)
        self.generator = make_generator(config.seed, 0, "noise")
        if config.image_view == "remove":
            self.fields = tuple(f for f in VIEW_FIELDS if f not in REBUILT_FIELDS)
            self.out_fields = VIEW_FIELDS
        else:
            self.fields = self.out_fields = (*VIEW_FIELDS, MULTI_MODAL_FIELD)

    def __call__(self, row: dict) -> dict | None:
        from verl_tor.views import build_image_free_view

        cfg = self.config
        view = build_image_free_view(row, cfg.image_view, self.token_ids, self.processor, cfg.noise_std, self.generator)
        if view is None:
            return None
        return {key: view[key] for key in self.out_fields}  # the same fields for every row, in the same order

    def complete(self, row: dict) -> dict:
        if all(key in row for key in self.out_fields):
            return {key: row[key] for key in self.out_fields}
        from verl_tor.views import compute_text_position_ids

        input_ids = torch.cat([row["prompts"], row["responses"]])  # verl: input_ids = prompt + response
        rebuilt = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": compute_text_position_ids(self.processor, input_ids),
        }
        return {key: row[key] if key in row else rebuilt[key] for key in self.out_fields}


def make_view_builder(config: ToRConfig, processor: Any) -> ViewBuilder:
    """The ``ViewBuilder`` of ``config.image_view``, bound to the run's processor."""
    return ViewBuilder(config, processor)
