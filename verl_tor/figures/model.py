"""The figure reader: a tiny Qwen2.5-VL whose tokenizer gives every digit its own token, and the shipped checkpoint.

``build_figure_processor`` / ``build_figure_reader`` make the untrained model (transformers' own classes, sizes
below); ``verl_tor.figures.sft`` trains it; ``FIGURE_READER_CHECKPOINT`` is the trained result shipped inside the
package (``save_pretrained`` format, ~4 MB), loaded by ``load_figure_reader`` through transformers'
``from_pretrained`` and verl's ``hf_processor``, exactly like a hub checkpoint.

Reuses ``verl_tor.tiny``'s Qwen special tokens, chat template and config builder; only the tokenizer (digits split,
trained on the task's texts) and the sizes differ.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

from verl_tor.figures.task import IMAGE_SIZE, TASKS, build_task_target

__all__ = [
    "FIGURE_READER_CHECKPOINT",
    "FIGURE_READER_PLUS_CHECKPOINT",
    "FIGURE_READER_SIZES",
    "build_figure_processor",
    "build_figure_reader_config",
    "build_figure_reader",
    "load_figure_reader",
]

FIGURE_READER_CHECKPOINT = str(Path(__file__).resolve().parents[1] / "assets" / "figure_reader")
"""The trained figure reader shipped with the package (made by ``python -m verl_tor.figures.sft``)."""
FIGURE_READER_PLUS_CHECKPOINT = str(Path(__file__).resolve().parents[1] / "assets" / "figure_reader_plus")
"""The starting reader of the ``area_plus`` task (issue 20's reproduction; its ``training.json`` has the command)."""

FIGURE_READER_SIZES: dict[str, Any] = {
    "text_config": dict(
        hidden_size=128,  # 7B: 3584
        intermediate_size=256,  # 7B: 18944
        num_hidden_layers=3,  # 7B: 28
        num_attention_heads=4,  # 7B: 28 (head_dim 32 here, 128 in 7B)
        num_key_value_heads=2,  # 7B: 4
        # mrope_section must sum to head_dim / 2 (7B: [16, 24, 24] for head_dim 128)
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
    ),
    "vision_config": dict(
        depth=2,  # 7B: 32
        hidden_size=96,  # 7B: 1280
        intermediate_size=192,  # 7B: 3420
        num_heads=2,  # 7B: 16
        out_hidden_size=128,  # = text hidden size
    ),
}
"""Overrides of ``verl_tor.tiny.build_tiny_qwen2_5_vl_config`` (design.md's measured recipe: ~1M parameters)."""


def _corpus(task: str = "area") -> list[str]:
    """The texts the tokenizer is trained on: the chat template's words and every prompt and target of the task."""
    question, text_question, _ = TASKS[task]
    texts = ["You are a helpful assistant.", "system", "user", "assistant", question]
    insides = range(1, 10) if task == "area_plus" else (0,)
    for w in range(1, 10):
        for h in range(1, 10):
            for c in insides:
                texts.append(text_question.format(w=w, h=h, c=c))
                texts.append(build_task_target(task, w, h, c)[0])
    return texts


@functools.cache
def _tokenizer_file(vocab_size: int, task: str = "area") -> str:
    """Train the BPE once per process (deterministic: one thread, fixed corpus); returns ``tokenizer.json``'s path.

    ``Digits(individual_digits=True)`` runs before ``ByteLevel``, so "15" is two tokens "1" "5" and every digit of
    an answer is one token (plain byte-level BPE merges frequent numbers, design.md).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from verl_tor.tiny import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(task), trainer=trainer)
    path = os.path.join(tempfile.mkdtemp(prefix="verl_tor_figure_tok_"), "tokenizer.json")
    tok.save(path)
    return path


def build_figure_processor(save_dir: str | None = None, vocab_size: int = 384, task: str = "area") -> Any:
    """A real ``Qwen2_5_VLProcessor`` for the figure reader of ``task`` (its tokenizer is trained on that task's
    texts), built offline.

    Images are kept at IMAGE_SIZE×IMAGE_SIZE = 84×84 pixels (``min_pixels = max_pixels``): 6×6 patches of 14 px,
    3×3 = 9 image tokens after the 2×2 merge, one per 28-px cell of the figure.
    """
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from verl_tor.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=_tokenizer_file(vocab_size, task),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    pixels = dict(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=CHAT_TEMPLATE,
    )
    if save_dir is not None:
        processor.save_pretrained(save_dir)
    return processor


def build_figure_reader_config(processor: Any) -> Any:
    """``Qwen2_5_VLConfig`` of the figure reader: ``verl_tor.tiny``'s builder with ``FIGURE_READER_SIZES``."""
    import copy

    from verl_tor.tiny import build_tiny_qwen2_5_vl_config

    return build_tiny_qwen2_5_vl_config(processor, **copy.deepcopy(FIGURE_READER_SIZES))


def build_figure_reader(processor: Any, seed: int = 0) -> Any:
    """The untrained figure reader: Hugging Face's own initialisation, seeded, float32, train mode."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_figure_reader_config(processor)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model


def load_figure_reader(path: str = FIGURE_READER_CHECKPOINT, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, processor)`` of a figure-reader checkpoint, through ``from_pretrained`` and verl's ``hf_processor``.

    The model is float32 in eval mode; the processor has verl's ``get_rope_index`` bound, as in a verl run.
    """
    import torch
    from transformers import AutoModelForImageTextToText
    from verl.utils import hf_processor

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"no figure-reader checkpoint at {path!r} (config.json missing). Fix: train one with "
            "`python -m verl_tor.figures.sft --out-dir <dir>` and pass that directory, or reinstall verl_tor (the "
            "shipped one lives in verl_tor/assets/figure_reader)."
        )
    processor = hf_processor(path)
    if processor is None or not hasattr(processor, "get_rope_index"):
        raise RuntimeError(f"verl's hf_processor could not load a Qwen2.5-VL processor from {path!r}")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, processor
