"""The pull engine: one fetch per blob, parallel ranges, resume, verification, progress."""
