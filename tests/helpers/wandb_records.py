"""Read an offline W&B run's records back: its `run-*.wandb` file is W&B's protobuf `Record`s in
LevelDB's log format (a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header:
checksum, length, kind), which wandb itself ships no Python reader for."""
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32 * 1024, 7
FULL, LAST = 1, 4  # chunk kinds that end a record (FIRST = 2 and MIDDLE = 3 continue one)


def records(path: Path) -> list:
    """Every Record of a .wandb file, in order."""
    data, at, pending, found = path.read_bytes(), HEADER, b"", []
    while at + HEADER <= len(data):
        left = BLOCK - at % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            at += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[at:at + HEADER])
        if length == 0 and kind == 0:  # zero padding to the block's end
            at += left
            continue
        pending += data[at + HEADER:at + HEADER + length]
        at += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def exit_code(path: Path) -> int | None:
    """The exit code the run was finished with (0: finished, else failed); None: never finished."""
    codes = [r.exit.exit_code for r in records(path) if r.WhichOneof("record_type") == "exit"]
    return codes[-1] if codes else None
