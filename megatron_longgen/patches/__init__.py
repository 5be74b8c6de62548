"""Narrow, documented patches of Megatron-Core bugs hit by this project (never edits of its files).

Each patch names the upstream version it was written against, is applied explicitly by the code that needs
it, and is idempotent.
"""
