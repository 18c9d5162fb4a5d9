"""GR-2 Serve training: demonstrations in the sim, the dataset format, the training stages."""
