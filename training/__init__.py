"""Dataset builder and the three LoRA stages (issue: training)."""
