"""Sweeps: the sweep file (spec), its plan, scheduling on Ray / Slurm, trials, parent runs."""
