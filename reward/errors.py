"""The errors reward sources raise, importable without the pipeline (reward/ imports nothing from alignment/).

`AlignmentError`, the toolkit's one base class, lives in policies.errors, the bottom of the import graph
(docs/architecture.md: reward/ may import policies/, never the reverse); `RewardError` subclasses it, and
`alignment.errors` re-exports both, so every ``except AlignmentError`` of the pipeline catches a reward failure too.
"""

from policies.errors import AlignmentError  # noqa: F401 - re-exported: reward's callers catch it from here


class RewardError(AlignmentError):
    """A reward source failed, returned a non-finite value, or the wrong count."""
