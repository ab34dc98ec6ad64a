"""What passes between a student's process and the grader: data, never code.

Grading (tools/coursework.py, tools/sandbox.py) runs a student's answers in a process of
their own and the checks in another, where no student code ever ran. This module is the one
format the checks' process accepts from a student's process. A message is a *data frame*: a
JSON document, plus the raw bytes of the arrays and tensors it names. Decoding one can build
only:

- ``None``, booleans, integers, floats (NaN and infinities included), complex numbers, strings;
- lists, tuples, dicts (keys: numbers, strings, tuples of them), sets and frozensets;
- numpy arrays and scalars and torch tensors of plain numeric dtypes (the bytes are checked
  against the declared shape and dtype), torch dtypes and devices;
- a few depthlab values, rebuilt through their own validating constructors: the three configs,
  a claim's ``Comparison`` and ``Verdict``, and a ``ClaimBook``'s verdicts (never its ledger
  path, so no file is written for it);
- *handles*: numbers standing for a student's function, which stays in the student's process.
  The grader calls it through ``sandbox.Remote``: the arguments go there, the result comes
  back as data.

No pickle, no import or attribute lookup by a name the sender chooses, no object whose methods
the sender wrote: an object whose ``__eq__`` is always true, a patched ``isinstance`` or a
replaced ``math.isclose`` in the student's process stay there. The frame size is capped
(``FRAME_LIMIT``), and so is the nesting depth. Anything else is a ``WireError``.

The other direction (grader to student) carries the calls a check makes, whose arguments may be
models; it uses pickle (``send_pickle``/``recv_pickle``), which only the student's process
ever unpickles: what the grader sends cannot harm the grader.
"""

from __future__ import annotations

import builtins
import json
import math
import pickle
import socket
import struct
import time

import numpy as np
import torch

FRAME_LIMIT = 256 << 20       # bytes in one frame: far above any answer, below the memory cap
MAX_DEPTH = 64                # containers nested deeper than this are refused
MAX_DIMS = 32

_DATA_MAGIC, _PICKLE_MAGIC = b"DLW1", b"DLP1"
_HEAD = struct.Struct("<4sIQ")           # magic, number of blobs, JSON length
_LEN = struct.Struct("<Q")

# The student's process may patch builtins: the encoder keeps its own references (they are
# taken when this module is imported, before any student code runs).
_isinstance, _type, _len, _callable = (builtins.isinstance, builtins.type, builtins.len,
                                       builtins.callable)

TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)}
NUMPY_DTYPES = {n: np.dtype(n) for n in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128")}


class WireError(ValueError):
    """A frame that is not data of this format (or too large, or too deep)."""


class Unreadable(TypeError):
    """A value the format cannot carry (raised in the student's process, when encoding)."""


def _value_classes() -> dict[str, type]:
    """The depthlab classes a frame may name, by the name a frame uses. Looked up in this
    table only: a frame cannot make the grader import anything."""
    from depthlab.claims import ClaimBook, Comparison, Verdict
    from depthlab.config import MLPConfig, TrainConfig, TransformerConfig

    return {c.__name__: c for c in (TransformerConfig, MLPConfig, TrainConfig, Comparison,
                                    Verdict, ClaimBook)}


# --------------------------------------------------------------------------------------------
# Encoding (in the student's process)
# --------------------------------------------------------------------------------------------


class Encoder:
    """Turns values into (document, blobs). ``handle(obj) -> int`` registers a callable that
    stays in this process; without it a callable is ``Unreadable``."""

    def __init__(self, handle=None):
        self.blobs: list[bytes] = []
        self.handle = handle

    def __call__(self, value, depth: int = 0, where: str = ""):
        if depth > MAX_DEPTH:
            raise Unreadable(f"{where or 'the value'} is nested deeper than {MAX_DEPTH}")
        t = _type(value)
        if value is None or t in (bool, int, str):
            return value
        if t is float:
            return value if math.isfinite(value) else {"!float": repr(value)}
        if _isinstance(value, torch.Tensor):
            return self._tensor(value)
        if _isinstance(value, np.ndarray):
            return self._ndarray(value, where)
        if _isinstance(value, np.generic):
            return self._ndarray(np.asarray(value), where) | {"scalar": True}
        if _isinstance(value, bool):
            return bool(value)
        if _isinstance(value, int):
            return int.__int__(value)
        if _isinstance(value, float):
            return self(float.__float__(value), depth, where)
        if _isinstance(value, str):
            return str.__str__(value)
        if _isinstance(value, complex):
            return {"!complex": [self(value.real), self(value.imag)]}
        if _isinstance(value, torch.dtype):
            return {"!dtype": str(value).removeprefix("torch.")}
        if _isinstance(value, torch.device):
            return {"!device": str(value)}
        if _isinstance(value, list):
            return [self(v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value)]
        if _isinstance(value, tuple):                      # torch.Size and named tuples too
            return {"!tuple": [self(v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value)]}
        if _isinstance(value, dict):
            return {"!dict": [[self(k, depth + 1, f"{where} key"),
                               self(v, depth + 1, f"{where}[{k!r}]")] for k, v in value.items()]}
        if _isinstance(value, (set, frozenset)):
            kind = "!set" if _isinstance(value, set) else "!frozenset"
            return {kind: [self(v, depth + 1, f"{where} item") for v in value]}
        name = _VALUE_NAMES.get(t)
        if name is not None:
            return {"!object": name, "fields": self._fields(value, name, depth, where)}
        if _callable(value) and self.handle is not None:
            return {"!handle": self.handle(value)}
        raise Unreadable(f"{where or 'the value'} is a {t.__module__}.{t.__qualname__}, which "
                         "the grader cannot read: give numbers, strings, lists, tuples, dicts, "
                         "arrays or tensors")

    def _fields(self, value, name, depth, where):
        import dataclasses

        if name == "ClaimBook":                  # its verdicts only: never a ledger path
            names = ["chapter", "verdicts"]
        else:
            names = [f.name for f in dataclasses.fields(value) if f.init]
        return [[n, self(getattr(value, n), depth + 1, f"{where}.{n}")] for n in names]

    def _tensor(self, t: torch.Tensor):
        t = t.detach()
        if t.is_sparse:
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in TORCH_DTYPES:
            raise Unreadable(f"a tensor of dtype {t.dtype} cannot be read by the grader")
        if _type(t) is not torch.Tensor:
            t = t.as_subclass(torch.Tensor)
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self.blobs.append(data)
        return {"!tensor": _len(self.blobs) - 1, "dtype": dtype, "shape": list(t.shape)}

    def _ndarray(self, a: np.ndarray, where: str):
        if a.dtype.name not in NUMPY_DTYPES:
            raise Unreadable(f"{where or 'the value'} is an array of dtype {a.dtype}, which the "
                             "grader cannot read")
        a = np.asarray(a, dtype=a.dtype.newbyteorder("="), order="C")   # keeps 0-d as 0-d
        self.blobs.append(a.tobytes())
        return {"!ndarray": _len(self.blobs) - 1, "dtype": a.dtype.name, "shape": list(a.shape)}


_VALUE_NAMES: dict[type, str] = {}


def register_value_classes() -> None:
    if not _VALUE_NAMES:
        _VALUE_NAMES.update({c: n for n, c in _value_classes().items()})


def encode(value, handle=None) -> tuple[object, list[bytes]]:
    """(document, blobs) for one value; ``Unreadable`` if the format cannot carry it."""
    register_value_classes()
    enc = Encoder(handle)
    return enc(value), enc.blobs


# --------------------------------------------------------------------------------------------
# Decoding (in the grader: this is the only code that reads what a student's process sent)
# --------------------------------------------------------------------------------------------


class _Decoder:
    def __init__(self, blobs: list[bytes], handle):
        self.blobs, self.handle = blobs, handle
        self.classes: dict[str, type] | None = None

    def __call__(self, doc, depth: int = 0):
        if depth > MAX_DEPTH:
            raise WireError(f"nested deeper than {MAX_DEPTH}")
        if doc is None or type(doc) in (bool, int, str):
            return doc
        if type(doc) is float:
            return doc
        if type(doc) is list:
            return [self(v, depth + 1) for v in doc]
        if type(doc) is not dict or not doc:
            raise WireError(f"unexpected {type(doc).__name__} in a frame")
        tag = next(iter(doc))
        if tag == "!float":
            self._keys(doc, {"!float"})
            if doc[tag] not in ("nan", "inf", "-inf"):
                raise WireError("bad float")
            return float(doc[tag])
        if tag == "!complex":
            self._keys(doc, {"!complex"})
            re_im = [self(v, depth + 1) for v in self._list(doc[tag], 2)]
            if not all(type(v) in (int, float) for v in re_im):
                raise WireError("bad complex")
            return complex(*re_im)
        if tag == "!tuple":
            self._keys(doc, {"!tuple"})
            return tuple(self(v, depth + 1) for v in self._list(doc[tag]))
        if tag in ("!set", "!frozenset"):
            self._keys(doc, {tag})
            items = [self._key(self(v, depth + 1)) for v in self._list(doc[tag])]
            return set(items) if tag == "!set" else frozenset(items)
        if tag == "!dict":
            self._keys(doc, {"!dict"})
            out = {}
            for pair in self._list(doc[tag]):
                k, v = self._list(pair, 2)
                out[self._key(self(k, depth + 1))] = self(v, depth + 1)
            return out
        if tag == "!tensor":
            self._keys(doc, {"!tensor", "dtype", "shape"})
            dtype = TORCH_DTYPES.get(doc["dtype"]) if type(doc["dtype"]) is str else None
            if dtype is None:
                raise WireError(f"tensor dtype {doc['dtype']!r} is not allowed")
            shape = self._shape(doc["shape"])
            blob = self._blob(doc[tag], math.prod(shape) * dtype.itemsize)
            if not blob:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype).reshape(shape)
        if tag == "!ndarray":
            self._keys(doc, {"!ndarray", "dtype", "shape"}, {"scalar"})
            dtype = NUMPY_DTYPES.get(doc["dtype"]) if type(doc["dtype"]) is str else None
            if dtype is None:
                raise WireError(f"array dtype {doc['dtype']!r} is not allowed")
            shape = self._shape(doc["shape"])
            blob = self._blob(doc[tag], math.prod(shape) * dtype.itemsize)
            a = np.frombuffer(blob, dtype=dtype).reshape(shape).copy()
            if doc.get("scalar") is True:
                if shape:
                    raise WireError("a scalar with a shape")
                return a[()]
            return a
        if tag == "!dtype":
            self._keys(doc, {"!dtype"})
            if doc[tag] not in TORCH_DTYPES:
                raise WireError(f"dtype {doc[tag]!r} is not allowed")
            return TORCH_DTYPES[doc[tag]]
        if tag == "!device":
            self._keys(doc, {"!device"})
            if type(doc[tag]) is not str:
                raise WireError("bad device")
            try:
                return torch.device(doc[tag])
            except (RuntimeError, ValueError) as exc:
                raise WireError(f"bad device {doc[tag]!r}") from exc
        if tag == "!handle":
            self._keys(doc, {"!handle"})
            if type(doc[tag]) is not int or self.handle is None:
                raise WireError("unexpected handle")
            return self.handle(doc[tag])
        if tag == "!object":
            self._keys(doc, {"!object", "fields"})
            return self._object(doc[tag], doc["fields"], depth)
        raise WireError(f"unknown tag {tag!r}")

    def _object(self, name, fields, depth):
        import dataclasses

        if self.classes is None:
            self.classes = _value_classes()
        cls = self.classes.get(name) if type(name) is str else None
        if cls is None:
            raise WireError(f"{name!r} is not a value the grader rebuilds")
        values = {}
        for pair in self._list(fields):
            k, v = self._list(pair, 2)
            if type(k) is not str:
                raise WireError("bad field name")
            values[k] = self(v, depth + 1)
        if name == "ClaimBook":
            # Built without its constructor: a ClaimBook's constructor rewrites a ledger file.
            verdicts = values.get("verdicts", {})
            if (set(values) != {"chapter", "verdicts"} or type(values["chapter"]) is not str
                    or type(verdicts) is not dict
                    or not all(type(k) is str and type(v) is self.classes["Verdict"]
                               for k, v in verdicts.items())):
                raise WireError("bad ClaimBook")
            book = object.__new__(cls)
            book.chapter, book.ledger, book.verdicts = values["chapter"], None, verdicts
            return book
        allowed = {f.name for f in dataclasses.fields(cls) if f.init}
        if not set(values) <= allowed:
            raise WireError(f"{name} has no field {sorted(set(values) - allowed)[0]!r}")
        try:
            return cls(**values)                       # the class validates its own fields
        except Exception as exc:
            raise WireError(f"{name} refused its fields: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _keys(doc: dict, required: set, optional: set = frozenset()) -> None:
        if not required <= set(doc) <= required | optional:
            raise WireError(f"bad tagged object {sorted(doc)}")

    @staticmethod
    def _list(v, n: int | None = None) -> list:
        if type(v) is not list or (n is not None and len(v) != n):
            raise WireError("bad list")
        return v

    @staticmethod
    def _key(k):
        try:
            hash(k)
        except TypeError as exc:
            raise WireError("unhashable dict key or set item") from exc
        if type(k) not in (type(None), bool, int, float, complex, str, tuple, frozenset):
            raise WireError(f"a {type(k).__name__} as a dict key")
        return k

    @staticmethod
    def _shape(shape) -> list[int]:
        if (type(shape) is not list or len(shape) > MAX_DIMS
                or not all(type(s) is int and 0 <= s < 2 ** 40 for s in shape)):
            raise WireError("bad shape")
        return shape

    def _blob(self, index, nbytes: int) -> bytes:
        if type(index) is not int or not 0 <= index < len(self.blobs):
            raise WireError("bad blob index")
        blob = self.blobs[index]
        if len(blob) != nbytes:
            raise WireError(f"{len(blob)} bytes where the shape and dtype say {nbytes}")
        return blob


def decode(doc, blobs: list[bytes], handle=None):
    """The value a document and its blobs describe; ``WireError`` for anything else.
    ``handle(n)`` makes the grader's stand-in for the student's callable number n."""
    try:
        return _Decoder(blobs, handle)(doc)
    except WireError:
        raise
    except (RecursionError, MemoryError, OverflowError, ValueError, TypeError) as exc:
        raise WireError(f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Frames on a socket
# --------------------------------------------------------------------------------------------


def pack(value, handle=None) -> bytes:
    """One data frame holding ``value`` (see the module text)."""
    return frame(*encode(value, handle))


def frame(doc, blobs: list[bytes]) -> bytes:
    """The bytes of a data frame for an encoded document and its blobs."""
    text = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    return b"".join([_HEAD.pack(_DATA_MAGIC, len(blobs), len(text)),
                     *(_LEN.pack(len(b)) for b in blobs), text, *blobs])


def _recv_exactly(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes; by ``deadline`` (time.monotonic) if given, however slowly they come."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the other process took too long")
            sock.settimeout(left)
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the other process closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_data(sock: socket.socket, handle=None, limit: int = FRAME_LIMIT,
              deadline: float | None = None):
    """Read one data frame from ``sock`` and decode it (``WireError`` if it is not one).
    ``deadline`` (time.monotonic) bounds the whole frame, not each read: a sender that
    trickles bytes cannot hold the reader. ``TimeoutError`` and ``EOFError`` pass through."""
    magic, n_blobs, n_json = _HEAD.unpack(_recv_exactly(sock, _HEAD.size, deadline))
    if magic != _DATA_MAGIC:
        raise WireError("not a data frame")
    if n_blobs > 1 << 16 or n_json > limit:
        raise WireError(f"a frame larger than {limit >> 20} MiB")
    sizes = [_LEN.unpack(_recv_exactly(sock, _LEN.size, deadline))[0] for _ in range(n_blobs)]
    if n_json + sum(sizes) > limit:
        raise WireError(f"a frame larger than {limit >> 20} MiB")
    text = _recv_exactly(sock, n_json, deadline)
    blobs = [_recv_exactly(sock, s, deadline) for s in sizes]
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"not JSON: {exc}") from exc
    return decode(doc, blobs, handle)


def _no_constant(name: str):
    raise WireError(f"{name} is written as a tagged float in this format")


def send_pickle(sock: socket.socket, obj) -> None:
    """Grader to student only (see the module text)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_PICKLE_MAGIC + _LEN.pack(len(data)) + data)


def recv_pickle(sock: socket.socket):
    """In the student's process only: what the grader sent."""
    head = _recv_exactly(sock, 4 + _LEN.size)
    if head[:4] != _PICKLE_MAGIC:
        raise EOFError("not a frame from the grader")
    return pickle.loads(_recv_exactly(sock, _LEN.unpack(head[4:])[0]))


# --------------------------------------------------------------------------------------------
# Arguments a student's function may change in place
# --------------------------------------------------------------------------------------------


def mutable_leaves(obj, depth: int = 0) -> list:
    """Tensors, arrays and modules inside ``obj`` (lists, tuples, dict values), in order.

    A check that calls a student's function may read its arguments afterwards (an in-place
    initialiser, "the inputs must not change"). Both processes walk the arguments the same
    way: the student's process sends back each leaf's state after the call and the grader
    writes it into its own objects (``sandbox.apply_states``)."""
    if depth > MAX_DEPTH:
        return []
    if isinstance(obj, (torch.Tensor, np.ndarray, torch.nn.Module)):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [leaf for v in obj for leaf in mutable_leaves(v, depth + 1)]
    if isinstance(obj, dict):
        return [leaf for v in obj.values() for leaf in mutable_leaves(v, depth + 1)]
    return []


def leaf_state(leaf):
    """What a leaf holds after a call: the tensor or array itself, or a module's state_dict."""
    if isinstance(leaf, torch.nn.Module):
        return dict(leaf.state_dict())
    return leaf
