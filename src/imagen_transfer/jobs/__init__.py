"""The jobs: whole experiments composed from the components one level up (the command line, the demo, the
transfer study, run reports). Nothing outside this sub-package imports from it (`tests/test_layers.py`)."""
