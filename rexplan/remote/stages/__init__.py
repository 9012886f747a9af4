"""The first stages of an agent run: scripts rexplan.transport.shipping sends as text."""
