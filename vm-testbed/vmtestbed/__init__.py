"""vm-testbed: virtual clusters in network namespaces, with real wire protocols and virtual BMCs."""
