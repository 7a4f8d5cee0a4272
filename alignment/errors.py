"""The toolkit's own error types.

Every failure a user can cause (a bad recipe, a malformed data row, a reward
source that misbehaves) ends in one of these, with a message naming the file,
row, key or source, never in a traceback from deep inside a library.
"""


class AlignmentError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class RecipeError(AlignmentError):
    """A recipe file or override is invalid (unknown key, wrong type, out of range)."""


class DataError(AlignmentError):
    """A dataset is missing, malformed, or empty after filtering."""


class RewardError(AlignmentError):
    """A reward source failed, returned a non-finite value, or the wrong count."""


class CheckpointError(AlignmentError):
    """A checkpoint is missing, partial, unsafe (pickle) or does not match the run."""


class TrainingError(AlignmentError):
    """Training cannot go on (repeated non-finite losses, health thresholds crossed)."""
