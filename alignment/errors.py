"""The toolkit's own error types.

Every failure a user can cause (a bad recipe, a malformed data row, a reward
source that misbehaves) ends in one of these, with a message naming the file,
row, key or source, never in a traceback from deep inside a library.
"""

# The base class and the errors policies/ and reward/ raise live in those packages (they import nothing from
# alignment/: docs/architecture.md); they are re-exported here, the same class objects, so the pipeline has one
# place to import every error from.
from policies.errors import AlignmentError, CheckpointError, RecipeError  # noqa: F401 - re-exported
from reward.errors import RewardError  # noqa: F401 - re-exported


class DataError(AlignmentError):
    """A dataset is missing, malformed, or empty after filtering."""


class TrainingError(AlignmentError):
    """Training cannot go on (repeated non-finite losses, health thresholds crossed)."""
