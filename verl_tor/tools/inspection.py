"""``verl-tor inspect``: ToR's token maps for a local Qwen2-VL/2.5-VL checkpoint on verl-format data.

Reads a verl RL parquet (``prompt`` = chat messages whose text may contain ``<image>`` placeholders, ``images`` =
list of ``{"bytes": ...}`` or ``{"path": ...}`` or PIL-openable paths, as ``verl/utils/dataset/rl_dataset.py``
expects), generates ``--n`` responses per prompt (or reads them from ``--responses``, a JSONL file with ``index``
and ``response`` per line), runs the old-policy pass and the ToR stage exactly as in training, and writes
``token_map.html`` and ``summary.json``. Runs on CPU for small models and on the GPU when there is one.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import torch

from verl_tor.config import ToRConfig

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class InspectError(ValueError):
    """Bad input to ``verl-tor inspect``; the message names the file/row and the fix."""


_FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


def check_checkpoint(path: str, model_types: tuple[str, ...] = SUPPORTED_MODEL_TYPES) -> str:
    """The ``model_type`` of the Hugging Face checkpoint at ``path``; ``InspectError`` (one line, with the fix) when
    there is no ``config.json`` or the family is not one of ``model_types`` (evaluation passes every family verl_tor
    trains)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise InspectError(
            f"--model {path!r}: no config.json there. Fix: pass a Hugging Face checkpoint directory (a merged verl "
            "checkpoint: python -m verl.model_merger merge ...; or a base Qwen2.5-VL)."
        )
    with open(config_path, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in model_types:
        families = "/".join(_FAMILY_NAMES.get(t, t) for t in model_types)
        raise InspectError(
            f"--model {path!r} is a {model_type!r} checkpoint, not {families} ({', '.join(model_types)}). "
            f"Fix: use a {families} model."
        )
    return model_type


def _open_image(value: Any, where: str):
    from PIL import Image

    try:
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            value = value.get("path") or value.get("image")
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str):
            return Image.open(value).convert("RGB")
        if hasattr(value, "convert"):
            return value.convert("RGB")
    except Exception as exc:  # PIL raises several types
        raise InspectError(
            f"{where}: the image cannot be opened ({exc}). Fix: store PNG/JPEG bytes or a path."
        ) from exc
    raise InspectError(f"{where}: unsupported image value of type {type(value).__name__}. Fix: use {{'bytes': ...}}.")


_MAKE_PARQUET = "python -m verl_tor.local.prepare, recipes/data/geo3k.py or verl's examples/data_preprocess write one"


def _read_parquet(data_path: str, pd: Any):
    """``--data`` as a DataFrame; a missing path, a directory or a file pyarrow cannot read is one InspectError line.

    verl's ``data.train_files`` takes parquet files (a directory is not expanded), so a directory is refused with
    the files it holds rather than read as a pyarrow dataset."""
    if os.path.isdir(data_path):
        found = sorted(f for f in os.listdir(data_path) if f.endswith(".parquet"))
        holds = f"it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}" if found else "no .parquet in it"
        example = os.path.join(data_path, found[0]) if found else "<file>.parquet"
        raise InspectError(
            f"--data {data_path!r} is a directory, not a parquet file ({holds}). Fix: pass one parquet file, "
            f"e.g. --data {example}"
        )
    if not os.path.exists(data_path):
        raise InspectError(
            f"--data {data_path!r} does not exist. Fix: pass a verl-format parquet file ({_MAKE_PARQUET})."
        )
    try:
        return pd.read_parquet(data_path)
    except Exception as exc:  # pyarrow's ArrowInvalid / ArrowException, OSError: not one base class
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InspectError(
            f"--data {data_path!r} is not a parquet file pyarrow can read ({type(exc).__name__}: {reason}). "
            f"Fix: pass a verl-format parquet ({_MAKE_PARQUET})."
        ) from None


def _check_placeholders(prompt: Any, n_images: int, where: str) -> None:
    """Each image needs one ``<image>`` in the prompt, where it goes (verl's ``RLHFDataset._build_messages`` fills
    the placeholders with the row's images in order; list contents count their ``{"type": "image"}`` parts). A
    mismatch otherwise fails after the model is loaded: ``IndexError`` with too many placeholders, transformers'
    "Image features and image tokens do not match" with too few."""
    placeholders = 0
    for message in list(prompt):
        content = message["content"]
        if isinstance(content, str):
            placeholders += content.count("<image>")
        else:
            placeholders += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image")
    if placeholders != n_images:
        plural = "" if placeholders == 1 else "s"
        raise InspectError(
            f"{where}: the prompt has {placeholders} <image> placeholder{plural} and {n_images} "
            f"image{'' if n_images == 1 else 's'}. Fix: put exactly one '<image>' in the prompt text for each entry "
            "of 'images', where that image belongs (verl fills them in order)."
        )


def load_items(data_path: str, limit: int) -> list[dict]:
    """The first ``limit`` rows of a verl RL parquet as ``{"messages": [...], "images": [PIL...]}`` items."""
    import pandas as pd

    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InspectError(f"--limit {limit!r}: give an integer >= 1 (rows of --data to use)")

    frame = _read_parquet(data_path, pd)
    for column in ("prompt", "images"):
        if column not in frame.columns:
            raise InspectError(
                f"--data {data_path!r} has no {column!r} column (columns: {list(frame.columns)}). ToR needs prompts "
                "with images. Fix: preprocess with recipes/data/geo3k.py or verl's examples/data_preprocess."
            )
    if frame.empty:
        raise InspectError(f"--data {data_path!r} has no rows. Fix: pass a parquet with at least one prompt.")
    items = []
    for i, record in enumerate(frame.head(limit).to_dict("records")):
        raw_images = record["images"]
        raw_images = list(raw_images) if raw_images is not None else []
        if not raw_images:
            raise InspectError(f"--data {data_path!r} row {i} has no images: ToR's perception score needs one.")
        _check_placeholders(record["prompt"], len(raw_images), f"--data {data_path!r} row {i}")
        images = [_open_image(img, f"--data {data_path!r} row {i} image {k}") for k, img in enumerate(raw_images)]
        messages = []
        for message in list(record["prompt"]):
            content = message["content"]
            if isinstance(content, str):
                parts = []
                for k, chunk in enumerate(content.split("<image>")):
                    if k:
                        parts.append({"type": "image"})
                    if chunk:
                        parts.append({"type": "text", "text": chunk})
                content = parts
            messages.append({"role": message["role"], "content": content})
        question = " ".join(p.get("text", "") for m in messages for p in m["content"] if p.get("type") == "text")
        truth, truth_absent = _ground_truth(record, "reward_model" in frame.columns)
        items.append(
            {
                "messages": messages,
                "images": images,
                "question": question,
                "ground_truth": truth,
                "ground_truth_absent": truth_absent,
            }
        )
    return items


def _ground_truth(record: dict, has_column: bool) -> tuple[Any, str]:
    """A row's ``reward_model["ground_truth"]`` (verl's field for rule rewards) and, when there is none, why."""
    if not has_column:
        return None, "--data has no reward_model column"
    reward_model = record.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        return reward_model["ground_truth"], ""
    return None, "this row's reward_model has no ground_truth"


def read_responses(path: str, processor, n_items: int) -> list[list[torch.Tensor]]:
    """``--responses``: one JSON object per line, ``{"index": <row of --data>, "response": "<text>"}``.

    Every problem names the file, its line (1-based, counting blank lines) and the fix: text that is not JSON, a
    missing key, an index that is not an integer row of ``--data``, an empty response, a response holding vision
    tokens (its log-probs could not be aligned with the image-free prompt), a row left without a response.
    """
    from verl_tor.views import VisionTokenIds

    vision = set(VisionTokenIds.from_processor(processor).all)
    out: list[list[torch.Tensor]] = [[] for _ in range(n_items)]
    shape = '{"index": 0, "response": "..."}'
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            where = f"--responses {path!r} line {line_no}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InspectError(
                    f"{where}: not JSON ({exc.msg}, column {exc.colno}). Fix: one object per line, e.g. {shape}"
                ) from None
            if not isinstance(record, dict):
                raise InspectError(f"{where}: expected a JSON object, got {type(record).__name__}. Fix: {shape}")
            for key in ("index", "response"):
                if key not in record:
                    raise InspectError(f"{where}: missing key {key!r}. Fix: give both keys, e.g. {shape}")
            index, response = record["index"], record["response"]
            if isinstance(index, bool) or not isinstance(index, int):
                raise InspectError(
                    f"{where}: index {index!r} is not an integer. Fix: give the row of --data as an integer"
                )
            if not 0 <= index < n_items:
                raise InspectError(
                    f"{where}: index {index} is outside the {n_items} rows used (--limit). Fix: an index in "
                    f"[0, {n_items - 1}], or a larger --limit"
                )
            if not isinstance(response, str) or not response.strip():
                raise InspectError(f"{where}: the response is empty or not a string. Fix: give the response's text")
            ids = processor.tokenizer.encode(response, add_special_tokens=False)
            bad = sorted({processor.tokenizer.convert_ids_to_tokens(i) for i in ids if i in vision})
            if bad:
                raise InspectError(
                    f"{where}: the response contains vision tokens {bad}; its log-probs cannot be aligned with the "
                    "image-free prompt. Fix: remove them from the response text"
                )
            out[index].append(torch.tensor(ids))
    missing = [i for i, r in enumerate(out) if not r]
    if missing:
        raise InspectError(f"--responses {path!r} has no response for rows {missing[:5]}. Fix: give every row one.")
    return out


def run_inspect(
    model_path: str,
    data_path: str,
    out_dir: str,
    cfg: ToRConfig,
    n: int = 4,
    limit: int = 4,
    responses_path: str | None = None,
    max_new_tokens: int = 256,
    progress: bool = True,
) -> dict:
    from transformers import AutoModelForImageTextToText
    from verl.utils import hf_processor

    from verl_tor.tools.demo import build_batch, run_tor, sample_responses, write_token_map

    for flag, value in (("--n", n), ("--max-new-tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InspectError(f"{flag} {value!r}: give an integer >= 1")
    check_checkpoint(model_path)
    items = load_items(data_path, limit)
    processor = hf_processor(model_path)
    if processor is None:
        raise InspectError(f"--model {model_path!r}: verl could not load its processor. Fix: save it alongside.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device).eval()
    if responses_path:
        responses = read_responses(responses_path, processor, len(items))
    else:
        responses = sample_responses(model, processor, items, n, max_new_tokens, cfg.seed, progress)
    rows, keys = build_batch(processor, items, responses)
    _, metrics, tensors, timing, _ = run_tor(model, processor, rows, keys, cfg, progress)
    os.makedirs(out_dir, exist_ok=True)
    items_per_row = [item for item, rs in zip(items, responses) for _ in rs]
    html = write_token_map(
        os.path.join(out_dir, "token_map.html"),
        processor,
        rows,
        items_per_row,
        tensors,
        metrics,
        f"verl-tor inspect: {os.path.basename(os.path.abspath(model_path))}",
        limit=len(rows),
        keys=keys,
        cfg=cfg,
        reward_absent="verl-tor inspect runs no reward function",
    )
    valid = tensors["response_mask"].bool()
    summary = {
        "model": model_path,
        "data": data_path,
        "rollouts": len(rows),
        "tokens": int(valid.sum()),
        "metrics": metrics,
        "seconds": timing,
        "entropy_quantiles": _quantiles(tensors["entropy"][valid]),
        "sensitivity_quantiles": _quantiles(tensors["sensitivity"][valid])
        if tensors["sensitivity"] is not None
        else {},
        "token_map": html,
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    if values.numel() == 0:
        return {}
    qs = torch.tensor([0.1, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    got = torch.quantile(values.double(), qs)  # small here: one inspect batch, far below 2^24 tokens
    return {f"p{int(q * 100)}": float(v) for q, v in zip(qs, got)}
