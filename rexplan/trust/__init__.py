"""Keys and host keys: the key store, distribution, audit."""
