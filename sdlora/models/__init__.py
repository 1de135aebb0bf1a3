"""Base models: loading (hub id, folder, single file), the hub rules, and the model families."""
