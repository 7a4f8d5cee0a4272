"""A reward in OpenRLHF's form (`--remote_rm_url reward_func.py`: a batch per call):

    reward:
      - source: examples/rewards/openrlhf_reward_func.py:reward_func
        convention: openrlhf                   # optional: the signature already says so
        columns: {labels: answer}              # OpenRLHF's labels are this dataset's answer column
"""

import torch


def reward_func(queries, prompts, labels):
    """1.0 when the query (prompt + completion) ends with the label, else 0.0; logs the query length."""
    rewards = torch.tensor([float(q.strip().endswith(str(label))) for q, label in zip(queries, labels)])
    lengths = torch.tensor([float(len(q)) for q in queries])
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"query_chars": lengths}}
