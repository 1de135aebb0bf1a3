"""The adapter toolbox: tools that make a new adapter (or checkpoint) from library adapters."""
