"""Image-free views of one trajectory: the ∅ in the paper's S_t = |log π(o_t | I, q, o_<t) − log π(o_t | ∅, q, o_<t)|.

A trajectory is one TransferQueue row of verl 0.9.1's V1 trainer, as ``AgentLoopWorkerTQ._agent_loop_postprocess``
stores it (see ``verl_tor.tools.in_process.build_verl_row``): ``prompts`` (Lp,), ``responses`` (Lr,), ``input_ids`` =
prompts + responses (L,), ``position_ids`` (4, L) = [text; t; h; w] and ``multi_modal_inputs`` (``pixel_values``
(patches, patch_dim), ``image_grid_thw`` (images, 3), ...). There is no ``attention_mask``: rows are unpadded, every
token is valid. Views never touch the response, so response log-probs of a view align with
the with-image ones by response length.

- ``remove`` (paper): delete the vision tokens from the prompt, drop the pixels, recompute the position ids with
  verl's own code (the text-only M-RoPE of the shorter prompt);
- ``blank``: same tokens and positions, the pixels of a black image of the same size (through the processor);
- ``noise``: same tokens and positions, Gaussian noise added to the normalised pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from verl_tor import SUPPORTED_MODELS

__all__ = [
    "ViewError",
    "VisionTokenIds",
    "build_image_free_view",
    "compute_text_position_ids",
    "compute_text_position_ids_by_verl",
    "has_image",
]

VIEWS = ("remove", "blank", "noise")


class ViewError(ValueError):
    """The image-free view of one trajectory cannot be built (a response with vision tokens, a video under
    ``blank``/``noise``). The stage gives such a row S_t = 0 and counts it (``tor/view_fallback_frac``)."""


@dataclass(frozen=True)
class VisionTokenIds:
    """Token ids of the vision markers Qwen2-VL, Qwen2.5-VL and Qwen3-VL share."""

    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int

    @classmethod
    def from_processor(cls, processor: Any) -> VisionTokenIds:
        tok = processor.tokenizer
        names = {
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
            "image_pad": "<|image_pad|>",
            "video_pad": "<|video_pad|>",
        }
        ids = {}
        for field_name, token in names.items():
            token_id = tok.convert_tokens_to_ids(token)
            if token_id is None or token_id == tok.unk_token_id:
                raise ValueError(
                    f"the processor's tokenizer has no {token} token: ToR's image-free view supports "
                    f"{SUPPORTED_MODELS} processors. Fix: use such a model, or set tor.mode=reasoning_only."
                )
            ids[field_name] = int(token_id)
        return cls(**ids)

    @property
    def all(self) -> tuple[int, ...]:
        return (self.vision_start, self.vision_end, self.image_pad, self.video_pad)


def compute_text_position_ids(processor: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """(L,) token ids of a prompt without vision tokens -> (4, L) position ids: ``arange(L)`` in every row.

    That is what verl's agent-loop code gives a text-only row (``compute_text_position_ids_by_verl``: its text row,
    and ``get_rope_index``'s t/h/w rows for every supported family; ``tests/test_views_on_cpu.py`` checks the two
    agree), computed without the per-row ``get_rope_index`` call, which was ~85 % of the driver's view building
    (``benchmarks/bench_driver.py``: 4.2 s a step at 6,144 rollouts). Ids holding a vision token go through verl's
    code instead (their positions follow the image grid).
    """
    if torch.isin(input_ids, torch.tensor(VisionTokenIds.from_processor(processor).all, dtype=input_ids.dtype)).any():
        return compute_text_position_ids_by_verl(processor, input_ids)
    return torch.arange(input_ids.shape[0], dtype=torch.long).expand(4, -1).clone()


def compute_text_position_ids_by_verl(processor: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """(L,) token ids -> (4, L) position ids, by verl's agent-loop code.

    Reuses ``AgentLoopWorker._compute_position_ids`` (verl 0.9.1), which calls the processor-bound
    ``get_rope_index`` (transformers') and prepends the text row, exactly as for the with-image rows.
    """
    import types

    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    worker = types.SimpleNamespace(processor=processor)
    attention_mask = torch.ones_like(input_ids)
    # transformers >= 5.3 needs mm_token_type_ids for get_rope_index; verl rebuilds it from the ids when the
    # processor returned one, as Qwen's processor does for a text-only prompt.
    mm = {"mm_token_type_ids": torch.zeros_like(input_ids)[None]}
    position_ids = AgentLoopWorker._compute_position_ids(worker, input_ids[None], attention_mask[None], mm)
    return position_ids.squeeze(0)  # (4, L)


def _black_pixel_values(processor: Any, image_grid_thw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pixel values of black images with the same grids, through the processor's own normalisation."""
    from PIL import Image

    image_processor = processor.image_processor
    patch = int(image_processor.patch_size)
    parts = []
    for t, h, w in image_grid_thw.tolist():
        if t != 1:
            raise ValueError(f"image_grid_thw has t={t}: a still image has t=1")
        black = Image.new("RGB", (w * patch, h * patch), (0, 0, 0))
        out = image_processor(images=[black], return_tensors="pt")
        if out["image_grid_thw"].tolist() != [[t, h, w]]:
            raise ValueError(
                f"a black {w * patch}x{h * patch} image gives grid {out['image_grid_thw'].tolist()}, not "
                f"{[[t, h, w]]}: the processor's min/max_pixels changed since the rollout"
            )
        parts.append(out["pixel_values"])
    return torch.cat(parts).to(like.dtype)


def has_image(row: dict, token_ids: VisionTokenIds) -> bool:
    """Whether a trajectory's prompt holds an image or a video (its vision pad tokens or its pixels)."""
    mm = row.get("multi_modal_inputs") or {}
    if "pixel_values" in mm or "pixel_values_videos" in mm:
        return True
    pads = torch.tensor([token_ids.image_pad, token_ids.video_pad], dtype=row["prompts"].dtype)
    return bool(torch.isin(row["prompts"], pads).any())


def build_image_free_view(
    row: dict,
    view: str,
    token_ids: VisionTokenIds,
    processor: Any,
    noise_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict | None:
    """The image-free version of one trajectory, or ``None`` when its prompt has no image (nothing to remove).

    Args:
        row: one trajectory (see the module docstring); not modified.
        view: ``remove`` | ``blank`` | ``noise``.
        token_ids: the processor's vision-marker ids.
        processor: the run's processor (with verl's ``get_rope_index`` bound, as ``verl.utils.hf_processor`` gives).
        noise_std: std of the noise for ``noise`` (normalised pixel units).
        generator: seeded generator for ``noise``.
    Returns:
        a new row dict with the same keys; ``responses`` and ``response_mask`` are the same tensors.

    Raises:
        ViewError: this row's view cannot be built (its response holds vision tokens; a video under ``blank`` or
            ``noise``); the stage falls back to S_t = 0 for it.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown image view {view!r}; choose one of {VIEWS}")
    prompts, responses = row["prompts"], row["responses"]
    mm = dict(row.get("multi_modal_inputs") or {})
    has_video = "pixel_values_videos" in mm or bool((prompts == token_ids.video_pad).any())
    if not (has_video or has_image(row, token_ids)):
        return None
    vision = torch.tensor(token_ids.all, dtype=prompts.dtype)
    if torch.isin(responses, vision).any():
        raise ViewError(
            "a response contains vision tokens (<|vision_start|>/<|image_pad|>/...): its log-probs cannot be "
            "aligned with an image-free prompt. Fix: stop generation at vision tokens (multi-turn image agents are "
            "not supported by ToR yet)."
        )
    out = dict(row)
    if view == "remove":
        new_prompts = prompts[~torch.isin(prompts, vision)]
        input_ids = torch.cat([new_prompts, responses])
        out.update(
            prompts=new_prompts,
            input_ids=input_ids,
            position_ids=compute_text_position_ids(processor, input_ids),
            multi_modal_inputs={},
        )
        if "attention_mask" in row:  # not in verl's rows; a caller's own mask must not keep the longer length
            out["attention_mask"] = torch.ones_like(input_ids)
        return out
    if has_video:
        raise ViewError(
            f"tor.image_view={view!r} does not support video inputs (pixel_values_videos). "
            "Fix: set tor.image_view=remove."
        )
    pixel_values = mm["pixel_values"]
    if view == "blank":
        mm["pixel_values"] = _black_pixel_values(processor, mm["image_grid_thw"], pixel_values)
    else:
        noise = torch.randn(pixel_values.shape, generator=generator, dtype=torch.float32)
        mm["pixel_values"] = (pixel_values.float() + noise_std * noise).to(pixel_values.dtype)
    out["multi_modal_inputs"] = mm
    return out
