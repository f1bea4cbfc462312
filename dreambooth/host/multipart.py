"""A large file to S3 in parts that outlive a failure: the upload's id is kept in the outbox's
manifest (storage.Manifest), and the retry (`python -m dreambooth upload`) asks the store which
parts it holds, sends only the others and completes the upload. Parts are storage.PART bytes, so
the object's ETag is the one storage.digest predicts and the result is verified as any upload.
Used for s3 URLs through s3fs's own client (no other package); other stores send whole files.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable


def resumable(fs, size: int, part: int) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return size > part and any(p in ("s3", "s3a") for p in protocols) and hasattr(fs, "call_s3")


def put_in_parts(fs, path: str, local: Path, part: int, upload_id: str | None,
                 keep: Callable[[str | None], None],
                 on_bytes: Callable[[int, int], None] | None = None) -> int:
    """Send `local` to `path` in parts, continuing `upload_id` where the store still holds it;
    `keep` records the id (None once complete). The number of the first part sent now."""
    bucket, key, _ = fs.split_path(path)
    held = _parts_held(fs, bucket, key, upload_id) if upload_id else None
    if held is None:
        upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        keep(upload_id)
        held = {}
    size, parts, first_sent = local.stat().st_size, [], 0
    with open(local, "rb") as f:
        while chunk := f.read(part):
            n = len(parts) + 1
            there = held.get(n)
            if there and there["Size"] == len(chunk) \
                    and there["ETag"].strip('"') == hashlib.md5(chunk).hexdigest():
                etag = there["ETag"]
            else:
                etag = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                                  PartNumber=n, Body=chunk)["ETag"]
                first_sent = first_sent or n
            parts.append({"PartNumber": n, "ETag": etag})
            if on_bytes is not None:
                on_bytes(min(n * part, size), size)
    fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
               MultipartUpload={"Parts": parts})
    keep(None)
    return first_sent or len(parts) + 1


def _parts_held(fs, bucket: str, key: str, upload_id: str) -> dict | None:
    """Part number -> {Size, ETag} of the parts the store holds; None when the upload is gone
    (completed, aborted or expired): then a new one starts."""
    held, marker = {}, 0
    try:
        while True:
            page = fs.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=upload_id,
                              PartNumberMarker=marker)
            held.update({p["PartNumber"]: p for p in page.get("Parts", [])})
            if not page.get("IsTruncated"):
                return held
            marker = page["NextPartNumberMarker"]
    except Exception:  # NoSuchUpload, or a store without it: start over, nothing lost
        return None
