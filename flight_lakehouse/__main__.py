"""Entry point for ``python -m flight_lakehouse``."""

from flight_lakehouse.cli import main

main()
