"""`verl-tor inspect` on a tiny checkpoint saved with save_pretrained and a tiny verl-format parquet."""

from __future__ import annotations

import io
import json
import re

import pandas as pd
import pytest

from verl_tor.tools.cli import main
from verl_tor.tools.inspection import InspectError, check_checkpoint, load_items


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parquet(tmp_path_factory, geometry_images):
    path = tmp_path_factory.mktemp("data") / "geo.parquet"
    rows = [
        {
            "data_source": "synthetic/geometry",
            "prompt": [{"role": "user", "content": f"<image>Find the area of figure {i}."}],
            "images": [{"bytes": png_bytes(img)}],
            "reward_model": {"ground_truth": "12", "style": "rule"},
        }
        for i, img in enumerate(geometry_images[:2])
    ]
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def test_inspect_generates_and_writes_maps(tiny_checkpoint, parquet, tmp_path):
    out = tmp_path / "out"
    rc = main(
        [
            "inspect",
            "--model",
            tiny_checkpoint,
            "--data",
            parquet,
            "--n",
            "2",
            "--max-new-tokens",
            "6",
            "--out-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollouts"] == 4 and summary["tokens"] > 0
    assert summary["metrics"]["tor/perception_frac"] > 0
    html = (out / "token_map.html").read_text()
    assert html.count("class='tok ") >= summary["tokens"]
    # cards by prompt and rollout, with the row's ground truth; inspect runs no reward, and says so
    titles = re.findall(r"<h2>([^<]*)</h2>", html)
    assert titles == [f"prompt {p} · rollout {r}/2" for p in (1, 2) for r in (1, 2)]
    assert html.count("<b>ground truth</b> 12</span>") == 4
    assert html.count("<b>reward</b> absent (verl-tor inspect runs no reward function)") == 4


def test_inspect_reads_responses(tiny_checkpoint, parquet, tmp_path):
    responses = tmp_path / "r.jsonl"
    responses.write_text('{"index": 0, "response": "The area is 12."}\n{"index": 1, "response": "It is 5."}\n')
    rc = main(
        [
            "inspect",
            "--model",
            tiny_checkpoint,
            "--data",
            parquet,
            "--responses",
            str(responses),
            "--out-dir",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["rollouts"] == 2


def test_clear_errors(tmp_path, parquet, geometry_images):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InspectError, match="'llama' checkpoint, not Qwen2-VL/Qwen2.5-VL"):
        check_checkpoint(str(tmp_path / "llama"))
    with pytest.raises(InspectError, match="no config.json"):
        check_checkpoint(str(tmp_path))
    no_images = tmp_path / "noimg.parquet"
    pd.DataFrame([{"prompt": [{"role": "user", "content": "hi"}], "images": []}]).to_parquet(no_images)
    with pytest.raises(InspectError, match="row 0 has no images"):
        load_items(str(no_images), 2)
    broken = tmp_path / "broken.parquet"
    pd.DataFrame(
        [{"prompt": [{"role": "user", "content": "<image>hi"}], "images": [{"bytes": b"not a png"}]}]
    ).to_parquet(broken)
    with pytest.raises(InspectError, match="row 0 image 0: the image cannot be opened"):
        load_items(str(broken), 2)
    text_only = tmp_path / "text.parquet"
    pd.DataFrame([{"prompt": [{"role": "user", "content": "hi"}]}]).to_parquet(text_only)
    with pytest.raises(InspectError, match="no 'images' column"):
        load_items(str(text_only), 2)


@pytest.mark.parametrize("command", ["demo", "inspect"])
def test_scorer_policy_ref_is_refused_where_there_is_no_reference_model(command, tmp_path, capsys):
    # the walk-through holds one model (plain `verl-tor demo` runs verl's trainer, with a reference policy: accepted)
    args = (
        ["--model", "unused", "--data", "unused"]
        if command == "inspect"
        else ["--one-step", "--out-dir", str(tmp_path)]
    )
    assert main([command, *args, "tor.scorer_policy=ref"]) == 2
    err = capsys.readouterr().err
    assert "tor.scorer_policy='ref'" in err and f"verl-tor {command}" in err and "Fix:" in err
    assert not list(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"index": 0, "response": "a"}', "", '{"index": 1, "response": "b"'], "line 3: not JSON"),
        (['{"index": 0, "response": "a"}', '["index", 1]'], "line 2: expected a JSON object"),
        (['{"index": 0}'], "line 1: missing key 'response'"),
        (['{"response": "a"}'], "line 1: missing key 'index'"),
        (['{"index": 0.5, "response": "a"}'], "line 1: index 0.5 is not an integer"),
        (['{"index": true, "response": "a"}'], "line 1: index True is not an integer"),
        (['{"index": 2, "response": "a"}'], "line 1: index 2 is outside the 2 rows"),
        (['{"index": 0, "response": ""}'], "line 1: the response is empty"),
        (['{"index": 0, "response": "   "}'], "line 1: the response is empty"),
        (['{"index": 0, "response": "see <|image_pad|> here"}'], "line 1: the response contains vision tokens"),
        (['{"index": 0, "response": "a"}'], "no response for rows [1]"),
    ],
)
def test_responses_file_problems_name_the_line_and_the_fix(tiny_processor, tmp_path, lines, message):
    from verl_tor.tools.inspection import read_responses

    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InspectError, match="Fix:") as err:
        read_responses(str(path), tiny_processor, 2)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_valid_responses_file_is_read_whole(tiny_processor, tmp_path):
    from verl_tor.tools.inspection import read_responses

    path = tmp_path / "r.jsonl"
    path.write_text('{"index": 1, "response": "It is 5."}\n\n{"index": 0, "response": "x = 12"}\n', encoding="utf-8")
    got = read_responses(str(path), tiny_processor, 2)
    decode = tiny_processor.tokenizer.decode
    assert [[decode(r) for r in rs] for rs in got] == [["x = 12"], ["It is 5."]]


@pytest.mark.parametrize("limit", [0, -1, 1.0])
def test_limit_must_be_a_positive_integer(parquet, limit):
    with pytest.raises(InspectError, match="--limit"):
        load_items(parquet, limit)


def _refused_before_loading(monkeypatch, capsys, checkpoint: str, data: str) -> str:
    """``verl-tor inspect`` on ``data`` -> rc 2 and one error line, with no model or processor loaded."""
    import transformers
    import verl.utils

    def no_loading(*args, **kwargs):
        raise AssertionError("a model/processor was loaded before the data were checked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_loading)
    monkeypatch.setattr(verl.utils, "hf_processor", no_loading)
    rc = main(["inspect", "--model", checkpoint, "--data", data, "--out-dir", "unused_out", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: --data") and "Fix:" in err, err
    return err


def test_data_that_is_not_a_parquet_is_one_clear_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Issue 17 item 11: a CSV (or any non-parquet file) gave pyarrow's raw ``ArrowInvalid`` traceback."""
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "geo.csv"
    csv.write_text("prompt,images\nhi,x\n")
    err = _refused_before_loading(monkeypatch, capsys, tiny_checkpoint, str(csv))
    assert "is not a parquet file" in err and str(csv) in err
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert "is not a parquet file" in _refused_before_loading(monkeypatch, capsys, tiny_checkpoint, str(empty))


def test_data_that_is_a_directory_is_named_as_one(tiny_checkpoint, parquet, tmp_path, monkeypatch, capsys):
    """Issue 17 item 11: a directory was reported as "does not exist"; name its parquet files instead."""
    import shutil

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(parquet, folder / "train.parquet")
    err = _refused_before_loading(monkeypatch, capsys, tiny_checkpoint, str(folder))
    assert "is a directory" in err and "does not exist" not in err and "train.parquet" in err
    missing = _refused_before_loading(monkeypatch, capsys, tiny_checkpoint, str(tmp_path / "nope.parquet"))
    assert "does not exist" in missing


@pytest.mark.parametrize(
    ("content", "n_images", "counts"),
    [
        ("<image><image>Find the area.", 1, "2 <image> placeholders and 1 image"),
        ("Find the area.", 1, "0 <image> placeholders and 1 image"),
        ([{"type": "image"}, {"type": "text", "text": "Find the area."}], 2, "1 <image> placeholder and 2 images"),
    ],
)
def test_placeholder_and_image_counts_must_agree(
    tiny_checkpoint, geometry_images, tmp_path, monkeypatch, capsys, content, n_images, counts
):
    """Issue 17 item 12: two placeholders for one image gave an ``IndexError``, none gave transformers' "Image
    features and image tokens do not match" -- both after the model was loaded. Checked per row, up front."""
    monkeypatch.chdir(tmp_path)
    # pyarrow wants one type per column: a list-content row goes with a list-content row
    one = "<image>Find the area." if isinstance(content, str) else [{"type": "image"}, {"type": "text", "text": "x"}]
    good = {"prompt": [{"role": "user", "content": one}], "images": [{"bytes": png_bytes(geometry_images[0])}]}
    bad = {"prompt": [{"role": "user", "content": content}]}
    bad["images"] = [{"bytes": png_bytes(img)} for img in geometry_images[:n_images]]
    path = tmp_path / "mismatch.parquet"
    pd.DataFrame([good, bad]).to_parquet(path)
    err = _refused_before_loading(monkeypatch, capsys, tiny_checkpoint, str(path))
    assert f"row 1: the prompt has {counts}" in err, err
