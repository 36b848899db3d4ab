"""`histod health`: ask a running service's ``/healthz`` (histod.daemon.metrics) and say what it answered.

Standard library only (urllib): the command must be quick and must work where the service's own dependencies
are the problem."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
"""a service listening on every address is asked on loopback"""


@dataclass(frozen=True)
class Answer:
    ok: bool
    url: str
    status: str  # ok, failing, unreachable, invalid
    checks: dict[str, dict[str, str]] = field(default_factory=dict)
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "url": self.url, "status": self.status, "checks": self.checks, "detail": self.detail}

    def text(self) -> str:
        head = f"{'healthy' if self.ok else 'unhealthy'}: {self.url} {self.status}"
        lines = [head + (f": {self.detail}" if self.detail else "")]
        for name, check in self.checks.items():
            lines.append(f"  {name:<9} {check.get('state', '?'):<8} {check.get('detail', '')}")
        return "\n".join(lines)


def url_for(address: str, port: int) -> str:
    host = LOOPBACK.get(address, address)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"


def ask(address: str, port: int, timeout_s: float = 5.0) -> Answer:
    """GET /healthz: 200 is healthy, 503 unhealthy (with the checks); no answer is unhealthy too."""
    url = url_for(address, port)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            code, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Answer(
            False,
            url,
            "unreachable",
            detail=f"nothing answers ({reason}): is `histod serve` running with metrics_port {port}?",
        )
    try:
        data = json.loads(body)
        checks = {str(k): {str(a): str(b) for a, b in v.items()} for k, v in data["checks"].items()}
        status = str(data["status"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return Answer(False, url, "invalid", detail=f"HTTP {code}, not histod's health answer")
    return Answer(code == 200 and status == "ok", url, status, checks)
