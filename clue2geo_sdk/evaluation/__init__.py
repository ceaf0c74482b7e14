"""Evaluation: metrics, the evaluation run and confidence calibration."""
