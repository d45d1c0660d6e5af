"""A tiny, real Qwen2.5-VL built offline: processor (BPE tokenizer + image/video processors + chat template) and a
randomly initialised model, for CPU tests, ``verl-tor demo`` and the benchmarks.

Nothing here is a mock: the classes are transformers' own, saved with ``save_pretrained`` they load back through
``AutoProcessor`` / verl's ``hf_processor`` / ``from_pretrained`` like a hub checkpoint. Only the sizes are small
(the real Qwen2.5-VL-7B sizes are in the comments) and the tokenizer is trained on a few built-in sentences.
"""

from __future__ import annotations

import functools
import math
import os
import random
import tempfile
from typing import Any

__all__ = [
    "SPECIAL_TOKENS",
    "build_tiny_processor",
    "build_tiny_qwen2_5_vl_config",
    "build_tiny_qwen2_5_vl",
    "save_tiny_checkpoint",
    "render_geometry_image",
    "make_geometry_problem",
]

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
"""Qwen2.5-VL's added tokens, in Qwen's order (ids follow the BPE vocabulary here, not Qwen's 151643+)."""

# Qwen2-VL's chat template, reduced to what verl's multimodal prompts use (system default, image/video items).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "In triangle ABC, angle A is 60 degrees and AB = 5. Find the length of BC.",
    "The circle has radius 3 and center O. What is the area of the shaded region?",
    "Find x. The rectangle is 4 by 7; its diagonal is x. Round to the nearest tenth.",
    "<think> The angle sum of a triangle is 180, so the missing angle is 180 - 60 - 70 = 50. </think>",
    "The answer is \\boxed{50}. The answer is \\boxed{12.5}. Choices: A. 3 B. 4 C. 5 D. 6",
    "Let me look at the figure: the side labelled 8 is opposite the right angle, so it is the hypotenuse.",
    "Use the Pythagorean theorem: a^2 + b^2 = c^2, so 3^2 + 4^2 = 25 and c = 5.",
    "perimeter area radius diameter square parallelogram trapezoid sine cosine tangent",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 15 20 25 30 45 60 90 120 180 360 pi sqrt",
    "You are a helpful assistant. Please reason step by step, and put your final answer within \\boxed{}.",
]


@functools.cache
def _tokenizer_files(vocab_size: int) -> str:
    """Train the byte-level BPE once per process; returns a directory holding ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    out = tempfile.mkdtemp(prefix="verl_tor_tiny_tok_")
    tok.save(os.path.join(out, "tokenizer.json"))
    return out


def build_tiny_processor(save_dir: str | None = None, vocab_size: int = 512, max_pixels: int = 112 * 112) -> Any:
    """A real ``Qwen2_5_VLProcessor`` built offline.

    Images are resized to at most 112×112 pixels (``max_pixels``): a 112×112 image is 8×8 patches of 14 px,
    i.e. 16 image tokens after the 2×2 merge (Qwen2.5-VL-7B: max_pixels 12,845,056).
    """
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(_tokenizer_files(vocab_size), "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    pixels = dict(min_pixels=28 * 28, max_pixels=max_pixels)
    image_processor = Qwen2VLImageProcessor(**pixels)
    video_processor = Qwen2VLVideoProcessor(**pixels)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    if save_dir is not None:
        processor.save_pretrained(save_dir)
    return processor


def build_tiny_qwen2_5_vl_config(processor: Any | None = None, **overrides: Any) -> Any:
    """``Qwen2_5_VLConfig`` with tiny sizes and token ids matching ``processor``'s tokenizer."""
    from transformers import Qwen2_5_VLConfig

    processor = processor or build_tiny_processor()
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tok),  # 7B: 152064
        hidden_size=64,  # 7B: 3584
        intermediate_size=128,  # 7B: 18944
        num_hidden_layers=2,  # 7B: 28
        num_attention_heads=4,  # 7B: 28
        num_key_value_heads=2,  # 7B: 4
        max_position_embeddings=4096,  # 7B: 128000
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},  # 7B: [16, 24, 24]
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2,  # 7B: 32
        hidden_size=32,  # 7B: 1280
        intermediate_size=64,  # 7B: 3420
        num_heads=2,  # 7B: 16
        out_hidden_size=64,  # = text hidden size (7B: 3584)
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,  # 7B: 112
        fullatt_block_indexes=[1],  # 7B: [7, 15, 23, 31]
    )
    text.update(overrides.pop("text_config", {}))
    vision.update(overrides.pop("vision_config", {}))
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **overrides,
    )


def build_tiny_qwen2_5_vl(seed: int = 0, processor: Any | None = None, **overrides: Any) -> Any:
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` (float32, eval mode), seeded."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_tiny_qwen2_5_vl_config(processor, **overrides)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    # HF's init (std 0.02) gives near-uniform next-token distributions (entropy ≈ log V for every token); a wider
    # output head gives the peaked, varied entropies of a trained model (here ≈ 0.04-2.9 nats, mean ≈ 1.7), so
    # entropy ranking and the demo's token maps have structure to show.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.6, generator=torch.Generator().manual_seed(seed))
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


def save_tiny_checkpoint(path: str, seed: int = 0, max_pixels: int = 112 * 112, **overrides: Any) -> str:
    """Write processor + model to ``path`` (``save_pretrained``), loadable like a hub checkpoint.

    Load the processor back with ``verl.utils.hf_processor(path)``: verl binds ``get_rope_index`` to it, without
    which verl's rows fall back to 1-D text position ids.
    """
    processor = build_tiny_processor(save_dir=path, max_pixels=max_pixels)
    model = build_tiny_qwen2_5_vl(seed=seed, processor=processor, **overrides)
    model.save_pretrained(path)
    return path


def render_geometry_image(seed: int = 0, size: int = 112) -> tuple[Any, dict]:
    """A small synthetic geometry figure with PIL: a right triangle or a rectangle with labelled sides.

    Returns the image and its spec (shape and side lengths), from which the question's answer follows.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    m = size // 8
    if rng.random() < 0.5:
        a, b = rng.choice([(3, 4), (6, 8), (5, 12), (8, 15)])
        pts = [(m, size - m), (size - m, size - m), (m, m + size // 6)]
        draw.polygon(pts, outline="black", width=2)
        draw.rectangle([m, size - m - 8, m + 8, size - m], outline="black")
        draw.text((size // 2 - 4, size - m + 1), str(b), fill="blue")
        draw.text((2, size // 2), str(a), fill="blue")
        spec = {"shape": "right triangle", "legs": (a, b), "answer": math.hypot(a, b)}
    else:
        w, h = rng.randint(2, 9), rng.randint(2, 9)
        draw.rectangle([m, m + 10, size - m, size - m - 10], outline="black", width=2)
        draw.text((size // 2 - 4, size - m - 8), str(w), fill="red")
        draw.text((m + 3, size // 2 - 4), str(h), fill="red")
        spec = {"shape": "rectangle", "sides": (w, h), "answer": float(w * h)}
    return img, spec


def make_geometry_problem(seed: int = 0) -> dict:
    """One problem: ``image`` (PIL), ``question`` (text that needs the picture), ``answer`` (float)."""
    img, spec = render_geometry_image(seed)
    if spec["shape"] == "right triangle":
        question = "The figure shows a right triangle with its legs labelled. Find the hypotenuse."
    else:
        question = "The figure shows a rectangle with its sides labelled. Find its area."
    return {"image": img, "question": question, "answer": spec["answer"], "spec": spec}
