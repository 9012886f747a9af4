"""The relay of tree fan-out: on a relay host, launch its subtree's steps over OpenSSH.

Stdlib only, Python >= 3.8, shipped as one script (rexplan.transport.shipping.relay_source())
that the launcher (rexplan.engine.fanout) or the relay above runs as ``python3 -I -S -c
BOOTSTRAP <sha256> <name>``. Launch lines hold no key: every agent proves itself to the root
launcher directly.
"""
