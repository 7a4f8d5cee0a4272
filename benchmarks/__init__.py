"""Benchmarks: every stage of the toolkit against its peer (plain trl; trl 1.12.0 for PPO), in one run.

    python -m benchmarks run [--stage sft,reward_model,dpo,grpo,rloo,ppo] [--preset 1m,20m]
                             [--repeats 3] [--steps N] [--output benchmarks/results/]

See benchmarks/README.md.  Importing this package imports nothing heavy: the
PPO peer runs modules of it inside another virtual environment.
"""
