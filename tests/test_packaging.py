"""A normal (non-editable) install makes ``twistd pymta`` available."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_pip_install_registers_the_twistd_plugin(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The new environment sees this interpreter's packages (twisted and the other dependencies)
    # through a path file, whether this interpreter is a system Python or itself a virtual
    # environment (``--system-site-packages`` would reach past a venv to the base Python).
    # Path files found in those directories are not processed, so an editable install of pymta
    # there stays invisible: only the copy installed below can register the plugin.
    outer = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    with open(os.path.join(inner, "outer-site.pth"), "w") as f:
        f.write("".join(path + "\n" for path in sorted(outer)))
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".ruff_cache", ".pytest_cache",
    ))
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-2000:]
    site = inner
    assert os.path.exists(os.path.join(site, "twisted", "plugins", "pymta_plugin.py"))
    assert os.path.exists(os.path.join(site, "pymta", "feedback", "rules.toml"))
    assert os.path.exists(os.path.join(site, "pymta", "wordings.toml"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listing = subprocess.run([str(venv / "bin" / "python"), "-c", "from twisted.scripts.twistd import run; run()", "--help"],
                             capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=env)  # fmt: skip
    assert "pymta" in listing.stdout, listing.stdout[-1000:] + listing.stderr[-1000:]
    own = subprocess.run([str(venv / "bin" / "python"), "-c", "from twisted.scripts.twistd import run; run()", "pymta", "--help"],
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=env)  # fmt: skip
    assert "--config" in own.stdout
