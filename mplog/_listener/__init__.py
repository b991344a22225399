"""The listener process (``python -m mplog._listener CONFIG``): the only code that opens,
writes or closes the log files. One module per job: ``loop`` the loop and the wiring of the
parts (``Listener``), ``intake`` the record path from the rings to the files (``Intake``),
``batch`` the formatting of a batch (``Batch``), ``journal`` the batch journal, ``files`` the
two files, ``control`` the protocol with the supervisor (``Control``), ``ends`` the processes
of the service and the records of their ends (``Ends``), ``exits`` the watch over how each
process ends, ``shutdown`` the last drain and the final counts (``Shutdown``), ``vitals`` the
listener's own figures for health, ``syslog`` the forwarder. Imports only ``_common``; see
docs/architecture.md."""
