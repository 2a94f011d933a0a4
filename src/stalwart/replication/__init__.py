"""Fault-tolerant replication across replica groups, on torchft: the Lighthouse, the
per-group Manager wrapper, the state transport for healing, and the supervisor that
starts and restarts groups on one machine."""

import os

# torchft's Rust side logs every quorum at INFO to stderr; keep warnings and errors only
# (set RUST_LOG=info to see them).
os.environ.setdefault("RUST_LOG", "warn")
