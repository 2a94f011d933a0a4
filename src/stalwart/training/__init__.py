"""The training loop and what it composes: optimizer and schedule, evaluation, run directory."""
