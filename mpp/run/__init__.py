"""What one run is made of on disk and on its machines: the Accelerator and loaders (runtime), the run
directory and checkpoints, trackers, the optimizer and its schedule. Imports the layers below."""
