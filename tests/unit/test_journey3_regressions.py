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


def test_every_torchserve_the_docs_start_or_stop_has_a_tmpdir_of_its_own():
    """The walkthrough ended with a bare `torchserve --stop`: with the default TMPDIR it stops
    whichever TorchServe's pid file is in /tmp, perhaps someone else's."""
    from tests.docs_blocks import all_blocks

    commands = []
    for block in all_blocks():
        for command in block.text.replace("\\\n", " ").splitlines():
            if "torchserve --st" in command:
                commands.append((block.where(), command))
    assert any("--stop" in command for _, command in commands)
    for where, command in commands:
        assert "TMPDIR=" in command.split("torchserve --st")[0], f"{where}: {command}"
