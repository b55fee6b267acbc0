"""Evaluation: metrics (numpy), tasks (torch), datasets, the Ray runner and pictures."""
