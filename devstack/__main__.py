"""`python -m devstack` is the `outrider` command."""

from devstack.cli import main

main(prog_name="outrider")
