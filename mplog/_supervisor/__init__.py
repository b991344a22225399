"""The main process's side of a service: ``service`` (``LogService``, ``ServiceHandler``: the
spool, the exit hook), ``supervisor`` (starts, watches and restarts the listener), ``health``
and the console relay (``console``). The only room that may import the other three; see
docs/architecture.md."""
