"""Reinforcement learning with verifiable rewards (GRPO and its variants) on a trained model."""
