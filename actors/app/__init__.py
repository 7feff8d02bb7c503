"""actors.app: the application: composition root, command line and embedded Redis.

:mod:`actors.app.daemon` wires the runtime, the stream service, the graph and telemetry
into one process; :mod:`actors.app.cli` is the ``ctxd`` command.
"""
