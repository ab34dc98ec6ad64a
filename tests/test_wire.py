"""The data-only format between a student's process and the grader (tools/wire.py): values
make the round trip exactly; code, objects with methods and malformed frames do not."""

import json
import math
import pickle
import socket
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import wire  # noqa: E402

import depthlab as dl  # noqa: E402


def _roundtrip(value, handle=None, decode_handle=None):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wire.pack(value, handle))
        return wire.recv_data(b, handle=decode_handle)


def test_values_make_the_round_trip_exactly():
    cfg = dl.TransformerConfig(d_model=64, n_heads=8, n_layers=12, norm_placement="post")
    value = {
        "none": None, "flag": True, "n": 3, "x": 0.1, "nan": math.nan, "inf": -math.inf,
        "z": 1 + 2j, "s": "stays apart", "list": [1, [2.5, "a"]], "tuple": (1, (2,)),
        (1, "key"): {1.5: "float key"}, "set": {1, 2}, "frozen": frozenset({"a"}),
        "tensor": torch.randn(3, 4, dtype=torch.float64),
        "half": torch.ones(2, dtype=torch.bfloat16),
        "long": torch.arange(5), "empty": torch.zeros(0, 3), "bool": torch.tensor([True, False]),
        "array": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.float32(1.5),
        "dtype": torch.float16, "device": torch.device("cpu"), "cfg": cfg,
        "size": torch.Size([2, 3]),
    }
    got = _roundtrip(value)
    assert set(got) == set(value)
    for key in ("none", "flag", "n", "x", "inf", "z", "s", "list", "tuple", (1, "key"), "set",
                "frozen", "dtype", "device"):
        assert got[key] == value[key] and type(got[key]) is type(value[key]), key
    assert math.isnan(got["nan"])
    for key in ("tensor", "half", "long", "empty", "bool"):
        assert torch.equal(got[key], value[key]) and got[key].dtype == value[key].dtype
    assert got["array"].dtype == np.float32 and np.array_equal(got["array"], value["array"])
    assert type(got["scalar"]) is np.float32 and got["scalar"] == 1.5
    assert type(got["cfg"]) is dl.TransformerConfig and got["cfg"] == cfg
    assert got["size"] == (2, 3) and type(got["size"]) is tuple


def test_a_claim_book_comes_back_with_its_verdicts_and_without_its_ledger(tmp_path):
    book = dl.ClaimBook("00_tour", ledger=str(tmp_path / "ledger.json"))
    book.check("x", "a statement", dl.between("ratio", [1.0, 2.0, 3.0], 0.1, 10, over="seeds",
                                              origin="decade: within a factor 10"),
               seeds=[0, 1, 2], display=False)
    got = _roundtrip(book)
    assert got.ledger is None and got.verdicts["x"].verdict == "holds"
    assert got.verdicts["x"] == book.verdicts["x"]


def test_objects_with_code_are_not_data():
    class Yes:
        def __eq__(self, other):
            return True

    with pytest.raises(wire.Unreadable, match="Yes"):
        wire.encode([1, Yes()])
    with pytest.raises(wire.Unreadable):
        wire.encode(np.array([object()], dtype=object))
    handles = []
    got = _roundtrip({"f": len}, handle=lambda f: handles.append(f) or 7,
                     decode_handle=lambda n: ("stand-in", n))
    assert got == {"f": ("stand-in", 7)} and handles == [len]
    with pytest.raises(wire.WireError):                  # a handle where none is expected
        _roundtrip({"f": len}, handle=lambda f: 1)


def _frame(doc, blobs=()) -> bytes:
    text = json.dumps(doc).encode()
    return (struct.pack("<4sIQ", b"DLW1", len(blobs), len(text))
            + b"".join(struct.pack("<Q", len(b)) for b in blobs) + text + b"".join(blobs))


@pytest.mark.parametrize("raw", [
    pickle.dumps(print),                                           # a pickle is not a frame
    _frame({"!object": "Popen", "fields": []}),                    # only listed classes
    _frame({"!object": "ClaimBook", "fields": [["chapter", "x"], ["verdicts", {"!dict": []}],
                                               ["ledger", "/tmp/x"]]}),   # never a ledger
    _frame({"!tensor": 0, "dtype": "float32", "shape": [4]}, [b"\0" * 8]),  # wrong size
    _frame({"!ndarray": 0, "dtype": "object", "shape": [1]}, [b"\0" * 8]),  # object arrays
    _frame({"!dict": [[[1, 2], 3]]}),                              # a list as a key
    _frame({"!global": "os.system"}),                              # unknown tags
    _frame({"!tuple": [], "extra": 1}),
    _frame(json.loads("[" * 200 + "]" * 200)),                     # too deep
    struct.pack("<4sIQ", b"DLW1", 0, 1 << 40),                     # too large
], ids=["pickle", "class", "ledger", "size", "object-dtype", "key", "tag", "extra", "deep",
        "large"])
def test_malformed_frames_are_refused(raw):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(wire.WireError):
            wire.recv_data(b)


def test_the_encoder_ignores_a_patched_isinstance(monkeypatch):
    import builtins

    monkeypatch.setattr(builtins, "isinstance", lambda *a, **k: True)
    doc, blobs = wire.encode({"x": 1.5, "t": torch.ones(2)})
    monkeypatch.undo()
    assert wire.decode(doc, blobs)["x"] == 1.5


def test_arguments_changed_in_place_are_found_in_the_same_order_on_both_sides():
    lin = torch.nn.Linear(2, 3)
    args = ([torch.ones(2), {"a": np.zeros(3)}], lin, "text")
    leaves = wire.mutable_leaves(args)
    copy = pickle.loads(pickle.dumps(args))
    assert [type(x) for x in wire.mutable_leaves(copy)] == [type(x) for x in leaves]
    assert set(wire.leaf_state(lin)) == {"weight", "bias"}
