"""`pip install .` gives a working server: the project is built as a wheel and installed into a fresh venv
(its third-party dependencies are borrowed from the test's own environment through a .pth file, so the
test needs no network and no second torch install), then `python -m videochat serve` runs from a directory
outside the checkout and answers a request; the repository it renders holds no links into the checkout."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from support.paths import ROOT, TINY
from support.server import TritonHandle, serve_process


def _installed_venv(tmp: Path) -> Path:
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True)
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Only the dependencies: a path listed in a .pth is not itself a site dir, so the editable install of the
    # checkout that lives there (its own .pth finder) is not loaded.
    Path(site, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    *map(str, wheels.glob("videochat_server-*.whl"))], check=True)
    return python


def test_pip_install_then_serve_from_another_directory(tmp_path):
    python = _installed_venv(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import videochat, videochat_client, preprocessing; "
                            "print(videochat.__file__, videochat_client.__file__, preprocessing.__file__)"],
                           cwd=elsewhere, check=True, capture_output=True, text=True).stdout.split()
    assert all(str(tmp_path / "venv") in path for path in where), where

    work = tmp_path / "work"
    with serve_process(str(python), ["--checkpoint", str(TINY), "--work-dir", str(work),
                                     "--preprocess-instances", "1"], cwd=elsewhere) as serving:
        repo = work / "model_repository"
        assert not [p for p in repo.rglob("*") if p.is_symlink()]
        assert not [p for p in repo.rglob("*.py") if str(ROOT) in p.read_text()]
        answer = TritonHandle(None, serving.grpc_url).stream(
            video=(TINY / "videos" / "example1.mp4").read_bytes(), prompt="What is this?", max_new_tokens=4)
        assert 1 <= answer.usage.completion_tokens <= 4
    assert serving.proc.returncode == 0, serving.output[-3000:]
