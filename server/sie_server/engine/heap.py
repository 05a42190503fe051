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
"""

from __future__ import annotations

import gc

from sie_server.engine.model_thread import free_device_memory


def settle() -> None:
    """Exempt what is alive now from the cyclic collector (until ``reclaim`` or ``release``)."""
    gc.freeze()


def release() -> None:
    """Hand the settled objects back to the cyclic collector."""
    gc.unfreeze()


def reclaim() -> None:
    """Collect everything, the settled objects included (a model went), and settle again."""
    gc.unfreeze()
    try:
        free_device_memory()
    finally:
        settle()
