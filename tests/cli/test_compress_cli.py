"""`kvtier compress` and `kvtier decompress` (kvtier/cli/), as tests/cli/test_cli.py tests `move`:
`python -m kvtier.cli` in a subprocess, usage errors without a controller, then a real
kvtier_controller and a real CacheEngine instance (tests/controller/fleet_instance.py) whose disk
records the commands recode (read from its record files: the header's codec id)."""

from __future__ import annotations

import json

import pytest
from fleet_processes import CHUNK, MODEL, prompt, running_fleet, wait_hits, wait_up
from test_cli import at, failed, kvtier

from kvtier.codecs.base import CACHEGEN_ID, RAW_ID
from kvtier.record import HEADER_SIZE, decode_header

PROMPT = ["--model", MODEL, "--tokens-file", "-"]


@pytest.mark.parametrize("args, words", [
    (["compress", *PROMPT, "--codec", "cachegen-2", "--tier", "disk"], ["--instance"]),
    (["compress", *PROMPT, "--instance", "a", "--tier", "disk"], ["--codec"]),
    (["compress", *PROMPT, "--instance", "a", "--codec", "cachegen-2"], ["--tier"]),
    (["compress", *PROMPT, "--instance", "a", "--codec", "zstd", "--tier", "disk"],
     ["--codec", "cachegen-2"]),
    (["compress", *PROMPT, "--instance", "a", "--codec", "raw", "--tier", "Disk"], ["--tier"]),
    (["compress", *PROMPT, "--instance", "../etc", "--codec", "raw", "--tier", "disk"], ["--instance"]),
    (["decompress", *PROMPT], ["--instance"]),
    (["decompress", *PROMPT, "--instance", "a", "--tier", "no such"], ["--tier"]),
    (["decompress", *PROMPT, "--instance", "a", "--codec", "raw"], ["unrecognized", "--codec"]),
])
def test_usage_errors_exit_2_with_one_line(args, words):
    failed(kvtier(*args, stdin="1 2 3"), 2, *words)


def test_help_names_the_commands():
    run = kvtier("--help")
    assert run.returncode == 0 and "compress" in run.stdout and "decompress" in run.stdout
    run = kvtier("compress", "--help")
    assert run.returncode == 0 and "--codec C" in run.stdout and "--tier T" in run.stdout


# -- a real instance -----------------------------------------------------------------------------

def disk_codecs(instance) -> list[int]:
    folder = instance.folder / "disk" / instance.info["namespace"]
    return sorted(decode_header(path.read_bytes()[:HEADER_SIZE]).codec for path in folder.rglob("*.kvr"))


def test_a_real_instance_through_the_cli(tmp_path):
    with running_fleet(tmp_path / "fleet") as fleet:
        controller = fleet.start_controller()
        [engine] = fleet.start_instances(["cli-recode"])
        wait_up(controller.client(), ["cli-recode"])
        seed, n = 70, 4 * CHUNK
        tokens_file = tmp_path / "tokens.txt"
        tokens_file.write_text(" ".join(map(str, prompt(seed, n))))
        assert engine.store(seed, n) == 4
        wait_hits(controller.client(), prompt(seed, n), {"cli-recode": n}, "the stored chunks indexed")

        def command(*args: str):
            return at(controller, *args, "--model", MODEL, "--tokens-file", str(tokens_file),
                      "--instance", "cli-recode")

        run = command("compress", "--codec", "cachegen-2", "--tier", "disk")
        assert run.returncode == 0 and run.stderr == "", run.stderr
        assert run.stdout.startswith("compressed 4 chunks in disk with cachegen-2 on 1 instance")
        assert disk_codecs(engine) == [CACHEGEN_ID] * 4
        run = command("--json", "decompress")
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == {"results": [{"instance_id": "cli-recode", "chunks": 4}]}
        assert disk_codecs(engine) == [RAW_ID] * 4
        run = command("decompress", "--tier", "disk")
        assert run.returncode == 0 and run.stdout.startswith("decompressed 0 chunks in disk on 1 instance")

        failed(command("compress", "--codec", "cachegen-2", "--tier", "cpu"), 1, "400", "raw KV")
        failed(command("compress", "--codec", "cachegen-2", "--tier", "nvme"), 1, "400", "nvme")
        failed(at(controller, "decompress", *PROMPT, "--instance", "nobody", stdin="1"), 5, "404", "nobody")
