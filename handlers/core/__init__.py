"""The handler core: :class:`~handlers.core.handler.MicroBatchHandler` (hooks, start-up, the
engine on a device), the :class:`~handlers.core.request.Request` every server hands it and the
encoded answers it gives back (``responses``), client data checks (``client_data``), the one
loader of a user's handler or model file (``handler_file``), model loading (``loading``), the
start-up self-test on samples (``self_test``), batch metrics (``metrics``) and which accelerator
errors leave the device unusable (``accelerator_errors``). It knows no server. Internal: the
public names are in :mod:`handlers`."""
