"""The batching policy: which pending items run together. Pure logic, no threads, no loop.

* Items are grouped by key (settings that can share one forward pass).
* Fair between requests: each batch is built around an anchor item that it always holds, the
  oldest pending item of the request that has had the fewest items batched so far (ties: the
  oldest). A one-text query behind a 1,024-item bulk request rides in the next batch instead of
  waiting for the whole bulk; when every request has one item this is simply the oldest item.
  Every request's service grows with each batch it anchors, so no item starves.
* Within the group, items are sorted by cost (token count) and the batch is a contiguous window
  of that order: similar lengths, little padding.
* The window respects the token budget on *padded* cost (longest x count), the item cap and the
  padding cap (padding at most ``max_padding`` of the padded tokens), and among the windows
  holding the oldest item it takes the most items, then the least padding. Items left out wait
  for a batch of lengths like theirs.
* But not for long: a request's last pending item that has been passed over ``max_skips`` times
  (by batches of its own group and kind) rides in the next one, padding cap or not, as far as
  the token budget and the item cap allow (the oldest such items first). Without this, a text
  whose length is far from its neighbours' waits through several batches of later arrivals,
  and the tail of closed-loop traffic grows to two or three batch times. Only the last item of
  a request counts: the others cannot end their request sooner by riding early.
* Bulk work (streamed requests) yields to interactive work: an interactive item anchors before
  any bulk item, and its batch holds interactive items only (bulk items would lengthen its forward
  pass). A bulk batch may get tighter limits (``bulk_limits``: the executor sets them while
  interactive traffic is about), so that an interactive arrival waits at most a short batch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate

from sie_server.engine.work import WorkItem


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_tokens: int
    max_batch_items: int
    #: Largest share of a batch's padded tokens that may be padding (1.0: no cap).
    max_padding: float = 1.0
    #: Batches a request's last pending item may be passed over for before it rides in the
    #: next one whatever its padding (None: never forced).
    max_skips: int | None = None


@dataclass(slots=True)
class Batch:
    items: list[WorkItem]

    @property
    def tokens(self) -> int:
        return sum(item.cost for item in self.items)

    @property
    def padded_tokens(self) -> int:
        return max((item.cost for item in self.items), default=0) * len(self.items)


class PendingQueue:
    """Admitted items not yet in a batch, grouped by key."""

    def __init__(self) -> None:
        self._groups: dict[Hashable, list[WorkItem]] = {}
        self._count = 0
        self._cost = 0
        #: Per request with pending items: how many are pending, and how many were batched.
        self._pending_of: dict[int, int] = {}
        self._served: dict[int, int] = {}
        self._bulk = 0

    def __len__(self) -> int:
        return self._count

    @property
    def cost(self) -> int:
        return self._cost

    @property
    def bulk(self) -> int:
        """Bulk items pending."""
        return self._bulk

    def push(self, item: WorkItem) -> None:
        self._groups.setdefault(item.key, []).append(item)
        self._count += 1
        self._cost += item.cost
        self._bulk += item.bulk
        self._pending_of[item.request] = self._pending_of.get(item.request, 0) + 1

    def others_pending(self, requests: Collection[int]) -> bool:
        """Whether items of requests other than ``requests`` are pending. Safe to ask from
        another thread: it reads a count and tests membership, never iterates the queue."""
        return len(self._pending_of) > sum(1 for request in requests if request in self._pending_of)

    def __iter__(self) -> Iterator[WorkItem]:
        for group in self._groups.values():
            yield from group

    def discard(self, item: WorkItem) -> bool:
        """Take ``item`` out if it is still pending (its caller left, or its deadline passed)."""
        group = self._groups.get(item.key)
        if group is None or not any(member is item for member in group):
            return False
        self._set_group(item.key, [member for member in group if member is not item])
        return True

    def remove_where(self, predicate: Callable[[WorkItem], bool]) -> list[WorkItem]:
        """Take out every item the predicate accepts (dead or expired work)."""
        removed: list[WorkItem] = []
        for key in list(self._groups):
            keep: list[WorkItem] = []
            for item in self._groups[key]:
                (removed if predicate(item) else keep).append(item)
            self._set_group(key, keep)
        return removed

    def _full_keys(self, limits: BatchLimits) -> list[Hashable]:
        return [
            key
            for key, group in self._groups.items()
            if len(group) >= limits.max_batch_items
            or sum(i.cost for i in group) >= limits.max_batch_tokens
        ]

    def has_full_batch(self, limits: BatchLimits) -> bool:
        """Whether some group could fill a batch on its own (worth preparing ahead)."""
        return bool(self._full_keys(limits))

    def take_batch(
        self,
        limits: BatchLimits,
        *,
        full_only: bool = False,
        bulk_limits: BatchLimits | None = None,
    ) -> Batch | None:
        """The batch of the group holding the anchor (``anchor_order``); with ``full_only``
        (preparing ahead while the model runs), of the oldest group that can fill a batch, so the
        prepared slot never holds a small batch of another group while a full one waits. The
        batch holds items of the anchor's kind only (interactive or bulk); a bulk batch is held
        to ``bulk_limits`` when given."""
        keys = self._full_keys(limits) if full_only else list(self._groups)
        if not keys:
            return None
        anchor = min(
            (item for key in keys for item in self._groups[key]),
            key=self.anchor_order,
        )
        group = self._groups[anchor.key]
        if anchor.bulk and bulk_limits is not None:
            limits = bulk_limits
        ordered = sorted((i for i in group if i.bulk == anchor.bulk), key=lambda item: item.cost)
        costs = [item.cost for item in ordered]
        lo, hi = _best_window(costs, ordered.index(anchor), limits, self._overdue(ordered, limits))
        chosen = ordered[lo : hi + 1]
        taken = {id(item) for item in chosen}
        for item in chosen:
            self._served[item.request] = self._served.get(item.request, 0) + 1
        for item in ordered[:lo] + ordered[hi + 1 :]:
            item.skips += 1
        self._set_group(anchor.key, [item for item in group if id(item) not in taken])
        return Batch(items=chosen)

    def _overdue(self, ordered: list[WorkItem], limits: BatchLimits) -> list[int]:
        """Indexes in ``ordered`` of the items that must ride next (``max_skips``), oldest first."""
        if limits.max_skips is None:
            return []
        overdue = [
            index
            for index, item in enumerate(ordered)
            if item.skips >= limits.max_skips and self._pending_of[item.request] == 1
        ]
        return sorted(overdue, key=lambda index: ordered[index].seq)

    def _set_group(self, key: Hashable, items: list[WorkItem]) -> None:
        before = self._groups.get(key, [])
        staying = {id(item) for item in items}
        for item in before:
            if id(item) not in staying:
                self._left(item.request)
        self._count += len(items) - len(before)
        self._cost += sum(i.cost for i in items) - sum(i.cost for i in before)
        self._bulk += sum(i.bulk for i in items) - sum(i.bulk for i in before)
        if items:
            self._groups[key] = items
        else:
            self._groups.pop(key, None)

    def _left(self, request: int) -> None:
        left = self._pending_of[request] - 1
        if left:
            self._pending_of[request] = left
        else:  # the request has nothing queued any more: forget it
            del self._pending_of[request]
            self._served.pop(request, None)

    def anchor_order(self, item: WorkItem) -> tuple[bool, int, int]:
        """The order anchors are chosen in: interactive before bulk, then the fewest items
        batched for its request, then the oldest."""
        return (item.bulk, self._served.get(item.request, 0), item.seq)


def _best_window(
    costs: list[int], must: int, limits: BatchLimits, overdue: Sequence[int] = ()
) -> tuple[int, int]:
    """The window [lo, hi] of sorted ``costs`` holding index ``must`` with the most items under
    the limits (padded cost = costs[hi] * count), then the least padding. A window of one is
    always allowed. ``overdue`` (indexes, most urgent first) are held too, each as far as the
    token budget and the item cap allow, padding cap or not; a window wider than those may pad
    as much as they force, or the cap, whichever is more. The scan is bounded by the item cap:
    O(max_batch_items^2) at worst."""
    prefix = [0, *accumulate(costs)]

    def padding(lo: int, hi: int) -> int:
        return costs[hi] * (hi - lo + 1) - (prefix[hi + 1] - prefix[lo])

    first, last = must, must
    for index in overdue:
        lo, hi = min(first, index), max(last, index)
        count = hi - lo + 1
        if count <= limits.max_batch_items and costs[hi] * count <= limits.max_batch_tokens:
            first, last = lo, hi
    forced_count, forced_padding = last - first + 1, padding(first, last)
    forced_padded = costs[last] * forced_count

    def allowed(pad: int, padded: int) -> bool:  # the cap, or the forced window's share
        return pad <= limits.max_padding * padded or pad * forced_padded <= forced_padding * padded

    best = (first, last)
    best_rank = (forced_count, -forced_padding)
    for hi in range(last, min(len(costs), first + limits.max_batch_items)):
        by_tokens = max(1, limits.max_batch_tokens // max(costs[hi], 1))
        width = min(by_tokens, limits.max_batch_items)
        # Fewer, longer items pad less: the first lo under the padding cap is the widest.
        for lo in range(max(0, hi - width + 1), first + 1):
            count = hi - lo + 1
            padded = costs[hi] * count
            pad = padding(lo, hi)
            if count == 1 or allowed(pad, padded):
                rank = (count, -pad)
                if rank > best_rank:
                    best, best_rank = (lo, hi), rank
                break
    return best
