"""``S3Store``: objects in an S3 bucket (AWS, Ceph RGW, MinIO, any S3-compatible server).

The only module that imports boto3/botocore.  One boto3 client per store
(clients are thread-safe), with a pool of ``max_pool`` keep-alive connections:
the S3 limiter in ``threads.py`` should not exceed it.

Storage URL (the ``--bucket`` of ``format``):

* ``http://HOST:PORT/BUCKET`` or ``https://HOST[:PORT]/BUCKET``: an S3-compatible
  endpoint, path-style addressing (``/BUCKET/KEY``), which every server supports.
  For ``http://`` TLS settings are ignored (``verify=False``), so a machine-wide
  ``AWS_CA_BUNDLE`` cannot break a plain-HTTP endpoint; ``https://`` honours it.
* ``s3://BUCKET``: AWS S3 itself (default endpoint; botocore picks the
  addressing style and follows region redirects).

Credentials: ``access_key``/``secret_key`` if given, else ``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``.  With neither, ``s3://`` uses botocore's default chain
(profiles, instance roles) and an explicit endpoint sends unsigned (anonymous)
requests.  Region: ``region``, else ``AWS_REGION``/``AWS_DEFAULT_REGION``, else
``us-east-1``.  Checksums are computed only when an operation requires them, as
third-party servers reject botocore's newer default trailers.

Retries are ours, not botocore's (its retries are off): see ``retry.py`` for the
policy.  Errors, each with a one-line message:

=====================================================  =================================
botocore failure                                       raised
=====================================================  =================================
404 / ``NoSuchKey`` on an object                       ``NoSuchKey`` (not retried)
``NoSuchBucket`` (or 404 on the bucket)                ``NoSuchBucket`` (not retried)
403, ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``  ``AccessDenied`` (not retried)
connection refused/reset, timeouts, 5xx, 408, 429,     retried, then
``SlowDown``/throttling, truncated or corrupt bodies   ``ObjectStoreError("ENDPOINT unreachable: ...")``
anything else (4xx, TLS, bad configuration)            ``ObjectStoreError`` (not retried)
=====================================================  =================================

Metrics: ``object_{get,put,delete,head,list}`` latency histograms (``*_count``
is the number of successful calls, retries included in their latency),
``object_get_bytes``, ``object_put_bytes``, ``object_errors`` (calls that
failed for good), ``object_retries``.
"""
from __future__ import annotations

import logging
import os
import time
import urllib.parse
from typing import Any, Callable, Iterator, Optional, TypeVar

import boto3
import botocore
import botocore.exceptions as bex
from botocore.config import Config

from .. import metrics
from ..errors import AccessDenied, NoSuchBucket, NoSuchKey, ObjectStoreError
from .base import ObjectInfo, ObjectStore
from .retry import RetriesExhausted, RetryPolicy, TemporaryFailure, one_line, retry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: connect/read timeout cap (seconds) of the ``check(quick=True)`` probe
PROBE_TIMEOUT = 2.0

#: error codes that mean "slow down / try later"
THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "OperationAborted",
})
#: error codes that mean "your credentials are wrong or not allowed"
AUTH_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled", "InvalidClientTokenId",
    "AuthorizationHeaderMalformed", "AccountProblem",
})
#: botocore exceptions worth a retry: the network, the peer, or a garbled transfer
TEMP_EXCEPTIONS = (
    bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
    bex.ConnectionClosedError, bex.ResponseStreamingError, bex.IncompleteReadError,
    bex.ProxyConnectionError, bex.ChecksumError, bex.FlexibleChecksumError,
)


def parse_url(url: str) -> tuple[Optional[str], str]:
    """``(endpoint_url or None for AWS, bucket)`` of a storage URL; ValueError if malformed."""
    u = urllib.parse.urlsplit(url)
    hint = "use http://HOST:PORT/BUCKET, https://HOST/BUCKET or s3://BUCKET"
    if u.scheme not in ("http", "https", "s3"):
        raise ValueError(f"bad storage URL {url!r}: {hint}")
    if u.query or u.fragment or u.username or u.password:
        raise ValueError(f"bad storage URL {url!r}: no query, fragment or credentials allowed; {hint}")
    if u.scheme == "s3":
        bucket, rest = u.netloc, u.path.strip("/")
        endpoint = None
    else:
        if not u.hostname:
            raise ValueError(f"bad storage URL {url!r}: no host; {hint}")
        try:
            u.port  # noqa: B018 -- validates the port
        except ValueError:
            raise ValueError(f"bad storage URL {url!r}: bad port; {hint}") from None
        bucket, _, rest = u.path.strip("/").partition("/")
        endpoint = f"{u.scheme}://{u.netloc}"
    if not bucket:
        raise ValueError(f"bad storage URL {url!r}: no bucket; {hint}")
    if rest:
        raise ValueError(f"bad storage URL {url!r}: a path after the bucket is not supported; {hint}")
    return endpoint, bucket


class S3Store(ObjectStore):
    """Objects in one S3 bucket (see the module docstring)."""

    #: keys per LIST request (S3's maximum; tests lower it to exercise paging)
    list_page_size = 1000

    def __init__(self, url: str, access_key: str = "", secret_key: str = "", region: str = "", *,
                 max_pool: int = 32, connect_timeout: float = 3.0, read_timeout: float = 10.0,
                 retry_policy: Optional[RetryPolicy] = None,
                 check_policy: Optional[RetryPolicy] = None):
        """``retry_policy`` governs every request (default ``RetryPolicy()``: ~30 s);
        ``check_policy`` the ``check(quick=True)`` probe (default ``RetryPolicy.quick()``),
        which also uses timeouts of at most ``PROBE_TIMEOUT`` seconds.  Timeouts are per
        connect and per socket read, in seconds.  Raises ValueError for a malformed URL."""
        endpoint, self.bucket = parse_url(url)
        self.policy = retry_policy or RetryPolicy()
        self.check_policy = check_policy or RetryPolicy.quick()
        access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID", "")
        secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if bool(access_key) != bool(secret_key):
            raise AccessDenied(msg="incomplete credentials: give both --access-key and --secret-key")
        region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or "us-east-1")
        cfg = dict(
            region_name=region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool,
            retries={"total_max_attempts": 1},  # our retry.py does it
            tcp_keepalive=True,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="curvefs_py",
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        if not access_key and endpoint:
            cfg["signature_version"] = botocore.UNSIGNED
        kwargs: dict[str, Any] = dict(region_name=region)
        if endpoint:
            kwargs["endpoint_url"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["verify"] = False  # no TLS: ignore AWS_CA_BUNDLE & co.
        if access_key:
            kwargs.update(aws_access_key_id=access_key, aws_secret_access_key=secret_key)
        self._url = url
        self._client_kwargs = kwargs
        self._client_config = cfg
        self._client = self._make_client()
        self._probe_client: Optional[Any] = None
        self.endpoint = endpoint or self._client.meta.endpoint_url
        self.description = f"s3 {self.endpoint}/{self.bucket}"

    def _make_client(self, **config_overrides: Any) -> Any:
        cfg = dict(self._client_config, **config_overrides)
        try:
            return boto3.session.Session().client("s3", config=Config(**cfg), **self._client_kwargs)
        except bex.BotoCoreError as exc:
            raise ObjectStoreError(msg=f"cannot set up an S3 client for {self._url}: "
                                       f"{one_line(exc)}") from None

    # ---------------------------------------------------------------------- error mapping

    def _translate(self, exc: Exception, op: str, key: str) -> Exception:
        """The curvefs exception for a botocore one (TemporaryFailure if worth a retry)."""
        if isinstance(exc, bex.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
            detail = one_line(err.get("Message") or code or f"HTTP {status}")
            if code == "NoSuchBucket" or (op == "HEAD_BUCKET" and status == 404):
                return NoSuchBucket(msg=f"bucket {self.bucket} does not exist at {self.endpoint}")
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                return NoSuchKey(msg=f"object {key} not found in {self.description}")
            if code == "RequestTimeTooSkewed":
                return AccessDenied(msg=f"access denied by {self.endpoint}: this machine's clock "
                                        f"is off by more than 15 minutes")
            if status == 403 or code in AUTH_CODES:
                why = f" ({code})" if code and code != "403" else ""
                return AccessDenied(msg=f"access denied by {self.endpoint}{why}: "
                                        f"check --access-key/--secret-key")
            if status >= 500 or status in (408, 429) or code in THROTTLE_CODES:
                return TemporaryFailure(f"{code or 'HTTP'} {status}: {detail}")
            if status in (301, 307) or code in ("PermanentRedirect", "TemporaryRedirect"):
                return ObjectStoreError(msg=f"bucket {self.bucket} at {self.endpoint} is in another "
                                            f"region or endpoint: check --region / the URL")
            return ObjectStoreError(msg=f"{op} {key} on {self.description}: {code} {detail}")
        if isinstance(exc, TEMP_EXCEPTIONS):
            return TemporaryFailure(one_line(exc))
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError,
                            bex.CredentialRetrievalError)):
            return AccessDenied(msg=f"no usable credentials for {self.endpoint}: give --access-key/"
                                    f"--secret-key or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, bex.SSLError):
            return ObjectStoreError(msg=f"TLS failure talking to {self.endpoint}: {one_line(exc)}")
        if isinstance(exc, bex.BotoCoreError):
            return ObjectStoreError(msg=f"{op} {key} on {self.description}: {one_line(exc)}")
        return exc  # not botocore's: retry.is_temp_failure judges OSErrors, the rest propagate

    def _call(self, op: str, key: str, fn: Callable[[], T], policy: RetryPolicy,
              metric: str = "") -> T:
        """Blocking. ``fn()`` with error translation, retries and metrics."""

        def attempt() -> T:
            try:
                return fn()
            except Exception as exc:
                new = self._translate(exc, op, key)
                if new is exc:
                    raise
                raise new from exc

        def giveup(exc: BaseException, attempts: int, elapsed: float) -> BaseException:
            return RetriesExhausted(msg=f"{self.endpoint} unreachable: {op} {key}: {one_line(exc)} "
                                        f"(gave up after {attempts} attempts in {elapsed:.1f}s)")

        t0 = time.perf_counter()
        try:
            result = retry(attempt, what=f"{op} {key} on {self.description}", giveup=giveup,
                           **policy.kwargs())
        except Exception:
            metrics.inc("object_errors")
            raise
        metrics.observe_us(f"object_{metric or op.lower()}", (time.perf_counter() - t0) * 1e6)
        return result

    # -------------------------------------------------------------------------------- API

    def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        """Blocking. Bytes ``[off, off+limit)`` (``limit < 0``: to the end; ``b""`` past the end)."""
        return self._get(self._client, self.policy, key, off, limit)

    def put(self, key: str, data: bytes) -> None:
        """Blocking. Store the object (S3 PUTs are atomic; a retried PUT rewrites the same bytes)."""
        self._put(self._client, self.policy, key, data)

    def delete(self, key: str) -> None:
        """Blocking. Remove the object; a missing object is not an error."""
        self._delete(self._client, self.policy, key)

    def head(self, key: str) -> int:
        """Blocking. The object's size; NoSuchKey if missing."""
        resp = self._call("HEAD", key, lambda: self._client.head_object(Bucket=self.bucket, Key=key),
                          self.policy)
        return int(resp["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Blocking. Every object under ``prefix`` in key order, page by page."""
        token: Optional[str] = None
        start_after: Optional[str] = None
        while True:
            kwargs: dict[str, Any] = dict(Bucket=self.bucket, Prefix=prefix, MaxKeys=self.list_page_size)
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after:
                kwargs["StartAfter"] = start_after
            page = self._call("LIST", prefix, lambda: self._client.list_objects_v2(**kwargs), self.policy)
            contents = page.get("Contents") or []
            for obj in contents:
                modified = obj.get("LastModified")
                yield ObjectInfo(obj["Key"], int(obj["Size"]),
                                 modified.timestamp() if modified is not None else 0.0)
            if not page.get("IsTruncated") or not contents:
                return
            token = page.get("NextContinuationToken")
            start_after = contents[-1]["Key"]  # for servers that send no token

    def check(self, quick: bool = True) -> None:
        """Blocking. Prove the bucket exists and we may write, read and delete in it.

        ``quick`` (the default; format and mount) uses ``check_policy`` and a client whose
        timeouts are at most ``PROBE_TIMEOUT`` s, so an unreachable or hanging endpoint
        fails in seconds instead of after the full retry deadline."""
        if quick:
            if self._probe_client is None:
                self._probe_client = self._make_client(
                    connect_timeout=min(self._client_config["connect_timeout"], PROBE_TIMEOUT),
                    read_timeout=min(self._client_config["read_timeout"], PROBE_TIMEOUT),
                    max_pool_connections=2)
            client, policy = self._probe_client, self.check_policy
        else:
            client, policy = self._client, self.policy
        self._call("HEAD_BUCKET", self.bucket, lambda: client.head_bucket(Bucket=self.bucket), policy,
                   metric="head")
        key = f"probe/{os.urandom(8).hex()}"
        payload = b"curvefs probe"
        self._put(client, policy, key, payload)
        try:
            got = self._get(client, policy, key, 0, -1)
        except ObjectStoreError:
            try:
                self._delete(client, policy, key)
            except ObjectStoreError:
                pass  # report the GET failure, not the clean-up's
            raise
        self._delete(client, policy, key)
        if got != payload:
            raise ObjectStoreError(msg=f"{self.description}: probe object read back wrong")

    def close(self) -> None:
        """Blocking. Close the connection pools."""
        self._client.close()
        if self._probe_client is not None:
            self._probe_client.close()

    # -------------------------------------------------------------------------- internals

    def _get(self, client: Any, policy: RetryPolicy, key: str, off: int, limit: int) -> bytes:
        if limit == 0:
            return b""
        kwargs: dict[str, Any] = dict(Bucket=self.bucket, Key=key)
        ranged = off > 0 or limit > 0
        if ranged:
            kwargs["Range"] = f"bytes={off}-{off + limit - 1 if limit > 0 else ''}"

        def fetch() -> bytes:
            try:
                resp = client.get_object(**kwargs)
            except bex.ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416:
                    return b""  # the range starts at or past the end of the object
                raise
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            if ranged and resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200:
                # the server ignored Range and sent the whole object
                data = data[off:] if limit < 0 else data[off:off + limit]
            return data

        data = self._call("GET", key, fetch, policy)
        metrics.inc("object_get_bytes", len(data))
        return data

    def _put(self, client: Any, policy: RetryPolicy, key: str, data: bytes) -> None:
        body = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        self._call("PUT", key, lambda: client.put_object(Bucket=self.bucket, Key=key, Body=body), policy)
        metrics.inc("object_put_bytes", len(body))

    def _delete(self, client: Any, policy: RetryPolicy, key: str) -> None:
        try:
            self._call("DELETE", key, lambda: client.delete_object(Bucket=self.bucket, Key=key), policy)
        except NoSuchKey:
            pass  # S3 answers 204 for a missing key; some servers say 404
