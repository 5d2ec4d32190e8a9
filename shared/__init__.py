"""What both halves of cpt agree on: the dataset contract, config loading and the `cpt` dispatcher."""

__version__ = "0.1.0"
