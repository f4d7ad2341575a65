"""Image sinks: each compression, raw and tar, corrupted and truncated streams, checksum mismatches."""
from __future__ import annotations

import gzip
import hashlib
import io
import tracemalloc
import lzma
import os
import tarfile
from pathlib import Path
from typing import Callable

import pytest
import zstandard

from broadcast.errors import ImageError
from broadcast.decompress import make_decompressor
from broadcast.image import AsyncImageSink, ImageSink, SinkSpec, sha256_file

COMPRESS = {
    "gzip": lambda b: gzip.compress(b, compresslevel=1),
    "zstd": lambda b: zstandard.ZstdCompressor(level=1).compress(b),
    "xz": lambda b: lzma.compress(b, preset=0),
    "none": lambda b: b,
}


def raw_payload() -> bytes:
    """1.5 MiB: random data, a run of zeros (sparse), more random data."""
    rnd = os.urandom(512 * 1024)
    return rnd + bytes(1 << 20) + rnd[:1000]


def tar_payload() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in (("etc/hostname", b"node\n", 0o644), ("usr/bin/tool", os.urandom(300_000), 0o4755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("etc/localtime")
        link.type, link.linkname = tarfile.SYMTYPE, "/usr/share/zoneinfo/UTC"
        tar.addfile(link)
    return buf.getvalue()


def feed(sink: ImageSink, data: bytes, chunk: int = 65536) -> None:
    for i in range(0, len(data), chunk):
        sink.write(data[i : i + chunk])


@pytest.mark.parametrize("compression", ["gzip", "zstd", "xz", "none"])
def test_raw_each_compression(tmp_path: Path, compression: str) -> None:
    payload = raw_payload()
    stream = COMPRESS[compression](payload)
    target = tmp_path / "disk.img"
    spec = SinkSpec(kind="raw", compression=compression, target=str(target), expected_sha256=hashlib.sha256(stream).hexdigest(),
                    expected_size=len(stream), expected_written_sha256=hashlib.sha256(payload).hexdigest())
    sink = ImageSink(spec)
    feed(sink, stream, chunk=7777)  # odd chunk size: headers split across chunks
    report = sink.finish()
    assert report.ok, report.reason
    assert report.bytes_received == len(stream) and report.bytes_written == len(payload)
    assert target.read_bytes() == payload


@pytest.mark.parametrize("compression", ["gzip", "zstd", "xz", "none"])
def test_tar_each_compression(tmp_path: Path, compression: str) -> None:
    payload = tar_payload()
    stream = COMPRESS[compression](payload)
    spec = SinkSpec(kind="tar", compression=compression, target=str(tmp_path / "root"), expected_sha256=hashlib.sha256(stream).hexdigest())
    sink = ImageSink(spec)
    feed(sink, stream)
    report = sink.finish()
    assert report.ok, report.reason
    assert report.files == 3
    assert (tmp_path / "root/etc/hostname").read_bytes() == b"node\n"
    assert (tmp_path / "root/usr/bin/tool").stat().st_mode & 0o7777 == 0o4755  # a rootfs keeps setuid bits
    assert os.readlink(tmp_path / "root/etc/localtime") == "/usr/share/zoneinfo/UTC"


def test_raw_at_offset_sparse(tmp_path: Path) -> None:
    payload = raw_payload()
    target = tmp_path / "disk.img"
    target.write_bytes(b"MBR!" + bytes(4092))
    sink = ImageSink(SinkSpec(kind="raw", compression="zstd", target=str(target), offset=4096, sparse=True))
    feed(sink, COMPRESS["zstd"](payload), chunk=1 << 20)
    assert sink.finish().ok
    assert target.read_bytes()[:4] == b"MBR!"
    assert sha256_file(target, 4096, len(payload)) == hashlib.sha256(payload).hexdigest()
    assert target.stat().st_size == 4096 + len(payload)


def test_tar_refuses_escaping_paths(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    sink = ImageSink(SinkSpec(kind="tar", compression="none", target=str(tmp_path / "root")))
    feed(sink, buf.getvalue())
    report = sink.finish()
    assert not report.ok and "Member name contains '..'" in report.reason, report.reason
    assert not (tmp_path / "evil").exists()


def test_tar_never_writes_through_a_link_it_extracted(tmp_path: Path) -> None:
    """A root filesystem holds absolute links (etc/alternatives, systemd's unit links): they are kept as they are, but
    a member whose path goes through one (etc -> /outside, then etc/passwd) must not land outside the root."""
    outside = tmp_path / "outside"
    outside.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("etc")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        tar.addfile(link)
        unit = tarfile.TarInfo("lib/ssh.service")
        unit.size = 3
        tar.addfile(unit, io.BytesIO(b"svc"))
        wants = tarfile.TarInfo("wants/ssh.service")
        wants.type, wants.linkname = tarfile.SYMTYPE, "/lib/ssh.service"
        tar.addfile(wants)
        evil = tarfile.TarInfo("etc/passwd")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    root = tmp_path / "root"
    sink = ImageSink(SinkSpec(kind="tar", compression="none", target=str(root)))
    feed(sink, buf.getvalue())
    sink.finish()
    assert not (outside / "passwd").exists()
    assert os.readlink(root / "wants/ssh.service") == "/lib/ssh.service"  # absolute links are kept as they are


@pytest.mark.parametrize("compression", ["gzip", "zstd", "xz"])
def test_truncated_stream_detected(tmp_path: Path, compression: str) -> None:
    stream = COMPRESS[compression](raw_payload())
    sink = ImageSink(SinkSpec(kind="raw", compression=compression, target=str(tmp_path / "d")))
    feed(sink, stream[: len(stream) - 100])
    report = sink.finish()
    assert not report.ok and "truncated" in report.reason


def test_truncated_uncompressed_detected_by_size_and_checksum(tmp_path: Path) -> None:
    stream = raw_payload()
    digest = hashlib.sha256(stream).hexdigest()
    sink = ImageSink(SinkSpec(kind="raw", compression="none", target=str(tmp_path / "d"), expected_size=len(stream)))
    feed(sink, stream[:-1])
    assert "size mismatch" in sink.finish().reason
    sink = ImageSink(SinkSpec(kind="raw", compression="none", target=str(tmp_path / "d"), expected_sha256=digest))
    feed(sink, stream[:-1])
    assert "sha256 mismatch" in sink.finish().reason


@pytest.mark.parametrize("compression", ["gzip", "zstd", "xz"])
def test_corrupted_stream_detected(tmp_path: Path, compression: str) -> None:
    stream = bytearray(COMPRESS[compression](raw_payload()))
    digest = hashlib.sha256(stream).hexdigest()
    stream[len(stream) // 2] ^= 0xFF
    sink = ImageSink(SinkSpec(kind="raw", compression=compression, target=str(tmp_path / "d"), expected_sha256=digest))
    feed(sink, bytes(stream))
    report = sink.finish()
    assert not report.ok
    # either the decompressor or the checksum catches it; the checksum of what was received always differs
    assert report.sha256 != digest


def test_corrupted_tar_detected(tmp_path: Path) -> None:
    stream = bytearray(tar_payload())
    stream[100:110] = b"garbage!!!"  # inside the first header: its checksum no longer matches
    sink = ImageSink(SinkSpec(kind="tar", compression="none", target=str(tmp_path / "root")))
    feed(sink, bytes(stream))
    report = sink.finish()
    assert not report.ok and "tar" in report.reason


def test_multi_member_gzip_and_multi_frame_zstd() -> None:
    for comp, stream in (("gzip", gzip.compress(b"a" * 1000) + gzip.compress(b"b" * 10)),
                         ("zstd", zstandard.ZstdCompressor().compress(b"a" * 1000) + zstandard.ZstdCompressor().compress(b"b" * 10))):
        dec = make_decompressor(comp)
        pieces: list[bytes] = []
        dec.feed(stream, pieces.append)
        out = b"".join(pieces)
        dec.finish()
        assert out == b"a" * 1000 + b"b" * 10


@pytest.mark.parametrize("comp", ["zstd", "gzip", "xz"])
def test_decompression_holds_one_piece_at_a_time(comp: str) -> None:
    """A whole-disk image is mostly zeros: 256 MiB of them fit in a few KiB of zstd (RLE blocks). Decompressing
    them must never hold more than a piece or two (the deploy environment has 1 GiB: collected, they killed it)."""
    size = 256 << 20
    compress = {"zstd": zstandard.ZstdCompressor().compress, "gzip": gzip.compress, "xz": lzma.compress}[comp]
    stream = compress(bytes(size))
    assert len(stream) < size // 500
    dec = make_decompressor(comp)
    sizes: list[int] = []
    tracemalloc.start()
    try:
        dec.feed(stream, lambda piece: sizes.append(len(piece)))
        dec.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(sizes) == size and max(sizes) <= 1 << 20
    assert peak < 24 << 20, f"{peak / 2**20:.0f} MiB held at once"  # xz's decoder keeps an 8 MiB dictionary


def test_bad_spec_rejected() -> None:
    with pytest.raises(ImageError):
        SinkSpec(kind="raw", compression="lz4", target="/x")
    with pytest.raises(ImageError):
        SinkSpec.from_json({"kind": "raw", "compression": "none", "target": "/x", "evil": 1})
    spec = SinkSpec(kind="tar", compression="xz", target="/mnt/x")
    assert SinkSpec.from_json(spec.to_json()) == spec


async def test_async_sink_and_abort(tmp_path: Path) -> None:
    payload = raw_payload()
    stream = COMPRESS["gzip"](payload)
    sink = AsyncImageSink(SinkSpec(kind="raw", compression="gzip", target=str(tmp_path / "d")), max_queued=2)
    await sink.start()
    for i in range(0, len(stream), 10000):
        await sink.put(stream[i : i + 10000])
    report = await sink.close()
    assert report.ok and report.sha256 == hashlib.sha256(stream).hexdigest()
    sink = AsyncImageSink(SinkSpec(kind="raw", compression="gzip", target=str(tmp_path / "e")))
    await sink.start()
    await sink.put(stream[:5000])
    report = await sink.abort("upstream lost")
    assert not report.ok and report.reason == "upstream lost"


async def test_async_sink_open_failure(tmp_path: Path) -> None:
    sink = AsyncImageSink(SinkSpec(kind="raw", compression="none", target=str(tmp_path / "no/such/dir/d")))
    await sink.start()
    await sink.put(b"abc")
    report = await sink.close()
    assert not report.ok and "cannot open" in report.reason and report.bytes_received == 3


def test_a_whole_disk_image_zeroes_a_block_device_without_writing_its_zero_runs(loop_device: Callable[[int], str]) -> None:
    """Runs of zeros (most of a whole-disk image) go to the device as BLKZEROOUT, and land as zeros over old data
    (that it is faster shows in tests/e2e/test_deploy_qemu.py, where written zeros stalled the chain under TCG)."""
    device = loop_device(96)
    with open(device, "wb") as f:  # what a previous deployment left
        f.write(b"\xff" * (96 << 20))
    image = os.urandom(4096) + bytes(90 << 20) + os.urandom(5000) + bytes(777)  # odd sizes: unaligned run ends
    stream = zstandard.ZstdCompressor().compress(image)
    sink = ImageSink(SinkSpec(kind="raw", compression="zstd", target=device, expected_sha256=hashlib.sha256(stream).hexdigest()))
    feed(sink, stream)
    report = sink.finish()
    assert report.ok, report.reason
    assert sha256_file(device, 0, len(image)) == hashlib.sha256(image).hexdigest()
    with open(device, "rb") as f:
        f.seek(len(image))
        assert f.read(16) == b"\xff" * 16  # nothing past the image was touched
