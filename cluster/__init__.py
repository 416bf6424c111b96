"""Cluster: bringing a farm up and down, and the `brandfarm` command line."""
