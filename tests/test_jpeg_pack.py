"""benchmarks/device/jpeg_pack.py: a zip of JPEGs packed with shared headers comes back byte for byte."""

import importlib.util
import io
import zipfile

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

spec = importlib.util.spec_from_file_location("jpeg_pack", REPO / "benchmarks" / "device" / "jpeg_pack.py")
jpeg_pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(jpeg_pack)


def _zip_of_jpegs(path, n=6):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75 + i % 2)
            z.writestr(f"train/cls{i % 2}/{i:04d}.jpg", buf.getvalue())
        z.writestr("README.txt", "not a jpeg")
    return path


def test_pack_shares_headers_and_unpacks_byte_for_byte(tmp_path):
    src = _zip_of_jpegs(tmp_path / "data.zip")
    info = jpeg_pack.pack(src, tmp_path / "data.pack")
    assert info["entries"] == 7 and info["headers"] == 2  # two JPEG qualities: two distinct table sets
    jpeg_pack.unpack(tmp_path / "data.pack", tmp_path / "back.zip")
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(tmp_path / "back.zip") as b:
        assert a.namelist() == b.namelist()
        assert all(a.read(n) == b.read(n) for n in a.namelist())
    with pytest.raises(SystemExit, match="exists"):
        jpeg_pack.unpack(tmp_path / "data.pack", tmp_path / "back.zip")


def test_a_damaged_pack_is_refused(tmp_path):
    jpeg_pack.pack(_zip_of_jpegs(tmp_path / "data.zip"), tmp_path / "data.pack")
    raw = bytearray((tmp_path / "data.pack").read_bytes())
    raw[-1] ^= 0xFF  # the last header's last byte
    (tmp_path / "data.pack").write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match="does not match its original"):
        jpeg_pack.unpack(tmp_path / "data.pack", tmp_path / "back.zip")
    assert not (tmp_path / "back.zip").exists() and not (tmp_path / "back.zip.tmp").exists()
