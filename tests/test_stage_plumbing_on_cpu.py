"""The stage's TransferQueue plumbing: verl's V1 row layout survives a round trip, including the nested traps."""

from __future__ import annotations

import torch
from tensordict import NonTensorStack

from verl_tor.stage import rows_to_tensordict, tensordict_to_rows
from verl_tor.tools.in_process import InMemoryKV


def make_rows(lengths):
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.arange(n) + 100 * i
        rows.append(
            {
                "input_ids": ids,
                "position_ids": torch.stack(
                    [torch.arange(n), torch.arange(n), torch.arange(n) * 2, torch.arange(n) * 3]
                ),
                "multi_modal_inputs": {"image_grid_thw": torch.tensor([[1, 2, 2]])} if i % 2 == 0 else {},
                "uid": f"u{i // 2}",
            }
        )
    return rows


def test_same_length_rows_stay_jagged_along_the_sequence():
    # Trap: torch.stack (or as_nested_tensor on (4, L) rows) makes the wrong dimension ragged when every L is equal.
    td = rows_to_tensordict(make_rows([5, 5, 5]))
    assert td["input_ids"].is_nested and td["position_ids"].is_nested
    assert torch.equal(td["input_ids"].offsets(), torch.tensor([0, 5, 10, 15]))
    padded = torch.nested.to_padded_tensor(td["position_ids"], 0)
    assert padded.shape == (3, 4, 5)  # what verl's non-packed engine path expects
    assert torch.equal(padded[1, 2], torch.arange(5) * 2)
    assert td["position_ids"].values().shape == (15, 4) or td["position_ids"].values().shape == (4, 15)


def test_round_trip_ragged_rows_and_python_objects():
    rows = make_rows([3, 7, 4])
    td = rows_to_tensordict(rows)
    assert isinstance(td.get("multi_modal_inputs"), NonTensorStack) and isinstance(td.get("uid"), NonTensorStack)
    back = tensordict_to_rows(td)
    for a, b in zip(rows, back):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["position_ids"], b["position_ids"])
        assert a["uid"] == b["uid"]
        assert a["multi_modal_inputs"].keys() == b["multi_modal_inputs"].keys()


def test_in_memory_kv_gets_puts_selects_and_clears():
    kv = InMemoryKV()
    rows = make_rows([3, 4])
    kv.kv_batch_put(["a", "b"], "p", fields=rows_to_tensordict(rows))
    got = kv.kv_batch_get(["b", "a"], "p", select_fields=["input_ids", "values"])  # unknown fields are skipped
    assert list(got.keys()) == ["input_ids"]
    assert torch.equal(got["input_ids"].unbind()[0], rows[1]["input_ids"])
    kv.kv_clear(["a", "b"], "p")
    assert "p" not in kv.data


def test_response_slicing_matches_verl_convention():
    from verl.workers.utils.padding import response_from_nested

    from verl_tor.stage import _response_padded

    # log-prob of response token t sits at sequence position prompt_len + t - 1
    seq = torch.nested.as_nested_tensor([torch.arange(6.0), torch.arange(4.0) + 10], layout=torch.jagged)
    mask = torch.nested.as_nested_tensor([torch.ones(3), torch.ones(2)], layout=torch.jagged)
    want = torch.nested.to_padded_tensor(response_from_nested(seq, mask), 0.0)
    got = _response_padded(seq, mask, width=5)
    assert got.shape == (2, 5)
    assert torch.equal(got[:, :3], want)
    assert torch.equal(got[0, :3], torch.tensor([2.0, 3.0, 4.0])) and torch.equal(
        got[1, :2], torch.tensor([11.0, 12.0])
    )
