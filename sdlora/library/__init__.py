"""The adapter library on disk and the adapter file formats."""
