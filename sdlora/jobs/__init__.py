"""The training queue: jobs on disk, run one at a time."""
