"""What a browser test of a page checks besides the page itself: every error the page meets, every host it
asks, every dialog it opens (each dismissed, so a page cannot hang a test on one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class PageWatch:
    errors: list[str] = field(default_factory=list)  # console errors and warnings, uncaught exceptions, failed
    hosts: set[str] = field(default_factory=set)  # requests and HTTP statuses ≥ 400; hosts by name, or the
    dialogs: list[str] = field(default_factory=list)  # scheme for data: and file: addresses


def watch(page) -> PageWatch:
    """Attach the listeners to a Playwright ``page`` before it loads anything."""
    seen = PageWatch()
    page.on("console", lambda m: seen.errors.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: seen.errors.append(f"page error: {exc}"))
    page.on("requestfailed", lambda r: seen.errors.append(f"request failed: {r.url[:80]}"))
    page.on("response", lambda r: seen.errors.append(f"HTTP {r.status}: {r.url[:80]}") if r.status >= 400 else None)
    page.on("request", lambda r: seen.hosts.add(urlsplit(r.url).hostname or urlsplit(r.url).scheme))
    page.on("dialog", lambda d: (seen.dialogs.append(d.message), d.dismiss()))
    return seen
