"""Regressions from a new user's trial of main (issue 31, "The journey, round 3"): each test
names what the user met."""

import subprocess

from tests.docs_blocks import ROOT


def test_make_serve_passes_serve_args_to_the_serve_script():
    """`make serve` had no way to ask for free ports: the Makefile passed no arguments through."""
    dry_run = subprocess.run(["make", "-n", "serve", "SERVE_ARGS=--free-ports --workdir /tmp/x"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
    [serve] = [line for line in dry_run.stdout.splitlines() if "-m scripts.serve" in line]
    assert serve.endswith("-m scripts.serve --free-ports --workdir /tmp/x"), serve
    readme = (ROOT / "README.md").read_text()
    assert "make serve\nSERVE_ARGS=--free-ports" in readme or "make serve SERVE_ARGS=--free-ports" in readme
