"""Writing WebDataset shards: deterministic tar members, image checks, DALI index files.

A sample is four contiguous members named `<key>.<ext>`: the image (`.jpg` bytes as found, or
`.png`), `.cls` (ASCII label), `.id` (ASCII global id, zero-padded to `ID_WIDTH` digits) and
`.json`. The key is the sample's position in the shuffled plan, so it is fixed before any image
is read; the dense id is only known once every earlier shard has counted its rejects, so shards
are written with a placeholder id and `patch_ids` writes the final ids in place (tar checksums
cover headers only, and the width never changes).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

ID_WIDTH = 10  # up to 10^10 samples per split
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TAR_BLOCK = 512


class ImageRejected(Exception):
    """The bytes are not a decodable image; the message is the reason written to rejected.txt."""


def prepare_image(data: bytes | np.ndarray) -> tuple[str, bytes]:
    """Check that `data` decodes and return (extension, bytes to store).

    JPEG and PNG keep their original bytes. JPEGs are decoded at 1/8 scale (libjpeg DCT scaling):
    every entropy-coded block is still parsed, so truncation and corruption are caught, at a
    fraction of a full decode. Other formats (GIF, BMP, ... found in web crawls) are re-encoded as
    PNG. Pixel arrays (idx files) are encoded as PNG.
    """
    if isinstance(data, np.ndarray):
        return "png", encode_png(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            if data.startswith(JPEG_MAGIC):
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"image too large to decode safely: {exc}") from None
    except Exception as exc:  # PIL raises many types for bad data; all mean "not decodable"
        raise ImageRejected(f"not a decodable image: {type(exc).__name__}: {exc}") from None
    if data.startswith(JPEG_MAGIC):
        return "jpg", data
    if data.startswith(PNG_MAGIC):
        return "png", data
    return "png", encode_png(np.asarray(image.convert("RGB")))


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class WrittenSample:
    position: int  # position in the shuffled plan (the key)
    sample_offset: int  # byte offset of the sample's first tar header
    id_offset: int  # byte offset of the .id member's data (patched at finalize)
    label: int


class ShardWriter:
    """A tar writer with fixed metadata (mtime 0, uid 0, mode 0644): the same input gives the same
    bytes. Records every member's offsets for the DALI index and the manifest."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[WrittenSample] = []
        self.index_lines: list[str] = []

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header_offset = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        return header_offset, header_offset + TAR_BLOCK

    def add_sample(self, position: int, ext: str, image: bytes, label: int, meta: dict) -> None:
        key = f"{position:0{ID_WIDTH}d}"
        members = [
            (ext, image),
            ("cls", str(label).encode()),
            ("id", b"0" * ID_WIDTH),  # placeholder, see patch_ids
            ("json", json.dumps(meta, sort_keys=True).encode()),
        ]
        index_parts, sample_offset, id_offset = [], None, None
        for suffix, data in members:
            header_offset, data_offset = self._add(f"{key}.{suffix}", data)
            sample_offset = header_offset if sample_offset is None else sample_offset
            if suffix == "id":
                id_offset = data_offset
            index_parts.append(f"{suffix} {data_offset} {len(data)} {key}.{suffix}")
        self.index_lines.append(" ".join(index_parts))
        self.samples.append(WrittenSample(position, sample_offset, id_offset, label))

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def write_dali_index(self, path: str) -> None:
        """DALI's webdataset index (the format of its `wds2idx` tool, v1.2): a header line
        `v1.2 <num_samples>`, then per sample its members as `ext data_offset size name`. Tests
        compare it byte for byte with DALI's own `wds2idx` output."""
        write_atomic(path, ("\n".join([f"v1.2 {len(self.samples)}", *self.index_lines]) + "\n").encode())


def patch_ids(tar_path: str, id_offsets: list[int], ids: list[int]) -> None:
    """Write the final dense ids into the fixed-width `.id` members, in place."""
    with open(tar_path, "r+b") as f:
        for offset, sample_id in zip(id_offsets, ids):
            f.seek(offset)
            f.write(f"{sample_id:0{ID_WIDTH}d}".encode())
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.partial"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
