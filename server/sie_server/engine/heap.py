"""The loaded models kept out of the cyclic garbage collector's way.

A loaded model is hundreds of thousands of long-lived container objects (its torch modules, its
tokenizer, and the modules of torch and transformers themselves). Python's cyclic collector
traverses every one of them on each full collection, holding the GIL: with MiniLM on a CPU a
full collection took about 300 ms, during which neither the event loop nor the compute thread
ran. Under overload the calls queued and refused allocate enough for one every half minute or
so (docs/reliability.md).

* ``settle()`` after a model loads: ``gc.freeze()`` moves every object the collector tracks into
  its permanent generation, which collections skip. Objects there are still freed by reference
  counting; only cyclic garbage present at that moment waits for the next ``reclaim`` or
  ``release``.
* ``reclaim()`` when a model is evicted: ``gc.unfreeze()``, then ``free_device_memory`` (a full
  collection finds the evicted model's cycles, and CUDA's cache is emptied), then ``settle``.
* ``release()`` when a load fails (what it built may have been settled by another model's load
  meanwhile) and when the registry closes: ``gc.unfreeze()`` alone, so the collector finds
  what is garbage in its own time; the next load settles again.
* ``epoch()`` counts the settles. Something smaller than a model that goes (a LoRA adapter)
  records the epoch when it arrives, and ``reclaim_if_settled_since(epoch)`` when it goes: only
  if a model's load settled the heap meanwhile can its cycles be frozen, and only then does its
  eviction pay for a full collection.

The calls may come from the event loop and from worker threads; one lock orders them, so a
freeze never lands in the middle of another thread's collection.
"""

from __future__ import annotations

import gc
import threading

from sie_server.engine.model_thread import free_device_memory

_lock = threading.Lock()
_settles = 0


def settle() -> None:
    """Exempt what is alive now from the cyclic collector (until ``reclaim`` or ``release``)."""
    with _lock:
        _freeze()


def _freeze() -> None:
    """``gc.freeze()`` and count it (the lock held)."""
    global _settles
    gc.freeze()
    _settles += 1


def release() -> None:
    """Hand the settled objects back to the cyclic collector."""
    with _lock:
        gc.unfreeze()


def epoch() -> int:
    """How many times the heap was settled so far."""
    return _settles


def reclaim() -> None:
    """Collect everything, the settled objects included (a model went), and settle again."""
    with _lock:
        gc.unfreeze()
        try:
            free_device_memory()
        finally:
            _freeze()


def reclaim_if_settled_since(since: int) -> bool:
    """``reclaim`` when the heap was settled after epoch ``since`` (what arrived then may be
    frozen); whether it ran."""
    if epoch() <= since:
        return False
    reclaim()
    return True
