"""What every part of a job shares, below both the training loop and the supervisor: the
run directory contract (rundir), the progress display (progress) and the goodput
accounting (goodput). Nothing here imports training/ or replication/."""
