"""Volume maintenance run from the command line (``gc``, ``fsck``): meta and object together."""
