"""A reward written in trl's style (called by keyword; takes what it names, the rest in **kwargs):

    reward:
      - source: examples/rewards/trl_style.py:short_digits
      - source: trl.rewards:think_format_reward          # trl's own functions work the same way
"""


def short_digits(completions, completion_ids=None, log_metric=None, **kwargs):
    """1.0 for a completion made of digits only, 0.0 otherwise; logs the mean sampled length where asked."""
    if log_metric is not None and completion_ids is not None:
        log_metric("tokens", sum(len(ids) for ids in completion_ids) / max(len(completion_ids), 1))
    return [float(text.strip().isdigit()) for text in completions]
