class VisionDataset:  # noqa: D101 - stub, see __init__
    pass


class CIFAR10(VisionDataset):  # noqa: D101
    pass
