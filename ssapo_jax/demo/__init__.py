"""The embedded CPU demo (README command 1)."""
