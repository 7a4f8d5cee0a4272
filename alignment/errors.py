"""The toolkit's own error types.

Every failure a user can cause (a bad recipe, a malformed data row, a reward
source that misbehaves) ends in one of these, with a message naming the file,
row, key or source, never in a traceback from deep inside a library.
"""


# The base class and the reward errors live in reward.errors (reward/ imports nothing from alignment/)
from reward.errors import AlignmentError, RewardError  # noqa: F401 - re-exported


class RecipeError(AlignmentError):
    """A recipe file or override is invalid (unknown key, wrong type, out of range)."""


class DataError(AlignmentError):
    """A dataset is missing, malformed, or empty after filtering."""


class CheckpointError(AlignmentError):
    """A checkpoint is missing, partial, unsafe (pickle) or does not match the run."""


class TrainingError(AlignmentError):
    """Training cannot go on (repeated non-finite losses, health thresholds crossed)."""
