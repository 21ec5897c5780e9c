"""Every bound the server enforces, in one dataclass.

The batcher reads the batch and queue sizes, the request checks read the token limits, the
HTTP layer reads the body limits and the connection layer (:mod:`.connections`) the header and
connection limits. ``prefixtune serve`` takes each as an option of the same name
(:class:`~prefixtune.serve.setup.ServeConfig` nests this dataclass, so its fields are declared
once). Each has an upper bound as well as a lower one: a value no machine could hold is refused
at start-up, in one line naming the option, rather than when the first request needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Checked, option_field


@dataclass
class Limits(Checked):
    """What the server accepts and holds at once.

    Args:
        max_batch: Most rows decoded together in one step.
        max_queue: Most requests waiting for a row; more are refused (429).
        max_prefill_tokens: Most prompt tokens (padded) prefilled between two steps, so a burst of
            long prompts cannot stall running requests for long.
        max_tokens: Largest ``max_tokens`` a request may ask for (400 above).
        max_prompt_tokens: Longest prompt, in tokens, after the chat template (413 above).
        max_body_mb: Largest request body in MiB (413 above, read no further).
        body_timeout: Seconds a client may take to send its body (then 408), so a client that stops
            mid-body does not hold a connection.
        max_header_kb: Largest request line plus headers in KiB (then 431 and the connection closes).
        header_timeout: Seconds a client may take to send its request line and headers, counted from
            the connection's opening or the end of its previous response (then it is closed).
        keep_alive_timeout: Seconds an idle connection stays open between two requests.
        max_connections: Most connections open at once; while more are open, every request is
            answered 503 at once.
    """

    max_batch: int = option_field(32, "most requests decoded together", ge=1, le=4096)
    max_queue: int = option_field(256, "most requests waiting; more get 429", ge=1, le=1 << 20)
    max_prefill_tokens: int = option_field(4096, "most prompt tokens (padded) prefilled between two decoding steps", ge=1,
                                   le=1 << 24)
    max_tokens: int = option_field(512, "largest max_tokens a request may ask", ge=1, le=1 << 24)
    max_prompt_tokens: int = option_field(2048, "longest prompt accepted (413 above)", ge=1, le=1 << 24)
    max_body_mb: float = option_field(1.0, "largest request body in MiB (413 above)", gt=0, le=1024)
    body_timeout: float = option_field(30.0, "seconds a client may take to send its request body (408 after)", gt=0,
                               le=3600)
    max_header_kb: int = option_field(16, "largest request line plus headers in KiB (431 above)", ge=1, le=1024)
    header_timeout: float = option_field(10.0, "seconds a client may take to send its request line and headers; then the "
                                 "connection is closed", gt=0, le=3600)
    keep_alive_timeout: float = option_field(5.0, "seconds an idle connection stays open between two requests", gt=0,
                                     le=3600)
    max_connections: int = option_field(2048, "most connections open at once; beyond it every request gets 503", ge=1,
                                le=1 << 20)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_header_bytes(self) -> int:
        return self.max_header_kb << 10
