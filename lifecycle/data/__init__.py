"""Data: the built-in world and readers for users' own files and hub datasets."""
