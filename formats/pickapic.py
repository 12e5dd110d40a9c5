"""The Pick-a-Pic v2 preference parquet: what ``synpref export`` writes and ``train`` / ``eval-rewards`` read.

One definition of the schema (Kirstain et al. 2023, arXiv 2305.01569), of the columns a reader needs and of
how an image cell is stored (raw bytes in the release; ``{"bytes", "path"}`` in Hugging Face image columns).
"""
from __future__ import annotations

import fsspec
import pyarrow as pa

from ..core.fileio import expand_locations

# Column for column as released.
PICKAPIC_V2_SCHEMA = pa.schema([
    ("caption", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("image_0_uid", pa.string()),
    ("image_1_uid", pa.string()),
    ("image_0_url", pa.string()),
    ("image_1_url", pa.string()),
    ("best_image_uid", pa.string()),
    ("are_different", pa.bool_()),
    ("has_label", pa.bool_()),
    ("ranking_id", pa.int64()),
    ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()),
    ("created_at", pa.timestamp("ns")),
])

# What a reader of preference pairs needs: the prompt, both images, and which one people preferred
# (label_0 = 1: image 0, 0: image 1, 0.5: a tie).
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def image_bytes(value):
    """An image cell's bytes: Pick-a-Pic stores bytes, HF image columns store {"bytes": ..., "path": ...}."""
    return value.get("bytes") if isinstance(value, dict) else value


def parquet_files(location: str) -> list[str]:
    """The Parquet files a location names: a file, a glob, or a folder (its ``*.parquet``, else those below
    it, as the published Pick-a-Pic v2 keeps them in ``data/``), local or any fsspec URL, sorted."""
    fs, path = fsspec.core.url_to_fs(location)
    if fs.isdir(path) and not fs.glob(path.rstrip("/") + "/*.parquet"):
        location = location.rstrip("/") + "/**/*.parquet"
    try:
        return expand_locations([location], "parquet")
    except FileNotFoundError:
        raise FileNotFoundError(f"no Parquet files at {location!r}: give a .parquet file, a glob or a folder "
                                "of them") from None
