"""Code shipped to remote hosts, stdlib and rexplan.wire only: the agent and the relay."""
