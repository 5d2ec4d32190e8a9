"""The `cpt` dispatcher: help, version, and that each command imports only its own side."""

import subprocess
import sys

from cpt.shared import __version__
from cpt.shared.cli import SUMMARIES, main


def test_version_prints_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cpt {__version__}"


def test_help_lists_every_registered_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUMMARIES:
        assert name in out


def test_unknown_command_fails_with_the_choices(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "cpt.shared", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"cpt {__version__}"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_trainer_side_never_imports_beam():
    done = run_python(
        "import sys, cpt.trainer.run, cpt.trainer.loop, cpt.trainer.evaluate, cpt.trainer.data.check;"
        "bad = [m for m in sys.modules if m.startswith(('apache_beam', 'cpt.pipelines'))]; assert not bad, bad[:5]"
    )
    assert done.returncode == 0, done.stderr


def test_shared_imports_neither_side():
    done = run_python(
        "import sys, cpt.shared.cli, cpt.shared.demo, cpt.shared.experiment, cpt.shared.dataset, cpt.shared.config;"
        "bad = [m for m in sys.modules if m.startswith(('cpt.pipelines', 'cpt.trainer', 'apache_beam', 'torch'))];"
        "assert not bad, bad[:5]"
    )
    assert done.returncode == 0, done.stderr
