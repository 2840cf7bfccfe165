"""From an archiver config to something a server runs: the config read and checked
(``archive``, with each server's section in ``server_sections``), artefacts built, the self-test
run, and the ``.mar`` written with ``torch-model-archiver`` around a generated TorchServe entry
module (``torchserve_entry``). The command is ``python -m handlers.archive``."""
