"""How the launcher reaches hosts: SSH, local, pacing, pooled and kept connections."""
