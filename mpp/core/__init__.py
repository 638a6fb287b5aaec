"""The bottom layer: errors, atomic files, configuration from dataclasses, provenance, seeds, signals and
locks. It imports nothing else of mpp."""
