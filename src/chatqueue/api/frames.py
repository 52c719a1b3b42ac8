"""How messages travel between chatqueue's processes over a stream socket: pickled, each frame
prefixed with its length (the API servers' link to the core, a front's link to a replica)."""

from __future__ import annotations

import asyncio
import pickle
import struct

_LENGTH = struct.Struct("!I")


def write(writer: asyncio.StreamWriter, message: object) -> None:
    """Whole frames only: one `write` each, so frames from several tasks never interleave."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(data)) + data)


async def read(reader: asyncio.StreamReader) -> object:
    """The next message; IncompleteReadError once the other end has closed."""
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(size))
