"""The pure core: manifest loading and checks, frozen records, planning; no I/O."""
