"""Image-free views against prompts built from scratch through the processor's chat template."""

from __future__ import annotations

import pytest
import torch

from verl_tor.tools.in_process import build_verl_row, compute_sequence_log_probs
from verl_tor.views import ViewError, VisionTokenIds, build_image_free_view, compute_text_position_ids, has_image

QUESTION = "The figure shows a rectangle with its sides labelled. Find its area."


def prompt_ids(processor, n_images: int, images=None):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    enc = processor(text=[text], images=images or None, return_tensors="pt")
    return enc["input_ids"][0]


@pytest.fixture(scope="module")
def rows(tiny_processor, geometry_images):
    response = torch.tensor(tiny_processor.tokenizer.encode(" The area is \\boxed{12}."))
    with_image = build_verl_row(
        tiny_processor, prompt_ids(tiny_processor, 1, geometry_images[:1]), response, geometry_images[:1]
    )
    two_images = build_verl_row(
        tiny_processor, prompt_ids(tiny_processor, 2, geometry_images[:2]), response, geometry_images[:2]
    )
    text_only = build_verl_row(tiny_processor, prompt_ids(tiny_processor, 0), response, None)
    return {"image": with_image, "two": two_images, "text": text_only, "response": response}


@pytest.fixture(scope="module")
def ids(tiny_processor):
    return VisionTokenIds.from_processor(tiny_processor)


def test_remove_equals_prompt_built_without_the_image(tiny_processor, tiny_model, rows, ids):
    view = build_image_free_view(rows["image"], "remove", ids, tiny_processor)
    scratch = build_verl_row(tiny_processor, prompt_ids(tiny_processor, 0), rows["response"], None)
    assert torch.equal(view["input_ids"], scratch["input_ids"])
    assert torch.equal(view["prompts"], scratch["prompts"])
    assert torch.equal(view["responses"], rows["image"]["responses"])
    # position ids: transformers' get_rope_index on the from-scratch prompt (text row = arange)
    n_ids = len(scratch["input_ids"])
    rope, _ = tiny_processor.get_rope_index(
        input_ids=scratch["input_ids"][None],
        attention_mask=torch.ones(1, n_ids),
        mm_token_type_ids=torch.zeros(1, n_ids, dtype=torch.long),
    )
    assert torch.equal(view["position_ids"][1:], rope[:, 0])
    assert torch.equal(view["position_ids"][0], torch.arange(len(scratch["input_ids"])))
    assert view["multi_modal_inputs"] == {}
    # the model's response-token log-probs on the view equal those on the from-scratch prompt
    lp_view, _ = compute_sequence_log_probs(tiny_model, view)
    lp_scratch, _ = compute_sequence_log_probs(tiny_model, scratch)
    n = len(rows["response"])
    torch.testing.assert_close(lp_view[-n - 1 : -1], lp_scratch[-n - 1 : -1])
    lp_image, _ = compute_sequence_log_probs(tiny_model, rows["image"])
    assert (lp_image[-n - 1 : -1] - lp_view[-n - 1 : -1]).abs().max() > 1e-4  # the image matters to the model


def test_remove_two_images(tiny_processor, rows, ids):
    view = build_image_free_view(rows["two"], "remove", ids, tiny_processor)
    assert not torch.isin(view["input_ids"], torch.tensor(ids.all)).any()
    assert torch.equal(view["input_ids"], rows["text"]["input_ids"])


def test_blank_is_the_processor_output_on_black_images(tiny_processor, rows, ids):
    from PIL import Image

    view = build_image_free_view(rows["two"], "blank", ids, tiny_processor)
    mm, old = view["multi_modal_inputs"], rows["two"]["multi_modal_inputs"]
    assert torch.equal(view["input_ids"], rows["two"]["input_ids"])
    assert torch.equal(view["position_ids"], rows["two"]["position_ids"])
    assert mm["pixel_values"].shape == old["pixel_values"].shape
    assert torch.equal(mm["image_grid_thw"], old["image_grid_thw"])
    # every image's patches (pixel_values holds the images one after the other, t*h*w patches each) are those of a
    # black image of its size, and differ from the image's own
    assert len(old["image_grid_thw"]) == 2
    start = 0
    for t, h, w in old["image_grid_thw"].tolist():
        end = start + t * h * w
        black = tiny_processor.image_processor(images=[Image.new("RGB", (w * 14, h * 14))], return_tensors="pt")
        torch.testing.assert_close(mm["pixel_values"][start:end], black["pixel_values"])
        assert not torch.equal(mm["pixel_values"][start:end], old["pixel_values"][start:end])
        start = end
    assert start == len(mm["pixel_values"])


def test_noise_keeps_tokens_and_is_seeded(tiny_processor, rows, ids):
    make = lambda seed: build_image_free_view(  # noqa: E731
        rows["image"], "noise", ids, tiny_processor, noise_std=0.5, generator=torch.Generator().manual_seed(seed)
    )
    a, b, c = make(0), make(0), make(1)
    old = rows["image"]["multi_modal_inputs"]["pixel_values"]
    delta = a["multi_modal_inputs"]["pixel_values"] - old
    assert torch.equal(a["input_ids"], rows["image"]["input_ids"])
    assert abs(float(delta.std()) - 0.5) < 0.05
    assert torch.equal(a["multi_modal_inputs"]["pixel_values"], b["multi_modal_inputs"]["pixel_values"])
    assert not torch.equal(a["multi_modal_inputs"]["pixel_values"], c["multi_modal_inputs"]["pixel_values"])


def test_text_only_row_has_no_view(tiny_processor, rows, ids):
    assert build_image_free_view(rows["text"], "remove", ids, tiny_processor) is None


def test_vision_token_in_response_is_refused(tiny_processor, rows, ids):
    bad = dict(rows["image"])
    bad["responses"] = torch.cat([rows["response"], torch.tensor([ids.image_pad])])
    with pytest.raises(ViewError, match="response contains vision tokens"):  # the stage falls back for this row
        build_image_free_view(bad, "remove", ids, tiny_processor)
    text_only = dict(rows["text"], responses=bad["responses"])
    assert build_image_free_view(text_only, "remove", ids, tiny_processor) is None  # no image: nothing to align


def test_video_blank_is_refused_remove_is_handled(tiny_processor, rows, ids):
    video = dict(rows["text"])
    vid_prompt = torch.cat(
        [
            rows["text"]["prompts"][:3],
            torch.tensor([ids.vision_start, ids.video_pad, ids.video_pad, ids.vision_end]),
            rows["text"]["prompts"][3:],
        ]
    )
    video["prompts"] = vid_prompt
    video["input_ids"] = torch.cat([vid_prompt, video["responses"]])
    video["multi_modal_inputs"] = {
        "pixel_values_videos": torch.zeros(8, 1176),
        "video_grid_thw": torch.tensor([[2, 2, 2]]),
    }
    with pytest.raises(ViewError, match="does not support video.*tor.image_view=remove"):
        build_image_free_view(video, "blank", ids, tiny_processor)
    assert has_image(video, ids) and has_image(rows["image"], ids) and not has_image(rows["text"], ids)
    view = build_image_free_view(video, "remove", ids, tiny_processor)
    assert torch.equal(view["input_ids"], rows["text"]["input_ids"])


def test_text_position_ids_are_arange_rows(tiny_processor):
    ids = torch.arange(7) + 20
    pos = compute_text_position_ids(tiny_processor, ids)
    assert torch.equal(pos, torch.arange(7).repeat(4, 1))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_text_position_ids_skip_get_rope_index_and_equal_verls(family, tmp_path):
    """The driver builds text-only position ids without verl's per-row get_rope_index (85 % of its view building,
    bench_driver.py); they equal what verl's code gives, for every family. Ids holding a vision token still go
    through verl's code."""
    from verl.utils import hf_processor

    from verl_tor.tiny import save_tiny_checkpoint
    from verl_tor.views import compute_text_position_ids_by_verl

    processor = hf_processor(save_tiny_checkpoint(str(tmp_path), family=family))
    g = torch.Generator().manual_seed(0)
    for length in (1, 2, 37, 300):
        ids = torch.randint(20, 200, (length,), generator=g)
        fast = compute_text_position_ids(processor, ids)
        assert fast.dtype == torch.long and torch.equal(fast, compute_text_position_ids_by_verl(processor, ids))
    calls = []
    real = processor.get_rope_index
    processor.get_rope_index = lambda *a, **k: calls.append(1) or real(*a, **k)
    compute_text_position_ids(processor, torch.arange(50) + 20)
    assert calls == []  # no get_rope_index for a text-only row
    marker = VisionTokenIds.from_processor(processor).vision_start
    with_marker = torch.cat([torch.arange(5) + 20, torch.tensor([marker]), torch.arange(5) + 20])
    assert torch.equal(
        compute_text_position_ids(processor, with_marker), compute_text_position_ids_by_verl(processor, with_marker)
    )
    assert calls  # that one went through get_rope_index
