"""The toolkit's base error and the errors the networks raise, at the bottom of the import graph.

policies/ imports nothing from alignment/ or reward/ (docs/architecture.md), so the base class every
error of the toolkit derives from lives here, the one module all three packages can import without a
circle: `reward.errors` builds `RewardError` on it, and `alignment.errors` re-exports every class, so
``from alignment.errors import X`` and ``except AlignmentError`` keep working and name the same objects.
"""


class AlignmentError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class RecipeError(AlignmentError):
    """A recipe file or override is invalid (unknown key, wrong type, out of range)."""


class CheckpointError(AlignmentError):
    """A checkpoint is missing, partial, unsafe (pickle) or does not match the run."""
