"""`align dashboard`: a local web page over a runs directory (alignment.dashboard.app, .runs, docs/dashboard.md).

Lists runs and pipelines with their state (running, resumable, finished, failed), draws their training curves
live from metrics.jsonl, opens evaluation reports, and puts checkpoints' completions to the same prompts side by
side.  Read-only: it never writes into a run directory.
"""
