"""The prefix bank's rows handed out to requests: names, free rows, reference counts.

The serving bank has a fixed number of rows (one allocation that captured CUDA graphs keep
reading). A served name maps to one row; each queued or running request holds a reference to its
row. Removing or replacing a name hides the old row at once and frees it when its last request
lets go, so requests in flight keep the prefix they started with.
"""
from __future__ import annotations

import heapq
import threading
from typing import Callable

from ..bank import PrefixBank, validate_name
from .request import UnknownPrefix

# The bank wants one distinct name per row, valid as a folder name (bank.validate_name). Served
# names are this module's table; the bank row takes the served name where it is such a name and
# does not start with RESERVED, else a stand-in, as do free and retired rows.
RESERVED = "."
FREE = ".free-"          # a free row
RETIRED = ".retired-"    # a row hidden from new requests, still in use
SERVED = ".served-"      # a row serving a name the bank cannot hold (a space, say)


def free_names(capacity: int) -> list[str]:
    """The bank names of `capacity` free rows: patch the model with these."""
    return [f"{FREE}{i}" for i in range(capacity)]


def _bank_name(name: str, row: int) -> str:
    try:
        validate_name(name)
    except ValueError:
        return f"{SERVED}{row}"
    return f"{SERVED}{row}" if name.startswith(RESERVED) else name


class BankRows:
    """Which bank row serves which name, which rows are free, and how many requests use each.

    Thread-safe (its own lock); writing a row's values is the caller's `fill`, run outside the
    lock on a row that no request can see yet.
    """

    def __init__(self, bank: PrefixBank):
        self.bank = bank
        self.capacity = bank.num_entries
        self._lock = threading.Lock()
        self._rows: dict[str, int] = {}                 # served name -> row
        self._free = list(range(self.capacity))          # a heap: lowest row first
        self._users = [0] * self.capacity
        self._retired: set[int] = set()                  # hidden rows, freed when unused
        for row in range(self.capacity):
            bank.rename(row, f"{FREE}{row}")

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._rows)

    def users(self, row: int) -> int:
        return self._users[row]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def install(self, name: str, fill: Callable[[int], None], *, replace: bool = False) -> int:
        """Serve `name` from a free row that `fill(row)` writes; returns the row.

        replace=True: an existing `name` moves to the new row (its requests in flight keep the
        old one). Raises ValueError when the name is taken (replace=False) or no row is free;
        if `fill` raises, the row goes back to the free list and `name` is unchanged.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a prefix name must be a non-empty string, got {name!r}")
        with self._lock:
            self._check_install(name, replace)
            row = heapq.heappop(self._free)
        try:
            fill(row)
        except BaseException:
            with self._lock:
                heapq.heappush(self._free, row)
            raise
        with self._lock:
            try:
                self._check_install(name, replace, reserved=True)
            except ValueError:
                heapq.heappush(self._free, row)
                raise
            old = self._rows.get(name)
            if old is not None:
                self._retire(old)            # first: the bank's names stay distinct
            self._rows[name] = row
            self.bank.rename(row, _bank_name(name, row))
        return row

    def _check_install(self, name, replace, reserved=False):
        if name in self._rows and not replace:
            raise ValueError(f"a prefix named {name!r} is already served")
        if not reserved and not self._free:
            raise ValueError(f"the prefix bank is full ({self.capacity} prefixes, max_prefixes): "
                             "remove one first")

    def remove(self, name: str) -> None:
        """Stop serving `name`: new requests for it fail at once; its row is freed when unused."""
        with self._lock:
            row = self._rows.pop(name, None)
            if row is None:
                raise UnknownPrefix(name, sorted(self._rows))
            self._retire(row)

    def acquire(self, name: str) -> int:
        """The row serving `name`, held for one request until `release(row)`."""
        with self._lock:
            row = self._rows.get(str(name))
            if row is None:
                raise UnknownPrefix(name, sorted(self._rows))
            self._users[row] += 1
            return row

    def release(self, row: int) -> None:
        """One request lets go of `row` (acquired before)."""
        with self._lock:
            if self._users[row] <= 0:
                raise RuntimeError(f"bank row {row} released more often than acquired")
            self._users[row] -= 1
            self._free_if_unused(row)

    # -- under the lock --------------------------------------------------------------------------

    def _retire(self, row):
        self._retired.add(row)
        self.bank.rename(row, f"{RETIRED}{row}")
        self._free_if_unused(row)

    def _free_if_unused(self, row):
        if row in self._retired and self._users[row] == 0:
            self._retired.discard(row)
            self.bank.rename(row, f"{FREE}{row}")
            heapq.heappush(self._free, row)
