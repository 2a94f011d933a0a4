"""Sharding a model over the ranks of a launch (FSDP2)."""
