"""`reconciler healthcheck`: is the local daemon alive and ready? For container health checks."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from reconciler.config import Settings

# A daemon listening on every address is reached through loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - mapping, not binding


def local_base_url(settings: Settings) -> str:
    host = _WILDCARDS.get(settings.http_host, settings.http_host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http_port}"


def healthcheck(settings: Settings, *, timeout: float = 5.0) -> int:
    base = local_base_url(settings)
    for path in ("/healthz", "/readyz"):
        try:
            with urllib.request.urlopen(base + path, timeout=timeout) as response:  # noqa: S310 - fixed http URL
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            print(f"healthcheck: {base}{path} did not answer: {error}", file=sys.stderr)
            return 1
        if status != 200:
            print(f"healthcheck: {base}{path} answered {status}", file=sys.stderr)
            return 1
    print("healthy")
    return 0
