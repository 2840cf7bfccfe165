"""One adapter per server, each the only module that knows its server: TorchServe
(``torchserve``: ``initialize``/``handle`` and its context), Ray Serve (``ray_serve``: the
deployment and its HTTP; ``ray_cluster``: a private local cluster on loopback with HAProxy in
front) and the test kit's in-process server (``local``, exported as
:class:`handlers.testing.LocalServer`). The commands are ``python -m handlers.torchserve_config``
and ``python -m handlers.ray_serve``."""
