"""Toy replication of the paper's method comparison (OPSD vs SFT vs GRPO) on CPU in minutes."""
