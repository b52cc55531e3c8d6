"""A normal (non-editable) install makes ``twistd pymta`` available."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_pip_install_registers_the_twistd_plugin(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "var", "build", "*.egg-info", "__pycache__"))
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-2000:]
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert os.path.exists(os.path.join(site, "twisted", "plugins", "pymta_plugin.py"))
    assert os.path.exists(os.path.join(site, "pymta", "feedback", "rules.toml"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listing = subprocess.run([str(venv / "bin" / "python"), "-c", "from twisted.scripts.twistd import run; run()", "--help"],
                             capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=env)  # fmt: skip
    assert "pymta" in listing.stdout, listing.stdout[-1000:] + listing.stderr[-1000:]
    own = subprocess.run([str(venv / "bin" / "python"), "-c", "from twisted.scripts.twistd import run; run()", "pymta", "--help"],
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=env)  # fmt: skip
    assert "--config" in own.stdout
