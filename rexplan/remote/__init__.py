"""Code shipped to remote hosts; stdlib only."""
