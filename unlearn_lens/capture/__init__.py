"""Activation capture (issues 3 and 24): one nnsight trace per batch, written through ``cache_store``.

- ``settings``: what one capture is asked to do (``CaptureSettings``, ``CaptureRun``);
- ``inputs``: every split tokenised up front, so the cache layout is known before any forward;
- ``selection``: which layers, token positions and arrays are kept (``--layers``,
  ``--token-sample``, ``--variables``);
- ``plan``: the cache's size and time from the config and tokenizer alone (``--plan``, free space);
- ``forward``: one batch through the model (``BatchRunner``);
- ``arrays``: what a split's cache holds (the arrays the forward fills and the static ones);
- ``provenance``: what the cache was captured from (fingerprints, versions);
- ``run``: the capture loop (``capture``, ``run_capture``).
"""

from unlearn_lens.capture.arrays import dynamic_arrays, static_arrays, wmdp_static
from unlearn_lens.capture.forward import BatchRunner
from unlearn_lens.capture.run import KILL_ENV, batches, capture, capture_split, plan_only, run_capture
from unlearn_lens.capture.selection import Selection
from unlearn_lens.capture.settings import CaptureRun, CaptureSettings

__all__ = ["KILL_ENV", "BatchRunner", "CaptureRun", "CaptureSettings", "Selection", "batches", "capture",
           "capture_split", "dynamic_arrays", "plan_only", "run_capture", "static_arrays", "wmdp_static"]
