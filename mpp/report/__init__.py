"""Reading what runs and probes wrote: rows, tables, plots, curves, comparisons. Evaluates nothing."""
