"""Images in: data sets (labelled or unlabelled), their sources (folders, shards, the hub, digits), labels
checked against classes, bounded reads and the held-out split. Imports mpp.core only."""
