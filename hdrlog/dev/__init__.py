"""Developer tools, not the product: the network-namespace lab (``lab``) and ``make demo`` (``demo``)."""
