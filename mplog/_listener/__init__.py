"""The listener process (``python -m mplog._listener CONFIG``): the only code that opens,
writes or closes the log files. ``loop`` is the loop and its rooms, ``files`` the two files,
``journal`` the batch journal, ``exits`` the watch over how each process ends, ``syslog`` the
forwarder. Imports only ``_common``; see docs/architecture.md."""
