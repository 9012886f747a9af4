"""The wire format shared with the agent: stdlib only, shipped to hosts."""
