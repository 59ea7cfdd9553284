"""The bytes behind an `image_url`: a `data:` URL decoded here, an `http(s)://` URL fetched.

A fetch is bounded three ways, so one request cannot tie the gateway up: a byte cap (checked
against Content-Length first, then while reading), a total timeout, and the response's
Content-Type must be an image type. Every failure is an `ImageFetchError` (a ValueError) whose
message tells the client what went wrong with its URL; the handler answers 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import urllib.parse

import aiohttp

__all__ = ["ImageFetchError", "ImageFetcher", "decode_data_url"]

logger = logging.getLogger(__name__)

_MAX_REDIRECTS = 3
_CHUNK = 64 * 1024


class ImageFetchError(ValueError):
    """An image URL that gave no usable bytes (bad data URL, unreachable, not an image, too big)."""


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageFetchError("a data URL needs a ',' before its data: data:image/png;base64,...")
    params = header[len("data:"):].split(";")
    media_type = params[0].strip().lower()
    if not media_type.startswith("image/"):
        raise ImageFetchError(f"a data URL image must have an image/* media type, got {media_type or 'none'!r}")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageFetchError("a data URL image must be base64-encoded (data:image/png;base64,...)")
    payload = payload.strip()
    if len(payload) // 4 * 3 > max_bytes + 3:  # decoding it would already exceed the cap
        raise ImageFetchError(f"the image is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageFetchError("the data URL's base64 data is invalid") from None
    if len(data) > max_bytes:
        raise ImageFetchError(f"the image is {len(data)} bytes; at most {max_bytes} are allowed")
    return data


class ImageFetcher:
    """Fetches image URLs for the gateway over one pooled aiohttp session (opened on first use)."""

    def __init__(self, max_bytes: int, timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, url: str) -> bytes:
        """The image bytes behind `url` (data:, http:, https:), or ImageFetchError."""
        if not isinstance(url, str) or not url:
            raise ImageFetchError("the image URL must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return decode_data_url(url, self.max_bytes)
        if scheme not in ("http", "https"):
            raise ImageFetchError(f"image URLs must be data:, http: or https: URLs, got {_short(url)!r}")
        if not urllib.parse.urlsplit(url).hostname:
            raise ImageFetchError(f"the image URL has no host: {_short(url)!r}")
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._get(url)
        except TimeoutError:
            raise ImageFetchError(f"fetching the image at {_short(url)} took longer than {self.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise ImageFetchError(f"the image at {_short(url)} could not be fetched: "
                                  f"{type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # yarl / aiohttp refusing the URL itself
            if isinstance(exc, ImageFetchError):
                raise
            raise ImageFetchError(f"the image URL is invalid: {exc}") from None

    async def _get(self, url: str) -> bytes:
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession()
        async with session.get(url, max_redirects=_MAX_REDIRECTS, allow_redirects=True) as response:
            where = _short(url)
            if response.status != 200:
                raise ImageFetchError(f"the image at {where} could not be fetched: HTTP {response.status}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if not content_type.startswith("image/"):
                raise ImageFetchError(f"the URL {where} is not an image: its content type is "
                                      f"{content_type or 'missing'!r}")
            if response.content_length is not None and response.content_length > self.max_bytes:
                raise ImageFetchError(f"the image at {where} is {response.content_length} bytes; at most "
                                      f"{self.max_bytes} are allowed")
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > self.max_bytes:
                    raise ImageFetchError(f"the image at {where} is larger than {self.max_bytes} bytes")
            return bytes(body)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
