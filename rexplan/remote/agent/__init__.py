"""The agent rex ships to hosts: start a program, probe it, call the launcher back, supervise it.

Stdlib only (and rexplan.wire), Python >= 3.8; rexplan.transport.shipping bundles this package
with rexplan/wire into one script whose entry is front.main(). Secrets (the key, the launch
nonce) never appear in argv or the environment.
"""
