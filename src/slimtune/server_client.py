"""What `slimtune status` and `slimtune learn` send to a running `slimtune serve` (urllib: no extra dependency;
standard library only, so it sits at the bottom of the layers)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from slimtune.errors import SlimtuneError


def call(url: str, path: str, token: str | None = None, body: dict | None = None, timeout: float = 30) -> dict:
    request = urllib.request.Request(url.rstrip("/") + path, method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error")
        except ValueError:
            detail = None
        raise SlimtuneError(f"{url}{path}: HTTP {e.code} {detail or e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SlimtuneError(f"{url}{path}: {getattr(e, 'reason', e)}") from None


def fetch_status(url: str, token: str | None = None) -> dict:
    return call(url, "/v1/status", token)


def request_reload(url: str, token: str | None = None, model_dir: str | None = None, timeout: float = 120) -> dict:
    return call(url, "/admin/reload", token, {"model_dir": model_dir} if model_dir else {}, timeout=timeout)
