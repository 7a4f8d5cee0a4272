"""A reward written outside the toolkit, used by naming it in a recipe:

    reward:
      - source: examples/rewards/brevity.py:brevity
        weight: 0.1
"""


def brevity(prompts, completions, answer=None, **columns):
    """1.0 for an answer of at most 3 characters, falling linearly to 0.0 at 13; None for an empty answer."""
    return [None if not text.strip() else max(0.0, 1.0 - max(0, len(text.strip()) - 3) / 10) for text in completions]
