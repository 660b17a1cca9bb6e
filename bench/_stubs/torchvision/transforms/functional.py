def to_tensor(*args, **kwargs):  # noqa: D103 - stub, see torchvision/__init__
    raise NotImplementedError("torchvision stub (bench.peers)")
