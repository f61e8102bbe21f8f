"""The binary wire: trace/2 records (and the API bodies that carry them) as MessagePack.

Why MessagePack and not Arrow IPC: the daemon's traffic is one trace per request, or the agent's
batches of a few dozen. An Arrow IPC stream carries its schema in every message, which costs more
than one such batch, and batch columns would need rebuilding into records anyway. MessagePack maps
one to one onto the JSON shape every schema already validates, so the same pydantic models check
both encodings; only the count matrix differs: it travels as one MessagePack extension holding a
little-endian integer array (uint16, uint32, or int64: the narrowest that holds the counts), which
the decoder hands to the schema as an array without making a Python int per count.

The decoder is bounded like the JSON path: a map holds at most :data:`MAX_FIELDS` entries (a field
flood is refused before any validation), a string at most :data:`MAX_STR` characters, and binary
values other than the count extension are refused outright, so they cannot carry text either.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from routescan.telemetry.schema import MAX_LAUNCHES, CountMatrix, RequestTrace

MEDIA_TYPE = "application/msgpack"
MEDIA_TYPES = ("application/msgpack", "application/vnd.msgpack", "application/x-msgpack")
EXT_U32 = 1  # counts as little-endian uint32
EXT_I64 = 2  # counts as little-endian int64 (thread counts past 2**32)
EXT_U16 = 3  # counts as little-endian uint16 (routed tokens: a count never exceeds the prompt length)
MAX_FIELDS = 64  # per map: a trace has 19 fields, a launch 10, labels at most 16
MAX_STR = 256  # the longest string any schema takes (a kernel name)
_DTYPES = {EXT_U16: np.dtype("<u2"), EXT_U32: np.dtype("<u4"), EXT_I64: np.dtype("<i8")}


class WireError(ValueError):
    """A binary body that is not well-formed or is over a bound; the message names the bound."""


def _ext(matrix: CountMatrix) -> msgpack.ExtType:
    """The narrowest little-endian integer type that holds every count."""
    for code in (EXT_U16, EXT_U32):
        if matrix.top < 2 ** (8 * _DTYPES[code].itemsize):
            return msgpack.ExtType(code, matrix.flat.astype(_DTYPES[code]).tobytes())
    return msgpack.ExtType(EXT_I64, matrix.flat.astype("<i8").tobytes())


def _default(obj: Any) -> Any:
    if isinstance(obj, CountMatrix):
        return _ext(obj)
    if isinstance(obj, RequestTrace):
        return trace_payload(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def trace_payload(trace: RequestTrace) -> dict[str, Any]:
    """The trace as the dict the binary wire packs (enums as their values, no None fields)."""
    return trace.model_dump(mode="python", exclude_none=True)


def packb(payload: Any) -> bytes:
    """Encode a trace, or any body holding traces (``{"items": [{"trace": trace}, ...]}``)."""
    return msgpack.packb(payload, default=_default, use_bin_type=True)


def _ext_hook(code: int, data: bytes) -> CountMatrix:
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise WireError(f"unknown extension type {code}: only the count matrix ({sorted(_DTYPES)}) is taken")
    if len(data) % dtype.itemsize:
        raise WireError("a count matrix's length is not a whole number of integers")
    try:
        return CountMatrix(np.frombuffer(data, dtype=dtype))
    except ValueError as exc:
        raise WireError(str(exc)) from None


def unpackb(body: bytes) -> Any:
    """Decode a binary body, bounded as described above; :class:`WireError` says what was wrong."""
    try:
        return msgpack.unpackb(
            body,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STR,
            max_bin_len=0,
            max_map_len=MAX_FIELDS,
            max_array_len=MAX_LAUNCHES,
            max_ext_len=8 * 65_536 * 1024,
        )
    except WireError:
        raise
    except ValueError as exc:
        text = str(exc)
        if "exceeds max" in text:
            raise WireError(
                f"the body is over a bound (maps at most {MAX_FIELDS} fields, strings at most {MAX_STR} "
                "characters, no binary values): RouteScan takes telemetry only"
            ) from None
        raise WireError("the body is not valid MessagePack") from None
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError):
        raise WireError("the body is not valid MessagePack") from None
