"""The one policy for records that cannot be read (a file gone, a truncated image, bad base64):
skipped, counted and named, up to a cap, the same in training, evaluation and embedding.

    limit = max_bad_limit(max_bad, n)        # --max-bad / data.max_bad; None or -1: the default
    if count > limit: raise TooManyBadRecords(too_many(count, n, limit, first, what="images"))
    print(skipped_line(count, n, first, what="images", listed="results.json"), file=sys.stderr)

The default cap is ``default_max_bad(n)``: 1% of the records read, at least 5. Evaluation and
embedding know ``n`` up front; training counts against the records read so far (a stream). A run
that skipped anything says so in one line on stderr (``skipped_line``), beside the full list in
its results (``bad_images`` of ccj-eval's JSON, the ``bad`` rows of ccj-embed's shards, the
trainer's ``stats``).
"""

from __future__ import annotations

__all__ = ["TooManyBadRecords", "default_max_bad", "max_bad_limit", "too_many", "skipped_line"]


class TooManyBadRecords(ValueError):
    """More records failed to read than the cap allows; the message (one line) names the first."""


def default_max_bad(n: int) -> int:
    """Bad records tolerated among n: 1%, at least 5."""
    return max(5, int(n) // 100)


def max_bad_limit(max_bad: int | None, n: int) -> int:
    """The cap in force: ``max_bad`` when given (>= 0), else ``default_max_bad(n)``."""
    return default_max_bad(n) if max_bad is None or int(max_bad) < 0 else int(max_bad)


def too_many(count: int, n: int, limit: int, first: str, *, what: str = "records", flag: str = "--max-bad") -> str:
    """The one line of ``TooManyBadRecords``."""
    return f"more than {limit} of {n} {what} could not be read ({flag} {limit}; {count} so far); first: {first}"


def skipped_line(count: int, n: int, first: str, *, what: str = "records", listed: str = "") -> str:
    """The one warning line a run prints on stderr when it skipped anything."""
    where = f"; all listed in {listed}" if listed else ""
    return f"warning: {count} of {n} {what} could not be read and were skipped (first: {first}){where}"
