"""Evaluation: metrics, the experiment runner and its reports."""
