"""What every process of a service shares: the configuration, the shared counters, the spool's
layout (rings, owner file), the wire format of a record (``record``, ``format``) and the control
FIFO's frames (``transport``). Imports nothing else of mplog; see docs/architecture.md."""
