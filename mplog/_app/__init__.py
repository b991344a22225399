"""What runs in the application's processes, every process that logs: the handler and its ring
writer (``handler``), what a process leaves for the listener to read about its death
(``process``), the opt-in capture of stdout and stderr (``output``) and the capture of pool
workers made without mplog's initializer (``capture``). Imports only ``_common``; importing it
costs a worker what ``logging.handlers`` costs. See docs/architecture.md."""
