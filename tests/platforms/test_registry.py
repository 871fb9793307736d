"""Tests for kvtier/platforms/registry.py: the built-in platforms, the KVTIER_PLATFORM choice, and
an out-of-tree platform package (tests/platforms/fake_platform) installed with pip into a temporary
folder and picked up through the `kvtier.platforms` entry points in a fresh process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.platforms import all_platforms, current_platform, platform_for
from kvtier.platforms.cpu import CpuPlatform
from kvtier.platforms.cuda import CudaPlatform

PACKAGE = Path(__file__).with_name("fake_platform")


def test_cpu_and_cuda_are_built_in_and_a_machine_without_a_gpu_uses_the_cpu():
    known = all_platforms()
    assert isinstance(known["cpu"], CpuPlatform) and isinstance(known["cuda"], CudaPlatform)
    if not known["cuda"].available():  # (this test machine has no GPU)
        assert current_platform(env={}).name == "cpu"
        assert known["cuda"].capabilities() == {"pinned_memory": False, "async_copies": False, "gds": False,
                                                "paged_copy_kernel": False}


def test_kvtier_platform_names_one_and_a_bad_name_is_an_error_naming_the_known_ones():
    assert current_platform(env={"KVTIER_PLATFORM": "cpu"}).name == "cpu"
    with pytest.raises(ValueError, match=r"KVTIER_PLATFORM='tpu': no such platform; known: \['cpu', 'cuda'"):
        current_platform(env={"KVTIER_PLATFORM": "tpu"})
    if not CudaPlatform().available():
        with pytest.raises(ValueError, match="KVTIER_PLATFORM='cuda': that platform is not available"):
            current_platform(env={"KVTIER_PLATFORM": "cuda"})


def test_a_tensor_s_device_type_chooses_its_platform_and_torch_serves_the_unclaimed_ones():
    assert platform_for("cpu").name == "cpu" and platform_for("cuda:1").name == "cuda"
    meta = platform_for("meta")  # a device no platform claims: torch alone, copies synchronous
    assert (type(meta).__name__, meta.name) == ("TorchPlatform", "meta")
    assert meta.capabilities()["async_copies"] is False


_PROBE = """
import json, logging, torch
logging.basicConfig(level=logging.ERROR, format="%(message)s")
import kvtier_fake_platform
from kvtier.memory import MemoryPool
from kvtier.platforms import all_platforms, current_platform, platform_for
pool = MemoryPool(1 << 16, 4096)  # host memory from the current platform
cache = torch.arange(2 * 1 * 3 * 2 * 1 * 2, dtype=torch.float32).reshape(2, 1, 3, 2, 1, 2)
print(json.dumps({"known": sorted(all_platforms()), "current": current_platform().name,
                  "for_meta": platform_for("meta").name, "cpu": type(all_platforms()["cpu"]).__name__,
                  "asked": kvtier_fake_platform.ASKED, "pinned": pool.pinned,
                  "gather": current_platform().gather_blocks(cache, [2, 0], 3).flatten().tolist()}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The fake platform package, pip-installed (no index, no dependencies) into a folder of its own."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PACKAGE, root / "src")  # (a build writes beside the sources)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--no-build-isolation", "--target", str(root / "site"), str(source)],
                   check=True, capture_output=True, timeout=50)
    return root / "site"


def probe(site: Path, **env: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=50,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), **env}, check=True)
    return json.loads(done.stdout), done.stderr


def test_an_installed_platform_package_is_discovered_and_picked(installed):
    found, log = probe(installed)
    assert found["known"] == ["a-driverless", "cpu", "cuda", "fake"] and found["current"] == "fake"
    assert found["for_meta"] == "fake" and found["cpu"] == "CpuPlatform"  # a plugin cannot take "cpu"
    assert found["asked"] == [["host_buffer", 65536 + 4096, False]] and found["pinned"] is False
    assert found["gather"] == [8, 9, 10, 11, 0, 1] + [20, 21, 22, 23, 12, 13]  # blocks 2, 0: 3 tokens
    assert "'broken' (kvtier_fake_platform:fails) failed to load" in log
    assert "'cpu' (kvtier_fake_platform:make) skipped: the name is taken" in log
    # First by name, but its available() raised: logged, and the next plugin is taken.
    assert "platform plugin 'a-driverless': available() failed; not used" in log


def test_kvtier_platform_still_chooses_a_built_in_one_over_an_installed_plugin(installed):
    found, _ = probe(installed, KVTIER_PLATFORM="cpu")
    assert found["current"] == "cpu" and found["asked"] == []
