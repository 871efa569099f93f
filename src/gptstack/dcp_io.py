"""File access of PyTorch Distributed Checkpoint (DCP) for encrypted checkpoints, shared by
checkpoint.py (which reads a sharded checkpoint whole) and sharded_checkpoint.py (which writes and
reads one shard by shard). It imports neither, so the dependency goes one way; checkpoint.py imports
it only when it reads a sharded checkpoint (torch.distributed.checkpoint takes a second to import).
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem


class SealedFiles(FileSystem):
    """DCP's file access for encrypted checkpoints: each file is handed to ``seal(name, data)`` as a
    whole when DCP closes it, and read into memory by ``read(directory, name)`` (which decrypts it)
    when DCP opens it."""

    def __init__(self, read: Callable[[Path, str], bytes] | None = None,
                 seal: Callable[[str, bytes], bytes] | None = None):
        super().__init__()
        self.read, self.seal = read, seal

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str):
        path = Path(path)
        if "r" in mode:
            yield io.BytesIO(self.read(path.parent, path.name))
            return
        name = path.name.removesuffix(".tmp")   # DCP writes .metadata as .metadata.tmp, then renames it
        with SealOnClose(lambda data: path.write_bytes(self.seal(name, data))) as stream:
            yield stream


class SealOnClose(io.BytesIO):
    """A file written in memory and handed to ``store`` when closed (DCP closes its files itself)."""

    def __init__(self, store: Callable[[bytes], object]):
        super().__init__()
        self.store = store

    def close(self) -> None:
        if not self.closed:
            self.store(self.getvalue())
        super().close()


@contextmanager
def dcp_failures_raised():
    """The first failure DCP wrapped, raised as itself: a CheckpointError (a file that does not
    decrypt) or a write error (disk full) stays what it is."""
    try:
        yield
    except CheckpointException as exc:
        raise next(iter(exc.failures.values()))[0] from None
