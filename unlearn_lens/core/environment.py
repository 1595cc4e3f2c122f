"""Broken environments in one line: what failed outside the program, and what to do about it.

A missing object-store credential, a server that refuses the connection, a full disk or a
read-only folder is not a bug of this program, yet the libraries underneath (botocore, aiohttp,
fsspec, the OS) raise their own exceptions for it. ``explain`` recognises them anywhere in an
exception's chain (by class name and errno, so this module imports none of those libraries) and
returns the ``error:`` line the user reads; ``cli.py`` and the pipeline call it before calling
anything an internal error. Standard library only, like the rest of the core.
"""

from __future__ import annotations

import errno
import re
from typing import Iterator

#: botocore's exceptions for credentials that are missing or cannot be read
_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                "NoAuthTokenError", "UnauthorizedSSOTokenError", "SSOTokenLoadError"}
#: exceptions for an endpoint that cannot be reached (botocore, aiohttp, the standard library)
_CONNECTION = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ProxyConnectionError",
               "ClientConnectorError", "ClientConnectorDNSError", "ClientConnectionError", "ServerDisconnectedError",
               "ServerTimeoutError", "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError",
               "gaierror", "NewConnectionError", "MaxRetryError"}
#: S3 error codes for credentials that exist but are refused
_DENIED_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
                 "AllAccessDisabled")
#: what to do about object-store credentials (never a flag: the standard AWS environment)
CREDENTIALS_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment, "
                   "and AWS_ENDPOINT_URL for a store other than AWS")
#: the libraries object stores are reached through (an exception from one of them is remote)
_STORE_LIBRARIES = {"botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "google"}
RESUME = "rerunning the same command resumes what finished"


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or while handling, once each."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _where(exc: BaseException, where: str | None) -> str:
    filename = getattr(exc, "filename", None)
    return str(filename) if filename else (where or "")


def explain(exc: BaseException, where: str | None = None, *, writing: str | None = None) -> str | None:
    """The one-line cause and fix of an environment failure in ``exc``'s chain, or None for anything else.

    ``where`` names what was being read or written (a cache URL, an output folder), when the caller
    knows; ``writing`` the command's output location, named when a write fails without a file name.
    """
    found = list(chain(exc))
    names = [type(e).__name__ for e in found]
    prefix = f"{where}: " if where else ""
    remote = _is_remote(where) or any(type(e).__module__.split(".")[0] in _STORE_LIBRARIES for e in found)
    if any(name in _CREDENTIALS for name in names):
        return f"{prefix}no object-store credentials found; {CREDENTIALS_FIX}"
    for e in found:
        code = _s3_code(e)
        if code in _DENIED_CODES or (isinstance(e, PermissionError) and remote):
            return (f"{prefix}the object store refused the credentials or this access ({code or _first_line(e)}); "
                    f"check that the key pair is valid and may read and write this bucket ({CREDENTIALS_FIX})")
        if code == "NoSuchBucket" or "bucket does not exist" in str(e):
            return f"{prefix}the bucket does not exist; create it first or correct the URL"
    for e in found:
        if type(e).__name__ in _CONNECTION or isinstance(e, ConnectionError):
            return (f"{prefix}cannot connect ({_first_line(e)}); check that the server is up and the address "
                    "(the URL, or AWS_ENDPOINT_URL for an object store) is right")
    for e in found:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            place = _where(e, where or writing)
            return (f"no space left on the device{' writing ' + place if place else ''}; free some space or "
                    f"write somewhere else, then {RESUME}")
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            place = _where(e, where)
            what = "read-only file system" if e.errno == errno.EROFS else "permission denied"
            return f"{what}{': ' + place if place else ''}; choose a folder you can write (or fix its permissions)"
    return None


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (or of a message quoting one), else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    match = re.search(r"\((" + "|".join(_DENIED_CODES + ("NoSuchBucket",)) + r")\)", str(exc))
    return match.group(1) if match else None


def _is_remote(where: str | None) -> bool:
    return bool(where) and "://" in str(where) and not str(where).startswith("file://")
