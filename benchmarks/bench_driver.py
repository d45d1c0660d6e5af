"""What the ToR stage costs on verl's driver per step, at the paper's batch shape (512 prompts x 12 rollouts).

The image-free pass runs on the GPU workers, but its rows are built on the driver: read each trajectory's fields
from TransferQueue, build the view (``verl_tor.views``: drop the vision tokens, recompute the M-RoPE position ids
with verl's own ``get_rope_index`` code), write the views back. This script measures that per row on realistic
rows (a 448x448 geometry image = 256 image tokens after the 2x2 merge, a 451-token prompt, 2048-token responses,
through the real Qwen2.5-VL processor) and scales it to the batch, and it counts the bytes the driver reads
(``image_view=remove`` reads prompts, responses and masks only: it finds images by their tokens and rebuilds the
ids and position ids) next to what reading the rebuilt fields and ``multi_modal_inputs`` would add.

    python benchmarks/bench_driver.py [--rows 64] [--response-length 2048] [--image-size 448] [--batch 6144]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time


def nbytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="rows measured")
    parser.add_argument("--response-length", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=6144, help="rows per step to scale to (512 prompts x 12)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from verl.utils import hf_processor

    from verl_tor.config import ToRConfig
    from verl_tor.stage import MULTI_MODAL_FIELD, VIEW_FIELDS, make_view_builder, rows_to_tensordict, tensordict_to_rows
    from verl_tor.tiny import render_geometry_image, save_tiny_checkpoint
    from verl_tor.tools.in_process import build_verl_row

    print(f"# bench_driver: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"# cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}")

    side = args.image_size
    processor = hf_processor(save_tiny_checkpoint(tempfile.mkdtemp(), seed=0, max_pixels=side * side))
    image = render_geometry_image(0)[0].resize((side, side))
    question = "The figure shows a right triangle with its legs labelled. Find the hypotenuse. " * 6
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    prompt = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.rows):
        response = torch.randint(20, 200, (args.response_length,), generator=g)
        rows.append(build_verl_row(processor, prompt, response, [image]))
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    print(
        f"# row: prompt {len(prompt)} tokens ({int((prompt == image_pad).sum())} image tokens), response "
        f"{args.response_length}, pixel_values {tuple(rows[0]['multi_modal_inputs']['pixel_values'].shape)} "
        f"{rows[0]['multi_modal_inputs']['pixel_values'].dtype}"
    )

    build_view = make_view_builder(ToRConfig(enable=True), processor)
    fetched = rows_to_tensordict([{k: r[k] for k in build_view.fields} for r in rows])  # what the stage reads
    times = {"read rows": [], "build views": [], "write views": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        as_rows = tensordict_to_rows(fetched)
        t1 = time.perf_counter()
        views = [build_view(r) for r in as_rows]
        t2 = time.perf_counter()
        rows_to_tensordict(views)
        t3 = time.perf_counter()
        for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[name].append(seconds / len(rows))

    per_row_fields = statistics.mean(sum(nbytes(r[k]) for k in build_view.fields) for r in rows)
    per_row_all = statistics.mean(sum(nbytes(r[k]) for k in VIEW_FIELDS) for r in rows)
    per_row_pixels = statistics.mean(nbytes(r[MULTI_MODAL_FIELD]) for r in rows)
    per_row_view = statistics.mean(sum(nbytes(v[k]) for k in VIEW_FIELDS) for v in views)
    print()
    print(f"| driver work (image_view=remove) | ms per row (median) | s per step of {args.batch} rows |")
    print("| --- | --- | --- |")
    total = 0.0
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        total += ms
        print(f"| {name} | {ms:.3f} | {ms * args.batch / 1e3:.2f} |")
    print(f"| total | {total:.3f} | {total * args.batch / 1e3:.2f} |")
    print()
    print("| driver traffic per step | MB per row | GB per step |")
    print("| --- | --- | --- |")
    for name, per_row in (
        ("read: prompts, responses, masks (what the stage reads)", per_row_fields),
        ("read: + input_ids, position_ids (rebuilt instead)", per_row_all - per_row_fields),
        ("read: + multi_modal_inputs (skipped by remove)", per_row_pixels),
        ("write: image-free rows", per_row_view),
    ):
        print(f"| {name} | {per_row / 2**20:.2f} | {per_row * args.batch / 2**30:.2f} |")


if __name__ == "__main__":
    main()
