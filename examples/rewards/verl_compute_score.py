"""A reward in verl's form (one sample per call; a float, or a dict whose "score" is the score):

    reward:
      - source: examples/rewards/verl_compute_score.py:compute_score
        convention: verl                       # optional: the signature already says so
        columns: {ground_truth: answer}        # verl's ground_truth is this dataset's answer column
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """1.0 when the completion's text is the reference answer, else 0.0, with the comparison in the dict."""
    correct = solution_str.strip() == str(ground_truth).strip()
    return {"score": float(correct), "acc": correct}
