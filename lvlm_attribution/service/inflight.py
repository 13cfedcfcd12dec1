"""A journal of the requests a worker process is serving, so that a request whose worker died
(killed by the server, the kernel's OOM killer, a crash) is still counted, once, by the worker
that replaces it.

    journal = InflightJournal(directory)
    died = journal.recover()        # at start-up: [transport, ...] of requests dead workers held
    token = journal.begin("grpc")   # a file named after this process's pid
    ...
    journal.end(token)              # removed when the request's outcome has been counted

A file left behind by a process that no longer exists is a request that never got an answer from
its worker. Claiming such a file is an atomic rename, so two workers starting at once never count
the same request twice. The files live on local disk and cost one small write and one unlink per
request; nothing is fsync'ed because the failure counted here is a process dying, not the host.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
PREFIX = "inflight-"


class InflightJournal:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pid = os.getpid()
        self._sequence = itertools.count()

    def begin(self, transport: str) -> Path | None:
        path = self.directory / f"{PREFIX}{self._pid}-{next(self._sequence)}.json"
        try:
            path.write_text(json.dumps({"transport": transport}))
        except OSError:  # a full or read-only disk must not fail the request it would count
            log.warning("could not journal an in-flight request in %s", self.directory,
                        exc_info=True)
            return None
        return path

    def end(self, token: Path | None) -> None:
        if token is not None:
            token.unlink(missing_ok=True)

    def recover(self) -> list[str]:
        """Transports of the requests that processes no longer alive left unanswered; each is
        returned by exactly one caller."""
        died = []
        for path in sorted(self.directory.glob(f"{PREFIX}*.json")):
            pid = _pid_of(path)
            if pid is None or pid == self._pid or _alive(pid):
                continue
            claimed = path.with_name(f"claimed-{self._pid}-{path.name}")
            try:
                path.rename(claimed)  # atomic: only one recovering worker wins each file
            except FileNotFoundError:
                continue
            died.append(_transport(claimed))
            claimed.unlink(missing_ok=True)
        return died


def _pid_of(path: Path) -> int | None:
    head = path.name[len(PREFIX):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _transport(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("transport", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"
