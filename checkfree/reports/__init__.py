"""Results -> the paper's units: ``table2`` (hours to target per strategy and rate, with CIs). The command
line of the comparison tables is ``checkfree.analysis``."""
