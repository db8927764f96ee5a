"""Helpers shared by tests: launching multi-process runs (`dist.py`)."""
