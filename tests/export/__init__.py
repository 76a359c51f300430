"""Tests of vla_train/export: Hugging Face export and import, and the action server."""
