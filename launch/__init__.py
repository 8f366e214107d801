"""The command line, local multi-rank launch and SLURM submission (``bertforge``)."""
