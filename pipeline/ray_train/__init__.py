"""Ray Train: the cluster connection and the training runs of the selector and the VLM projector."""
