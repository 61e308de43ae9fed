"""What goes wrong upstream, in words an operator and a client can act on."""

from __future__ import annotations

FINAL_5XX = frozenset({501, 505})  # a server that cannot do this at all will not learn it by a retry


class UpstreamError(Exception):
    """The upstream could not give us what we asked: unreachable, timed out, or said no.

    ``status`` is the upstream's HTTP status when it answered, ``None`` when it did not; ``kind``
    sorts failures for metrics: ``timeout``, ``connection``, ``status``, ``idle``, ``protocol`` or
    ``loop``; ``retry_after`` is what the upstream's ``Retry-After`` asked, in seconds; *lasting* marks a
    failure that a retry cannot heal whatever its kind (a document too large, no upstream configured).
    ``final`` marks an error the retry policy already gave up on (no caller retries it again).
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        kind: str | None = None,
        retry_after: float | None = None,
        lasting: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind or ("status" if status is not None else "connection")
        self.retry_after = retry_after
        self.lasting = lasting
        self.final = False

    @property
    def transient(self) -> bool:
        """Worth retrying: no answer, 408, 429 or a 5xx (but 501 and 505; a request loop never heals)."""
        if self.lasting or self.kind == "loop":
            return False
        if self.status is None:
            return True
        return self.status in (408, 429) or (self.status >= 500 and self.status not in FINAL_5XX)

    def after(self, attempts: int) -> UpstreamError:
        """The same failure, given up on after *attempts* tries (said in the message when more than one)."""
        message = self.message if attempts <= 1 else f"{self.message} (after {attempts} attempts)"
        final = UpstreamError(message, self.status, self.kind, self.retry_after, self.lasting)
        final.final = True
        return final
