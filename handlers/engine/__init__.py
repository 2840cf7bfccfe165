"""The batch engine: plain Python, no torch, no server. It schedules one batch of requests
through parallel preprocessing, micro-batched model calls and scatter (``batch_engine``), on
thread pools (``pool``), with clocks and deadlines (``clocks``), micro-batch sizing strategies
(``sizing``), one outcome per request (``outcome``), per-request errors (``errors``), the split
of a model output into one answer per request (``scatter``), the one object that owns a model
call's retries (``model_call``), the one owner of "this worker must be replaced" (``health``),
admission under overload (``admission``) and the settings it all reads (``settings``). Internal: the public names are in :mod:`handlers`."""
