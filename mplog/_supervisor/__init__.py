"""The main process's side of a service: ``service`` (``LogService``, ``ServiceHandler``) and the
rooms of one run (``run``, ``spooldir``, ``fileset``, ``mainlog``, ``children``, ``ending``);
``supervisor``, the state machine that starts, watches and restarts the listener, with its
parts (``process``, ``restart``, ``flush``, ``relay``, ``probe``, ``healthfile``); ``health``
and the console (``console``). The only room that may import ``_app``; see
docs/architecture.md."""
