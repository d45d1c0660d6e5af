"""The ToR stage: image-free views -> one extra log-prob pass -> S_t -> top-ρ selection -> token weights -> metrics.

Runs on the driver, once per training step, after verl's advantage computation (see ``verl_tor.integration.trainer``).
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
from verl_tor.views import ViewError

logger = logging.getLogger("verl_tor")

VIEW_PARTITION = "tor_noimg"
"""TransferQueue partition of the image-free rows; cleared at the end of every stage call."""

VIEW_KEY_SUFFIX = "@tor_noimg"

TOP_P_FLAG = "tor_entropy_top_p"
"""Non-tensor ``extra_info`` flag of a log-prob call: the engine hook (``verl_tor.integration.engine``) then returns the
entropy of the top-p truncated distribution (``tor.entropy=top_p``) instead of the full one. The ToR trainer sets it
for the old-policy pass only (the update pass keeps verl's full entropy); the stage sets it on its image-free pass
when that pass's entropy is compared with the old pass's (``tor.sensitivity=entropy_diff``), so S_t = |H_img −
H_noimg| compares two entropies of the same kind."""

# What verl's compute_log_prob reads of a trajectory: the engine forward (input_ids, position_ids, multimodal
# inputs), the response slicing (prompts, responses, response_mask) and FSDPEngine.forward_backward_batch, which
# sums loss_mask for its token count even when forward-only. Everything else of the row (rewards, advantages,
# old log-probs...) is not needed to score the image-free view. No attention_mask: verl 0.9.1's agent loop
# (AgentLoopWorkerTQ._agent_loop_postprocess) stores none in TransferQueue (rows are unpadded, every token valid),
# and TransferQueue silently leaves out a field the rows lack, so asking for it returns nothing.
VIEW_FIELDS = ("prompts", "responses", "response_mask", "loss_mask", "input_ids", "position_ids")
MULTI_MODAL_FIELD = "multi_modal_inputs"
REBUILT_FIELDS = ("input_ids", "position_ids")
"""What ``image_view=remove`` rebuilds from ``prompts`` + ``responses`` (verl's own position-id code), so it never reads
them from TransferQueue."""


IDENTITY_FIELDS = ("prompts", "responses", "index")
"""What identifies a trajectory across runs (verl's uids are random): its dataset row (``index``, which verl's
``RLHFDataset`` adds to every sample; optional), prompt and response token ids. Ties in the ranking are broken by
keys of this identity, so a resumed or re-run step selects the same tokens whatever order its rows arrive in."""


def compute_row_identities(rows: TensorDict, n: int) -> torch.Tensor:
    """``(B,)`` int64: a 63-bit blake2b of each trajectory's ``index`` (when present), prompt and response ids."""
    import hashlib

    columns = {
        name: list(rows[name].unbind(0)) if name != "index" and torch.is_tensor(rows[name]) else _as_list(rows[name])
        for name in IDENTITY_FIELDS
        if name in rows.keys()
    }
    if "prompts" not in columns or "responses" not in columns:
        raise RuntimeError("ToR: TransferQueue has no prompts/responses for this batch (verl's agent loop writes them)")
    keys = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=8)
        if "index" in columns:
            h.update(repr(columns["index"][i]).encode())
        for name in ("prompts", "responses"):
            ids = columns[name][i]
            h.update(b"|" + (ids.numpy().astype("<i8").tobytes() if torch.is_tensor(ids) else repr(ids).encode()))
        keys.append(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
    return torch.tensor(keys, dtype=torch.int64)


class Views(Protocol):
    """Image-free views of trajectories (``ViewBuilder``): what to read, which rows have an image, the view, and a
    placeholder for rows that are not scored."""

    fields: tuple[str, ...]
    """The fields to read from TransferQueue for the views."""

    def has_image(self, row: dict) -> bool:
        """Whether the row's prompt holds an image (cheap: no view is built)."""
        ...

    def __call__(self, row: dict, step: int = 0, identity: int = 0) -> dict | None:
        """The image-free version of one trajectory (``None`` when it has no image); ``step`` and ``identity`` (the
        row's ``compute_row_identities`` key, not its place in the batch, which follows the order generations
        finish) seed its randomness. Raises ``verl_tor.views.ViewError`` when it cannot be built."""
        ...

    def placeholder(self, row: dict) -> dict:
        """A minimal row (1 prompt token, 1 masked response token) standing in for a row that is not scored."""
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
        the loss wrapper. Both keep verl's own per-row length (that of the stored ``response_mask``): verl's padding
        rows (one masked response token) and multi-turn rows (masked tool-observation tokens inside the response)
        have fewer valid tokens than stored ones. Metrics (``tor/*``) go into ``metrics``, timings into
        ``timing_raw`` (verl turns ``timing_raw[name]`` into ``timing_s/name``).
        """
        cfg = self.config
        keys, partition = list(batch.keys), batch.partition_id
        reads_advantages = cfg.apply == "advantage" or cfg.rank_tokens == "informative"
        want = ["uid", "response_mask", "entropy", "old_log_probs"] + (["advantages"] if reads_advantages else [])
        data = self.store.kv_batch_get(keys=keys, partition_id=partition, select_fields=want)
        for name in want:
            if name not in data.keys():
                raise RuntimeError(
                    f"ToR: TransferQueue has no {name!r} for this batch; the stage runs after verl's old-policy pass "
                    "and advantage computation, which write it."
                )
        response_mask = _padded(data["response_mask"]).to(torch.bool)  # (B, T)
        lengths = _stored_lengths(data["response_mask"])  # (B,) verl's per-row response length
        old_log_prob = _padded(data["old_log_probs"]).float()  # (B, T)
        entropy = _padded(data["entropy"]).float()  # (B, T) nats
        advantages = _padded(data["advantages"]).float() if reads_advantages else None  # (B, T)
        index = np.array(_as_list(data["uid"]), dtype=object)
        if len(index) != len(keys):
            raise RuntimeError(f"ToR: got {len(index)} uids for {len(keys)} trajectories")

        # The ranked tokens: every valid one (paper), or those that can change the gradient (rank_tokens=informative)
        ranked = response_mask & (advantages != 0) if cfg.rank_tokens == "informative" else response_mask
        real = response_mask.any(dim=1)  # verl's dp-padding rows have no valid token: left out of the row fractions

        # Who each row is (not where it sits: rows reach TransferQueue in the order their generations finish): keys
        # the tie-breaks and the noise of image_view=noise.
        identity = self.store.kv_batch_get(keys=keys, partition_id=partition, select_fields=list(IDENTITY_FIELDS))
        row_keys = compute_row_identities(identity, len(keys))

        sensitivity, sensitivity_mask = None, None
        scored = torch.zeros(len(keys), dtype=torch.bool)
        if cfg.needs_image_free_pass:
            t0 = time.perf_counter()
            free = self.score_image_free(
                batch, response_mask.shape[1], step=step, wanted=ranked.any(dim=1), row_keys=row_keys
            )
            scored = free.scored
            sensitivity = compute_visual_sensitivity(
                old_log_prob,
                free.log_prob,
                method=cfg.sensitivity,
                entropy=entropy,
                noimg_entropy=free.entropy,
                response_mask=response_mask,
            )
            # Rows not scored (no image, a view that could not be built, nothing to learn) have no S_t: 0, and they
            # take no part in the ranking of T_p (the paper's S_t is undefined without an image).
            sensitivity = sensitivity * scored.unsqueeze(1).to(sensitivity.dtype)
            sensitivity_mask = ranked & scored.unsqueeze(1)
            _add_timing(timing_raw, "tor_noimg", time.perf_counter() - t0)

        t0 = time.perf_counter()
        selection = select_tor_tokens(
            entropy,
            sensitivity,
            ranked,
            cfg,
            index=index,
            step=step,
            sensitivity_mask=sensitivity_mask,
            row_keys=row_keys,
        )
        weights, tor_metrics = selection.weights * ranked, dict(selection.metrics)  # (B, T)

        def row_frac(rows: torch.Tensor) -> float:
            return float((rows & real).sum() / real.sum()) if bool(real.any()) else 0.0

        tor_metrics[M.NOIMG_SCORED_FRAC] = row_frac(scored)
        if cfg.needs_image_free_pass:
            tor_metrics[M.NO_IMAGE_FRAC] = row_frac(~free.has_image)
            tor_metrics[M.VIEW_FALLBACK_FRAC] = row_frac(free.fallback)
        if cfg.rank_tokens == "informative":
            n_valid = int(response_mask.sum())
            tor_metrics[M.INFORMATIVE_FRAC] = int(ranked.sum()) / n_valid if n_valid else 0.0

        if cfg.apply == "advantage":
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
    def score_image_free(
        self,
        batch: Any,
        width: int,
        step: int = 0,
        wanted: torch.Tensor | None = None,
        row_keys: torch.Tensor | None = None,
    ) -> ImageFreeScores:
        """Log-probs of the same responses with the image removed: ``log π(o_t | ∅, q, o_<t)``.

        Only rows with an image (and ``wanted``, default all) are scored; every other row is sent as a placeholder
        of two tokens, so the call keeps verl's row count (divisible by the data-parallel size, which verl's padding
        ensured) and no worker gets an empty share. A row whose view cannot be built (``ViewError``: vision tokens in
        its response, a video under ``blank``/``noise``) falls back to not scored, with one warning per step; if
        that is every row that would be scored, the step fails with that row's error.

        Args:
            batch: the ``KVBatchMeta`` of the step.
            width: T, the padded response width of the stage's tensors.
            step: the training step (seeds ``image_view=noise``, like the tie-breaks).
            wanted: ``(B,)`` bool, the rows worth scoring (``rank_tokens=informative``: rows with a non-zero
                advantage).
            row_keys: ``(B,)`` int64 ``compute_row_identities`` of the rows (default: computed here); seeds each row's
                ``image_view=noise`` draw, so a row gets the same noise wherever it sits in the batch.
        """
        keys, partition = list(batch.keys), batch.partition_id
        views = self.build_view
        if views is None:
            raise RuntimeError(f"ToR: tor.mode={self.config.mode!r} needs image-free views, but the stage has none")
        rows = self.store.kv_batch_get(keys=keys, partition_id=partition, select_fields=list(views.fields))
        n = len(keys)
        if row_keys is None:
            identity = self.store.kv_batch_get(keys=keys, partition_id=partition, select_fields=list(IDENTITY_FIELDS))
            row_keys = compute_row_identities(identity, n)
        wanted = torch.ones(n, dtype=torch.bool) if wanted is None else wanted.to(torch.bool).cpu()
        has_image, scored, fallback = (torch.zeros(n, dtype=torch.bool) for _ in range(3))
        view_rows, failures = [], []
        for i, row in enumerate(tensordict_to_rows(rows)):
            has_image[i] = views.has_image(row)
            view = None
            if has_image[i] and wanted[i]:
                try:
                    view = views(row, step, int(row_keys[i]))  # positional: test doubles name it differently
                except ViewError as exc:
                    failures.append((keys[i], exc))
                    fallback[i] = True
            scored[i] = view is not None
            view_rows.append(view if view is not None else views.placeholder(row))
        if failures:
            key, exc = failures[0]
            if not bool(scored.any()):
                raise ViewError(f"ToR: no response of this batch has an image-free view; row {key!r}: {exc}") from exc
            logger.warning(
                "ToR step %d: %d of %d responses with an image have no image-free view and get S_t = 0 "
                "(counted in %s); first, row %r: %s",
                step,
                len(failures),
                int((has_image & wanted).sum()),
                M.VIEW_FALLBACK_FRAC,
                key,
                exc,
            )
        log_prob = torch.zeros(n, width)
        noimg_entropy = torch.zeros(n, width) if self.config.needs_image_free_entropy else None
        if not bool(scored.any()):  # nothing to score (text-only or non-informative batch): skip the call
            return ImageFreeScores(log_prob, noimg_entropy, scored, has_image, fallback)

        view_keys = [k + VIEW_KEY_SUFFIX for k in keys]
        want_entropy = noimg_entropy is not None
        view_td = rows_to_tensordict(view_rows)
        extra_info = {
            **dict(batch.extra_info or {}),
            "calculate_entropy": want_entropy,
            "compute_loss": False,
            "temperature": self.temperature,
            **self.extra_meta,
        }
        # H_noimg the same kind as the old pass's H_img (stored in `entropy`): top-p under tor.entropy=top_p, else full
        extra_info.pop(TOP_P_FLAG, None)
        if want_entropy and self.config.entropy == "top_p":
            extra_info[TOP_P_FLAG] = float(self.config.entropy_top_p)
        try:
            self.store.kv_batch_put(
                keys=view_keys,
                partition_id=VIEW_PARTITION,
                fields=view_td,
                tags=[dict(tag) for tag in batch.tags],
            )
            meta = self.make_meta(
                keys=view_keys,
                partition_id=VIEW_PARTITION,
                tags=[dict(tag) for tag in batch.tags],
                extra_info=extra_info,
            )
            output = self.score(meta)
            if output is not None and hasattr(output, "__len__") and len(output) != len(view_keys):
                raise RuntimeError(f"ToR: scorer returned {len(output)} rows for {len(view_keys)}")
            select = ["log_probs"] + (["entropy"] if want_entropy else [])
            got = self.store.kv_batch_get(keys=view_keys, partition_id=VIEW_PARTITION, select_fields=select)
            # slice by the view rows' own response masks (a placeholder's response is 1 token)
            view_mask = view_td["response_mask"]
            log_prob = _response_padded(got["log_probs"], view_mask, width) * scored.unsqueeze(1)
            if want_entropy:
                noimg_entropy = _response_padded(got["entropy"], view_mask, width) * scored.unsqueeze(1)
        finally:
            self.store.kv_clear(keys=view_keys, partition_id=VIEW_PARTITION)
        return ImageFreeScores(log_prob, noimg_entropy, scored, has_image, fallback)


@dataclass(frozen=True)
class ImageFreeScores:
    """What the image-free pass gives the stage; every tensor is on the CPU."""

    log_prob: torch.Tensor
    """(B, T) float32 ``log π(o_t | ∅, q, o_<t)`` on scored rows, 0 elsewhere and on padding."""
    entropy: torch.Tensor | None
    """(B, T) the image-free entropy (only for ``sensitivity=entropy_diff``), 0 on rows not scored."""
    scored: torch.Tensor
    """(B,) bool, the rows whose image-free view was scored."""
    has_image: torch.Tensor
    """(B,) bool, the rows whose prompt holds an image."""
    fallback: torch.Tensor
    """(B,) bool, rows with an image whose view could not be built (``ViewError``)."""


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


def _stored_lengths(t: torch.Tensor) -> torch.Tensor:
    """(B,) the stored per-row length of a response field: its jagged length, or the padded width for all rows."""
    if t.is_nested:
        return t.offsets().diff()
    return torch.full((t.shape[0],), t.shape[1], dtype=torch.long)


def _to_nested(padded: torch.Tensor, lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, T) padded -> per-row first ``lengths[i]`` values, in the layout of ``like`` (nested or padded).

    ``lengths`` must be verl's stored per-row lengths (``_stored_lengths`` of ``response_mask``), not the valid-token
    counts: verl pads and reads every per-token field at that length (``response_to_nested``)."""
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
    """The ``Views`` of ``config.image_view``, bound to the run's processor.

    ``fields`` is what the stage reads from TransferQueue for it. ``remove`` (the paper's view) finds the image by
    its tokens, drops the pixels and rebuilds ``input_ids`` / ``position_ids`` from ``prompts``
    + ``responses``, so it reads neither the pixels (a batch of 6144 rollouts of 1024-patch images carries ~28 GB of
    float32 ``pixel_values``) nor the fields it rebuilds; ``blank`` and ``noise`` need the pixels and read the row's own
    ``input_ids`` / ``position_ids``. ``noise`` draws each row's noise from a generator seeded by (``tor.seed``, step,
    the row's identity ``compute_row_identities``), not its position in the batch: rows reach TransferQueue in the
    order their generations finish, so a re-run or resumed step draws the same noise for the same trajectory.
    ``placeholder(row)`` stands in for a row that is not scored.
    """

    def __init__(self, config: ToRConfig, processor: Any):
        from verl_tor.views import VisionTokenIds

        self.config, self.processor = config, processor
        self.token_ids = VisionTokenIds.from_processor(processor)
        if config.image_view == "remove":
            self.fields = tuple(f for f in VIEW_FIELDS if f not in REBUILT_FIELDS)
            self.out_fields = VIEW_FIELDS
        else:
            self.fields = self.out_fields = (*VIEW_FIELDS, MULTI_MODAL_FIELD)
        self._placeholder: dict | None = None

    def has_image(self, row: dict) -> bool:
        from verl_tor.views import has_image

        return has_image(row, self.token_ids)

    def __call__(self, row: dict, step: int = 0, identity: int = 0) -> dict | None:
        from verl_tor.ops import make_generator
        from verl_tor.views import build_image_free_view

        cfg = self.config
        generator = make_generator(cfg.seed, step, f"noise/{int(identity)}") if cfg.image_view == "noise" else None
        view = build_image_free_view(row, cfg.image_view, self.token_ids, self.processor, cfg.noise_std, generator)
        if view is None:
            return None
        return {key: view[key] for key in self.out_fields}  # the same fields for every row, in the same order

    def placeholder(self, row: dict) -> dict:
        """Two tokens (an end-of-text prompt and response), response masked as in verl's own padding rows: the
        engine runs it at no cost and the stage ignores its output. Built once per builder."""
        if self._placeholder is None:
            from verl_tor.views import compute_text_position_ids

            tok = self.processor.tokenizer
            token = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
            one = torch.tensor([int(token)], dtype=row["prompts"].dtype)
            input_ids = torch.cat([one, one])
            full = {
                "prompts": one,
                "responses": one.clone(),
                "response_mask": torch.zeros(1, dtype=row["response_mask"].dtype),
                "loss_mask": torch.zeros(1, dtype=row["response_mask"].dtype),
                "input_ids": input_ids,
                "position_ids": compute_text_position_ids(self.processor, input_ids),
                MULTI_MODAL_FIELD: {},
            }
            self._placeholder = {key: full[key] for key in self.out_fields}
        return self._placeholder


def make_view_builder(config: ToRConfig, processor: Any) -> ViewBuilder:
    """The ``ViewBuilder`` of ``config.image_view``, bound to the run's processor."""
    return ViewBuilder(config, processor)
