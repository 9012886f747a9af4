"""Package data: the manifest JSON Schema."""
