"""The launcher's memory settings (videochat.launch.tritonserver.MemoryOptions): what reaches tritonserver's
command line, and that `serve` rejects bad values before starting anything."""
from __future__ import annotations

import pytest
from support.paths import TINY

from videochat.errors import UserError
from videochat.launch import launcher
from videochat.launch.tritonserver import Endpoints, MemoryOptions, TritonInstall, server_args

INSTALL = TritonInstall(binary=TINY / "bin" / "tritonserver", backends=TINY / "backends", lib_dirs=())


def args_of(memory: MemoryOptions) -> list[str]:
    return server_args(INSTALL, TINY, Endpoints(), shm_prefix="p_", exit_timeout_s=5, memory=memory)


def test_default_growth_step_reaches_the_python_backend():
    assert "--backend-config=python,shm-growth-byte-size=67108864" in args_of(MemoryOptions())
    assert "--backend-config=python,shm-growth-byte-size=1048576" in args_of(MemoryOptions(shm_growth_mb=1))
    # the region prefix (cleanup of crashed stubs' regions relies on it) is still there
    assert "--backend-config=python,shm-region-prefix-name=p_" in args_of(MemoryOptions())


def test_serve_flag_defaults_are_the_dataclass():
    args = launcher.build_parser().parse_args([])
    assert launcher.memory_from_args(args) == MemoryOptions()
    args = launcher.build_parser().parse_args(["--shm-growth-mb", "256"])
    assert launcher.memory_from_args(args).shm_growth_mb == 256


@pytest.mark.parametrize("value", ["0", "-1"])
def test_serve_rejects_a_growth_step_below_one_mib(value, tmp_path):
    with pytest.raises(UserError, match="shm_growth_mb must be >= 1"):
        launcher.main(["--checkpoint", str(TINY), "--device", "cpu", "--work-dir", str(tmp_path), "--render-only",
                       "--shm-growth-mb", value])
