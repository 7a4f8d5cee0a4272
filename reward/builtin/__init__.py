"""Rule-based rewards, registered by name (`reward.registry.available()` lists them).

Importing this package registers: ``answer_match``, ``exact_match``,
``regex_match``, ``length_target``, ``repetition_penalty``. Each class's
docstring gives its formula; keyword arguments from a recipe's ``kwargs`` go to
the class constructor.
"""

from reward.builtin.answers import AnswerMatch, ExactMatch, RegexMatch
from reward.builtin.shape import LengthTarget, RepetitionPenalty

__all__ = ["AnswerMatch", "ExactMatch", "LengthTarget", "RegexMatch", "RepetitionPenalty"]
