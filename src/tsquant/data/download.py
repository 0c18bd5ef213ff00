"""Small, dependency-free downloader: atomic writes, short timeout, optional MD5 check."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from .errors import DataError

DEFAULT_TIMEOUT_S = 15.0


def md5sum(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file (used only as an integrity check, not for security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_url(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    hint: str = "",
) -> Path:
    """Download `url` to `dest` atomically; raise DataError (with `hint` as the fix) on failure."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - fixed URLs
                shutil.copyfileobj(resp, out, length=1 << 20)
            out.flush()
            os.fsync(out.fileno())
        if md5 is not None and (got := md5sum(tmp)) != md5:
            raise DataError(
                f"download of {url} is corrupt (md5 {got}, expected {md5}): "
                f"retry, or {hint or 'fetch the file manually'}"
            )
        os.replace(tmp, dest)
    except DataError:
        raise
    except Exception as exc:  # URLError, timeout, HTTP errors, disk errors ...
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"download of {url} failed ({type(exc).__name__}: {reason}): "
            f"{hint or 'check the network or fetch the file manually'}"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest
