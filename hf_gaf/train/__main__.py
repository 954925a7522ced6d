"""`python -m hf_gaf.train`: the paper's image-classification runs (see `hf_gaf.train.cli`)."""

from .cli import cli

cli()
