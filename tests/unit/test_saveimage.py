"""libvirt save images cloned under another domain name and UUID (snapshot templates)."""

from __future__ import annotations

import pytest

from shim.errors import HypervisorError
from shim.vm import saveimage


def image(path, xml: bytes, stream: bytes, *, magic=saveimage.MAGIC, compressed=0):
    data = xml + b"\0" + b"<cookie/>\0" + b"\0" * 1024
    head = saveimage.HEADER.pack(magic, 2, len(data), 1, compressed, len(xml) + 1, *([0] * 14))
    path.write_bytes(head + data + stream)
    return len(head) + len(data)


def test_clone_renames_in_place_and_keeps_the_stream(tmp_path):
    xml = b"<domain><name>vmshim-aaaaaaaaaaaa</name><uuid>1111-2222</uuid></domain>"
    stream = bytes(range(256)) * 4096
    start = image(tmp_path / "t.img", xml, stream)
    saveimage.clone(tmp_path / "t.img", tmp_path / "c.img", {"aaaaaaaaaaaa": "bbbbbbbbbbbb", "1111-2222": "3333-4444"})
    out = (tmp_path / "c.img").read_bytes()
    assert out[start:] == stream
    assert b"vmshim-bbbbbbbbbbbb" in out[:start] and b"3333-4444" in out[:start]
    assert len(out) == (tmp_path / "t.img").stat().st_size


def test_clone_refuses_what_it_cannot_rewrite(tmp_path):
    image(tmp_path / "gz.img", b"<domain/>", b"x", compressed=1)
    image(tmp_path / "bad.img", b"<domain/>", b"x", magic=b"LibvirtQemudPart")
    for name in ("gz.img", "bad.img"):
        with pytest.raises(HypervisorError, match="not an uncompressed libvirt save image"):
            saveimage.clone(tmp_path / name, tmp_path / "c.img", {})
    image(tmp_path / "ok.img", b"<domain><name>x</name></domain>", b"x")
    with pytest.raises(HypervisorError, match="does not name"):
        saveimage.clone(tmp_path / "ok.img", tmp_path / "c.img", {"zzz": "yyy"})
    with pytest.raises(ValueError, match="keep its length"):
        saveimage.clone(tmp_path / "ok.img", tmp_path / "c.img", {"x": "yy"})
    (tmp_path / "short.img").write_bytes(b"Libvirt")
    with pytest.raises(HypervisorError, match="too short"):
        saveimage.clone(tmp_path / "short.img", tmp_path / "c.img", {})
