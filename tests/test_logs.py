"""Logs an operator can use (issue 12): levels by config (at start and on reload), the HTTP access log without
secrets, and records sent to the systemd journal with NODE=, MAC=, DEPLOYMENT=, STEP= fields.

The journal tests bind their own Unix datagram socket in a temporary directory, never the real journal's.
"""
from __future__ import annotations

import array
import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from yarl import URL

from appliance.config import LogConfig, load_config
from appliance.logs import JournalHandler, LogLevels, encode_journal, under_journal
from domain.logfields import fields
from netboot.http import HttpSettings
from netboot.httplog import ACCESS_LOGGER, redact_target
from test_appliance import free_port, write_config
from test_config import MINIMAL_CONFIG, MINIMAL_NODES, problems_of, write
from test_http_service import NODE1, client_from, started

# ---------------------------------------------------------------- levels by config


def test_the_log_section_is_read_and_checked_with_file_and_line(tmp_path: Path) -> None:
    text = MINIMAL_CONFIG + "log:\n  level: WARNING\n  http_access: true\n  levels:\n    rackboot.dhcp: debug\n    aiohttp.server: error\n"
    cfg = load_config(write(tmp_path, text, MINIMAL_NODES)).log
    assert cfg == LogConfig(level="warning", levels=(("rackboot.dhcp", "debug"), ("aiohttp.server", "error")), http_access=True)
    assert load_config(write(tmp_path, MINIMAL_CONFIG, MINIMAL_NODES)).log == LogConfig()
    bad = MINIMAL_CONFIG + "log:\n  level: loud\n  http_access: yes please\n  colour: true\n  levels:\n    rackboot.dhcp: verbose\n"
    problems = problems_of(write(tmp_path, bad, MINIMAL_NODES))
    lines = len(MINIMAL_CONFIG.splitlines())
    path = tmp_path / "rackboot.yaml"
    assert f"{path}:{lines + 2}: log.level: expected a log level: debug | info | warning | error | critical, got 'loud'" in problems
    assert f"{path}:{lines + 6}: log.levels.rackboot.dhcp: expected a log level: debug | info | warning | error | critical, got 'verbose'" in problems
    assert any(p.startswith(f"{path}:{lines + 3}: log.http_access: expected true or false") for p in problems)
    assert any(p.startswith(f"{path}:{lines + 4}: log.colour: unknown key") for p in problems)
    assert any("log.levels: expected a mapping" in p
               for p in problems_of(write(tmp_path, MINIMAL_CONFIG + "log:\n  levels: debug\n", MINIMAL_NODES)))


@pytest.fixture
def root_level() -> Iterator[None]:
    """Put the root logger's level and the loggers these tests name back as they were."""
    names = ("rackboot.test_logs.a", "rackboot.test_logs.b", ACCESS_LOGGER)
    saved = logging.getLogger().level, {n: logging.getLogger(n).level for n in names}
    yield
    logging.getLogger().setLevel(saved[0])
    for name, level in saved[1].items():
        logging.getLogger(name).setLevel(level)


def test_levels_are_applied_and_a_reload_undoes_what_it_no_longer_names(root_level: None) -> None:
    logging.getLogger().setLevel(logging.INFO)  # as `rackboot serve` sets it
    levels = LogLevels()
    levels.apply(LogConfig(level="error", levels=(("rackboot.test_logs.a", "debug"),)))
    assert logging.getLogger().level == logging.ERROR
    assert logging.getLogger("rackboot.test_logs.a").getEffectiveLevel() == logging.DEBUG
    assert not logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)  # the access log is off by default
    levels.apply(LogConfig(levels=(("rackboot.test_logs.b", "warning"),), http_access=True))  # a reload
    assert logging.getLogger().level == logging.INFO  # back to the command line's
    assert logging.getLogger("rackboot.test_logs.a").level == logging.NOTSET  # no longer named: its parent's
    assert logging.getLogger("rackboot.test_logs.b").level == logging.WARNING
    assert logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)


# ---------------------------------------------------------------- the HTTP access log

CLF = re.compile(r'^127\.0\.0\.\d+ - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "(GET|POST) (\S+) HTTP/1\.1" \d{3} (\d+|-)$')


def test_secrets_in_paths_and_queries_are_redacted() -> None:
    assert redact_target("/boot/52-54-00-77-00-01.ipxe", "") == "/boot/52-54-00-77-00-01.ipxe"
    assert redact_target("/images/abc123", "") == "/images/<redacted>"
    assert redact_target("/callback/x", "stage=boot&token=s3&Token=s4&to%6Ben=s5&api_key=s6&x=1") == \
        "/callback/x?stage=boot&token=<redacted>&Token=<redacted>&to%6Ben=<redacted>&api_key=<redacted>&x=1"
    assert redact_target("/api/v1/nodes", "token") == "/api/v1/nodes?token=<redacted>"


async def test_the_access_log_is_common_log_format_and_carries_no_token(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    secrets = [f"SECRET{n}x" for n in range(6)]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "other.txt").write_text("other\n")
    app = await started(HttpSettings(address=ipaddress.IPv4Address("127.0.0.1"), port=free_port(socket.SOCK_STREAM), files=tmp_path / "files",
                                     ipxe_dir=tmp_path, nbp_names=(), interface="lo"))
    base = app.base
    try:
        with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
            async with client_from(str(NODE1.ip)) as node:
                async with node.get(f"{base}/boot/52-54-00-77-00-01.ipxe") as r:
                    assert r.status == 200
                async with node.get(f"{base}/callback/52-54-00-77-00-01?stage=ipxe&status=ok&token={secrets[0]}") as r:
                    assert r.status == 200
                async with node.post(f"{base}/callback/52-54-00-77-00-01", json={"stage": "installed", "token": secrets[1]}) as r:
                    assert r.status == 403
                async with node.get(f"{base}/images/{secrets[2]}") as r:
                    assert r.status == 403
                async with node.get(URL(f"{base}/files/other.txt?to%6Ben={secrets[3]}", encoded=True),
                                    headers={"Authorization": f"Bearer {secrets[4]}", "Cookie": f"s={secrets[5]}"}) as r:
                    assert r.status == 200
        records = [r for r in caplog.records if r.name == ACCESS_LOGGER]
        lines = [r.getMessage() for r in records]
        assert len(lines) == 5 and all(CLF.match(line) for line in lines), lines
        assert [CLF.match(line).group(2) for line in lines] == [  # type: ignore[union-attr]
            "/boot/52-54-00-77-00-01.ipxe", "/callback/52-54-00-77-00-01?stage=ipxe&status=ok&token=<redacted>",
            "/callback/52-54-00-77-00-01", "/images/<redacted>", "/files/other.txt?to%6Ben=<redacted>"]
        assert not [s for s in secrets if any(s in line for line in lines)]
        assert [getattr(r, "mac", None) for r in records] == ["52:54:00:77:00:01"] * 3 + [None, None]
        caplog.clear()
        async with client_from(str(NODE1.ip)) as node:  # off (the default): nothing logged
            async with node.get(f"{base}/boot/52-54-00-77-00-01.ipxe") as r:
                assert r.status == 200
        assert not [r for r in caplog.records if r.name == ACCESS_LOGGER]
    finally:
        await app.http.close()


# ---------------------------------------------------------------- the systemd journal, native protocol


def parse_native(data: bytes) -> dict[str, str]:
    """Decode a native-protocol record (independently of the encoder): FIELD=value lines, or FIELD, u64 LE size, value."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = nl + 1
        else:
            name, size = line, int.from_bytes(data[nl + 1:nl + 9], "little")
            value = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
        assert re.fullmatch(rb"[A-Z][A-Z0-9_]*", name), name
        out[name.decode()] = value.decode()
    return out


def test_the_native_encoding_of_a_field_with_a_newline_is_length_prefixed() -> None:
    assert encode_journal([("MESSAGE", "one\ntwo"), ("MAC", "52:54:00:77:00:01")]) == (
        b"MESSAGE\n" + (7).to_bytes(8, "little") + b"one\ntwo\n" + b"MAC=52:54:00:77:00:01\n")


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, logging.Logger, JournalHandler]]:
    """A Unix datagram socket standing for the journal's, and a logger whose handler sends there."""
    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    handler = JournalHandler(str(path))
    logger = logging.getLogger("rackboot.test_logs.journal")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield sock, logger, handler
    finally:
        logger.removeHandler(handler)
        handler.close()
        sock.close()


def test_records_reach_the_journal_with_the_nodes_fields(journal: tuple[socket.socket, logging.Logger, JournalHandler]) -> None:
    sock, logger, _ = journal
    logger.warning("d-1: %s failed in %s\nsecond line", "node-7", "boot",
                   extra=fields(node="node-7", mac="52:54:00:77:00:07", deployment="d-1", step="boot"))
    record = parse_native(sock.recv(65536))
    assert record["MESSAGE"] == "d-1: node-7 failed in boot\nsecond line"
    assert (record["PRIORITY"], record["SYSLOG_IDENTIFIER"], record["LOGGER"]) == ("4", "rackboot", "rackboot.test_logs.journal")
    assert (record["NODE"], record["MAC"], record["DEPLOYMENT"], record["STEP"]) == ("node-7", "52:54:00:77:00:07", "d-1", "boot")
    assert record["CODE_FILE"] == __file__ and int(record["CODE_LINE"]) > 0
    logger.debug("no node here")
    record = parse_native(sock.recv(65536))
    assert record["PRIORITY"] == "7" and not {"NODE", "MAC", "DEPLOYMENT", "STEP"} & set(record)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("with a traceback")
    record = parse_native(sock.recv(65536))
    assert record["PRIORITY"] == "3" and "Traceback" in record["MESSAGE"] and "ValueError: boom" in record["MESSAGE"]


def test_a_record_too_large_for_a_datagram_goes_in_a_sealed_memfd(
        journal: tuple[socket.socket, logging.Logger, JournalHandler]) -> None:
    sock, logger, handler = journal
    handler.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    big = "x" * 100_000
    logger.info("%s", big, extra=fields(mac="52:54:00:77:00:01"))
    data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4))
    assert data == b"" and ancillary[0][:2] == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", ancillary[0][2][:4])[0]
    try:
        record = parse_native(os.pread(fd, 1 << 20, 0))
    finally:
        os.close(fd)
    assert record["MESSAGE"] == big and record["MAC"] == "52:54:00:77:00:01"


def test_a_journal_that_cannot_be_reached_gets_the_record_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    handler = JournalHandler(str(tmp_path / "absent.socket"))
    handler.fallback.stream = sys.stderr  # capsys replaced stderr after the handler was made
    try:
        handler.handle(logging.LogRecord("rackboot.x", logging.ERROR, __file__, 1, "lost %s", ("not",), None))
    finally:
        handler.close()
    assert "ERROR rackboot.x: lost not" in capsys.readouterr().err


def test_the_journal_is_used_only_when_stderr_is_the_journal_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "journal.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, (tmp_path / "stream").open("w") as stream:
        sock.bind(str(sock_path))
        st = os.fstat(stream.fileno())
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not under_journal(stream.fileno(), str(sock_path))  # not started by systemd
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journal(stream.fileno(), str(sock_path))
        assert not under_journal(stream.fileno(), str(tmp_path / "absent"))
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # stderr redirected since: not the journal
        assert not under_journal(stream.fileno(), str(sock_path))


# ---------------------------------------------------------------- rackboot serve: at start and on SIGHUP


def test_serve_applies_the_log_section_at_start_and_on_sighup(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port())
    base = path.read_text()
    path.write_text(base + "log:\n  http_access: true\n")
    out = tmp_path / "serve.log"
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(path)], stdout=sink,
                                stderr=subprocess.STDOUT)
    http_base = load_config(path).http_base

    def wait_for(text: str, count: int = 1) -> None:
        deadline = time.monotonic() + 30
        while out.read_text().count(text) < count:
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)

    def get(path: str) -> None:
        with contextlib.suppress(urllib.error.HTTPError), urllib.request.urlopen(http_base + path, timeout=10):
            pass

    try:
        wait_for("appliance bound on")
        get("/boot/52-54-00-77-00-01.ipxe")
        get("/callback/52-54-00-77-00-01?stage=ipxe&token=SECRETx1")
        wait_for('"GET /callback/52-54-00-77-00-01?stage=ipxe&token=<redacted> HTTP/1.1" 200')
        assert '"GET /boot/52-54-00-77-00-01.ipxe HTTP/1.1" 200' in out.read_text()
        # the access log off again, the root at warning, the appliance's own logger at info: applied by a reload
        path.write_text(base + "log:\n  level: warning\n  levels:\n    rackboot.appliance: info\n")
        os.kill(proc.pid, signal.SIGHUP)
        wait_for("; log levels applied")
        before = out.read_text().count("rackboot.http.access")
        get("/boot/52-54-00-77-00-02.ipxe")
        time.sleep(0.5)
        assert out.read_text().count("rackboot.http.access") == before  # the access log is off now
        assert "SECRETx1" not in out.read_text()
        path.write_text(base + "log:\n  level: chatty\n")  # refused with its line: nothing changes
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(f"reload refused, nothing changed: {path}:")
        assert "log.level: expected a log level" in out.read_text() and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)
