"""Operating fleetbus: watching the traffic, the board, the demo, the doctor.

Each command module has a ``add_arguments(parser)`` and a ``run(args)`` that
returns an exit code; :mod:`fleetbus.cli` registers them.
"""
