"""Wire format: a message is a ZeroMQ multipart `[header, buf0, buf1, ...]`.

The header is a msgpack map. Tensors never go into it: each tensor is replaced by a reference
`{dtype, shape, frame}` (a msgpack extension of type `TENSOR_EXT`, so a reference can never be
confused with a user map) to one raw buffer frame that holds the tensor's bytes. bf16 and fp8
travel as uint8 views of the same memory. Encoding is zero-copy for contiguous tensors; decoding
rebuilds each tensor over the received frame without copying.

Same-host peers may hand the buffers over in a shared-memory segment instead (`common.shm`): the
header then carries the reference under the key `shm` and the message has no buffer frames; the
frame indices of the tensor references are the same. A decoder accepts such a reference only when
it is given the `SharedReceiver` of its own ipc:// socket, and checks the segment like a frame.

No pickle anywhere: the only things that can come out of `unpack_header` are msgpack scalars,
lists, string-keyed maps and `TensorRef`s, and every limit is checked before memory is used.

torch is imported only where a tensor is encoded or decoded: the gateway and the broker, whose
messages carry no tensors (an image travels as msgpack binary), never load it (~200 MiB of RSS).
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from common.errors import BadDtype, BadShape, FrameMismatch, MalformedHeader, MessageTooLarge

WIRE_VERSION = 1
TENSOR_EXT = 1

if TYPE_CHECKING:
    import torch

    from common.shm import SharedReceiver

# The dtype names a reference may carry; each is also the name of the torch dtype.
DTYPES: tuple[str, ...] = (
    "float64", "float32", "float16", "bfloat16", "uint8", "int8", "int16", "int32", "int64", "bool",
    "float8_e4m3fn", "float8_e5m2",
)

MAX_DIMS = 8


@dataclass(frozen=True)
class Limits:
    """Bounds every decoder enforces. Defaults fit a 720p/121-frame job's largest tensor with room."""

    max_message_bytes: int = 2 << 30
    max_header_bytes: int = 1 << 20
    max_frames: int = 256


@functools.cache
def _dtype_table() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, name) for name in DTYPES if hasattr(torch, name)}


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a reference names; None when this torch has no such dtype. Imports torch."""
    return _dtype_table().get(name)


def is_tensor(obj: Any) -> bool:
    """Whether `obj` is a torch tensor, without importing torch: none can exist before it is loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


@dataclass(frozen=True)
class TensorRef:
    dtype: str
    shape: tuple[int, ...]
    frame: int


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat uint8 buffer; copies only when the tensor is not contiguous or not on CPU."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    # numpy declares ndarray.__buffer__ only for Python >= 3.12; the buffer protocol is there on 3.11 too.
    return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]


def pack(fields: dict[str, Any]) -> list[Any]:
    """Encode a header map with tensors anywhere inside it; returns `[header_bytes, *buffers]`."""
    buffers: list[memoryview] = []

    def default(obj: Any) -> Any:
        if is_tensor(obj):
            name = str(obj.dtype).removeprefix("torch.")
            if torch_dtype(name) != obj.dtype:
                raise BadDtype(f"dtype {obj.dtype} cannot be sent", {"dtype": str(obj.dtype)})
            ref = [name, list(obj.shape), len(buffers)]
            buffers.append(_tensor_bytes(obj))
            return msgpack.ExtType(TENSOR_EXT, msgpack.packb(ref))
        if isinstance(obj, tuple):
            return list(obj)
        raise TypeError(f"cannot encode {type(obj).__name__} on the wire")

    header = msgpack.packb(fields, default=default, use_bin_type=True)
    return [header, *buffers]


def _ext_hook(code: int, data: bytes) -> Any:
    if code != TENSOR_EXT:
        raise MalformedHeader(f"unknown msgpack extension type {code}", {"ext": code})
    try:
        dtype, shape, frame = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedHeader(f"bad tensor reference: {exc}") from None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadDtype(f"unknown dtype {dtype!r}", {"dtype": repr(dtype)[:64], "allowed": sorted(DTYPES)})
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise BadShape(f"shape must be a list of at most {MAX_DIMS} sizes", {"shape": repr(shape)[:128]})
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise BadShape(f"shape sizes must be non-negative integers, got {shape!r}", {"shape": repr(shape)[:128]})
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
        raise MalformedHeader(f"bad frame index {frame!r}")
    return TensorRef(dtype, tuple(shape), frame)


def unpack_header(header: bytes, limits: Limits) -> dict[str, Any]:
    if len(header) > limits.max_header_bytes:
        raise MessageTooLarge(
            f"header of {len(header)} bytes exceeds {limits.max_header_bytes}",
            {"size": len(header), "limit": limits.max_header_bytes},
        )
    try:
        obj = msgpack.unpackb(
            header,
            raw=False,
            strict_map_key=True,
            ext_hook=_ext_hook,
        )
    except (MalformedHeader, BadDtype, BadShape):
        raise
    except Exception as exc:
        raise MalformedHeader(f"header is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise MalformedHeader(f"header must be a map, got {type(obj).__name__}")
    return obj


def unpack(parts: list[Any], limits: Limits, shared: SharedReceiver | None = None) -> dict[str, Any]:
    """Decode `[header, *buffers]` into the header map with every TensorRef replaced by a tensor.

    `parts` may hold bytes or zmq.Frame objects. Every frame must be referenced exactly once and
    its length must equal the size its reference declares. With `shared`, a header-only message may
    name its frames in a shared-memory segment (`common.shm`); a refused one hands it back at once.
    """
    if not parts:
        raise MalformedHeader("empty message")
    if len(parts) - 1 > limits.max_frames:
        raise MessageTooLarge(f"{len(parts) - 1} frames exceeds {limits.max_frames}", {"limit": limits.max_frames})
    buffers = [p.buffer if hasattr(p, "buffer") else memoryview(p) for p in parts]
    total = sum(b.nbytes for b in buffers)
    if total > limits.max_message_bytes:
        raise MessageTooLarge(
            f"message of {total} bytes exceeds {limits.max_message_bytes}",
            {"size": total, "limit": limits.max_message_bytes},
        )
    header = unpack_header(bytes(buffers[0]), limits)
    frames: list[Any] = buffers[1:]
    release = None
    if "shm" in header:
        ref = header.pop("shm")
        if shared is None:
            raise MalformedHeader("a shared-memory reference where none is taken")
        if frames:
            raise FrameMismatch("a shared-memory message with buffer frames", {"frames": len(frames)})
        frames, release = shared.frames(ref, buffers[0].nbytes, limits)
    try:
        return _resolve(header, frames)
    except BaseException:
        if release is not None:
            release()
        raise


def _resolve(header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
    used: set[int] = set()
    fields: dict[str, Any] = _resolve_refs(header, frames, used)  # a map: unpack_header checked it
    if len(used) != len(frames):
        extra = sorted(set(range(len(frames))) - used)
        raise FrameMismatch(f"{len(extra)} frame(s) not referenced by the header", {"frames": extra[:16]})
    return fields


def _resolve_refs(obj: Any, frames: list[Any], used: set[int]) -> Any:
    """Replace the TensorRefs in `obj`. A plain function, not a closure that calls itself: that
    would be a reference cycle holding the received frames (and a shared segment) until the next
    garbage collection instead of until the message is dropped."""
    if isinstance(obj, TensorRef):
        if obj.frame >= len(frames):
            raise FrameMismatch(
                f"tensor refers to frame {obj.frame} but the message has {len(frames)}",
                {"frame": obj.frame, "frames": len(frames)},
            )
        if obj.frame in used:
            raise FrameMismatch(f"frame {obj.frame} referenced twice", {"frame": obj.frame})
        used.add(obj.frame)
        return _tensor_from_frame(obj, frames[obj.frame])
    if isinstance(obj, dict):
        return {k: _resolve_refs(v, frames, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_refs(v, frames, used) for v in obj]
    return obj


def _tensor_from_frame(ref: TensorRef, buf: Any) -> torch.Tensor:
    """`buf`: a memoryview of a received frame, or a uint8 array over a shared-memory segment
    (the tensor keeps it alive, and with it the segment)."""
    import torch

    dtype = torch_dtype(ref.dtype)
    if dtype is None:
        raise BadDtype(f"dtype {ref.dtype} is not in this torch", {"dtype": ref.dtype})
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(ref.shape) * itemsize
    if buf.nbytes != expected:
        raise FrameMismatch(
            f"frame {ref.frame} has {buf.nbytes} bytes, {ref.dtype}{list(ref.shape)} needs {expected}",
            {"frame": ref.frame, "size": buf.nbytes, "expected": expected},
        )
    if expected == 0:
        return torch.empty(ref.shape, dtype=dtype)
    with warnings.catch_warnings():
        # Received frames are read-only; stages never write into a tensor they received.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(dtype).view(ref.shape)
