"""Sub-commands of the ``macopt`` command line, one module each."""
