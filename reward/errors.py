"""The errors reward sources raise, importable without the pipeline (reward/ imports nothing from alignment/).

`AlignmentError` is the toolkit's one base class: it lives here, at the bottom of the import graph, so that
`RewardError` can subclass it; `alignment.errors` re-exports both, and every ``except AlignmentError`` of the
pipeline catches a reward failure too.
"""


class AlignmentError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class RewardError(AlignmentError):
    """A reward source failed, returned a non-finite value, or the wrong count."""
