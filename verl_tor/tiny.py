"""Tiny, real Qwen-VL models built offline: processor (BPE tokenizer + image/video processors + chat template) and a
randomly initialised model, for CPU tests, ``verl-tor demo`` and the benchmarks.

Three families, the ones ToR supports (``FAMILIES``): Qwen2-VL, Qwen2.5-VL (the default everywhere) and Qwen3-VL
(dense). Nothing here is a mock: the classes are transformers' own, saved with ``save_pretrained`` they load back
through ``AutoProcessor`` / verl's ``hf_processor`` / ``from_pretrained`` like a hub checkpoint. Only the sizes are
small (the real 7B/8B sizes are in the comments) and the tokenizer is trained on a few built-in sentences.
"""

from __future__ import annotations

import functools
import math
import os
import random
import tempfile
from typing import Any

from verl_tor import SUPPORTED_MODEL_TYPES

__all__ = [
    "FAMILIES",
    "DEFAULT_FAMILY",
    "SPECIAL_TOKENS",
    "build_tiny_processor",
    "build_tiny_config",
    "build_tiny_model",
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
"""The added tokens Qwen2-VL, Qwen2.5-VL and Qwen3-VL share, in Qwen's order (ids follow the BPE vocabulary here,
not Qwen's 151643+). Qwen3-VL adds more (``<think>``, tool-call markers); ToR reads only the vision markers."""

FAMILIES = SUPPORTED_MODEL_TYPES
"""The model families ToR supports (transformers' ``model_type`` names), in release order."""

DEFAULT_FAMILY = "qwen2_5_vl"
"""The paper's family, and what every builder makes unless told otherwise."""

_MESSAGES = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
)
_GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

# Qwen2-VL's (and Qwen2.5-VL's) chat template, reduced to what verl's multimodal prompts use: a default system
# message when the conversation has none, image/video items.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + _MESSAGES + "{% endfor %}" + _GENERATION_PROMPT
)

# Qwen3-VL's chat template, reduced the same way. Unlike Qwen2/2.5-VL it adds no default system message: a prompt
# without one starts at the user turn (the vision markers are the same).
QWEN3_VL_CHAT_TEMPLATE = "{% for message in messages %}" + _MESSAGES + "{% endfor %}" + _GENERATION_PROMPT

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


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(
            f"family={family!r} is not a supported model family. Fix: choose one of {', '.join(FAMILIES)}."
        )
    return family


def _patch_size(family: str) -> int:
    """Vision patch size in pixels: 14 for Qwen2-VL / Qwen2.5-VL, 16 for Qwen3-VL (merged 2×2 into one token)."""
    return 16 if family == "qwen3_vl" else 14


def build_tiny_processor(
    save_dir: str | None = None, vocab_size: int = 512, max_pixels: int | None = None, family: str = DEFAULT_FAMILY
) -> Any:
    """A real ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` built offline.

    Images are resized to at most ``max_pixels`` (default: 8×8 patches, i.e. 16 image tokens after the 2×2 merge:
    112×112 pixels with Qwen2/2.5-VL's 14-px patches, 128×128 with Qwen3-VL's 16-px ones). The real models:
    Qwen2.5-VL-7B max_pixels 12,845,056; Qwen3-VL-8B 16,777,216 (``size.longest_edge``).
    """
    import transformers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor

    _check_family(family)
    patch = _patch_size(family)
    if max_pixels is None:
        max_pixels = (8 * patch) ** 2
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(_tokenizer_files(vocab_size), "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    template = QWEN3_VL_CHAT_TEMPLATE if family == "qwen3_vl" else CHAT_TEMPLATE
    tokenizer.chat_template = template
    pixels = dict(min_pixels=(2 * patch) ** 2, max_pixels=max_pixels)
    if family == "qwen3_vl":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        # Qwen3-VL's preprocessor config: 16-px patches, merge 2, mean = std = 0.5 (Qwen2/2.5-VL: CLIP's)
        norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, **norm, **pixels)
        video_processor = Qwen3VLVideoProcessor(patch_size=patch, merge_size=2, **norm, **pixels)
        processor_cls = transformers.Qwen3VLProcessor
    else:
        from transformers import Qwen2VLVideoProcessor

        image_processor = Qwen2VLImageProcessor(**pixels)
        video_processor = Qwen2VLVideoProcessor(**pixels)
        processor_cls = transformers.Qwen2_5_VLProcessor if family == "qwen2_5_vl" else transformers.Qwen2VLProcessor
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=template,
    )
    if save_dir is not None:
        processor.save_pretrained(save_dir)
    return processor


def build_tiny_config(family: str = DEFAULT_FAMILY, processor: Any | None = None, **overrides: Any) -> Any:
    """The family's transformers config with tiny sizes and token ids matching ``processor``'s tokenizer.

    ``overrides`` may hold ``text_config`` / ``vision_config`` dicts (merged into the tiny ones) and top-level
    config fields.
    """
    import transformers

    _check_family(family)
    processor = processor or build_tiny_processor(family=family)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tok),  # 7B/8B: 152064 / 151936
        hidden_size=64,  # Qwen2.5-VL-7B: 3584, Qwen3-VL-8B: 4096
        intermediate_size=128,  # 18944 / 12288
        num_hidden_layers=2,  # 28 / 36
        num_attention_heads=4,  # 28 / 32
        num_key_value_heads=2,  # 4 / 8
        max_position_embeddings=4096,  # 128000 / 262144
        # mrope_section sums to head_dim / 2 (here 16 / 2); 7B: [16, 24, 24]
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    patch = _patch_size(family)
    if family == "qwen2_5_vl":
        config_cls = transformers.Qwen2_5_VLConfig
        vision = dict(
            depth=2,  # 7B: 32
            hidden_size=32,  # 7B: 1280
            intermediate_size=64,  # 7B: 3420
            num_heads=2,  # 7B: 16
            out_hidden_size=64,  # = text hidden size (7B: 3584)
            patch_size=patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,  # 7B: 112
            fullatt_block_indexes=[1],  # 7B: [7, 15, 23, 31]
        )
    elif family == "qwen2_vl":
        config_cls = transformers.Qwen2VLConfig
        vision = dict(
            depth=2,  # 7B: 32
            embed_dim=32,  # 7B: 1280 (Qwen2-VL's ViT width)
            hidden_size=64,  # = text hidden size (7B: 3584; the merger's output)
            mlp_ratio=2,  # 7B: 4
            num_heads=2,  # 7B: 16
            patch_size=patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
    else:
        config_cls = transformers.Qwen3VLConfig
        # Qwen3-VL: explicit head_dim, interleaved M-RoPE (8B: theta 5e6, mrope_section [24, 20, 20] of head_dim 128)
        text.update(
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=2,  # 8B: 27
            hidden_size=32,  # 8B: 1152
            intermediate_size=64,  # 8B: 4304
            num_heads=2,  # 8B: 16
            out_hidden_size=64,  # = text hidden size (8B: 4096)
            patch_size=patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,  # 8B: 2304 (a 48×48 grid of learned positions, interpolated)
            deepstack_visual_indexes=[0],  # 8B: [8, 16, 24]
        )
    text.update(overrides.pop("text_config", {}))
    vision.update(overrides.pop("vision_config", {}))
    return config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **overrides,
    )


def build_tiny_model(
    family: str = DEFAULT_FAMILY, seed: int = 0, processor: Any | None = None, **overrides: Any
) -> Any:
    """A randomly initialised ``*ForConditionalGeneration`` of ``family`` (float32, eval mode), seeded."""
    import torch
    from transformers import AutoModelForImageTextToText

    config = build_tiny_config(family, processor, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
    # HF's init (std 0.02) gives near-uniform next-token distributions (entropy ≈ log V for every token); a wider
    # output head gives the peaked, varied entropies of a trained model (here ≈ 0.04-2.9 nats, mean ≈ 1.7), so
    # entropy ranking and the demo's token maps have structure to show.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.6, generator=torch.Generator().manual_seed(seed))
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


def build_tiny_qwen2_5_vl_config(processor: Any | None = None, **overrides: Any) -> Any:
    """``Qwen2_5_VLConfig`` with tiny sizes and token ids matching ``processor``'s tokenizer."""
    return build_tiny_config("qwen2_5_vl", processor, **overrides)


def build_tiny_qwen2_5_vl(seed: int = 0, processor: Any | None = None, **overrides: Any) -> Any:
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` (float32, eval mode), seeded."""
    return build_tiny_model("qwen2_5_vl", seed=seed, processor=processor, **overrides)


def save_tiny_checkpoint(
    path: str, seed: int = 0, max_pixels: int | None = None, family: str = DEFAULT_FAMILY, **overrides: Any
) -> str:
    """Write processor + model of ``family`` to ``path`` (``save_pretrained``), loadable like a hub checkpoint.

    Load the processor back with ``verl.utils.hf_processor(path)``: verl binds ``get_rope_index`` to it, without
    which verl's rows fall back to 1-D text position ids.
    """
    processor = build_tiny_processor(save_dir=path, max_pixels=max_pixels, family=family)
    model = build_tiny_model(family, seed=seed, processor=processor, **overrides)
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
