"""Stand-in for domainbed.datasets: the registry functions and upstream's Debug28 (random data, no download)."""
import torch
from torch.utils.data import TensorDataset

DATASETS = ["Debug28"]


def get_dataset_class(dataset_name):
    if dataset_name not in globals():
        raise NotImplementedError(f"Dataset not found: {dataset_name}")
    return globals()[dataset_name]


def num_environments(dataset_name):
    return len(get_dataset_class(dataset_name).ENVIRONMENTS)


class Debug28:
    """As upstream's: 3 environments of 16 random (3, 28, 28) images, 2 classes."""
    N_STEPS = 5
    CHECKPOINT_FREQ = 100
    INPUT_SHAPE = (3, 28, 28)
    ENVIRONMENTS = ["0", "1", "2"]

    def __init__(self, root, test_envs, hparams):
        self.input_shape = self.INPUT_SHAPE
        self.num_classes = 2
        self.datasets = [TensorDataset(torch.randn(16, *self.INPUT_SHAPE), torch.randint(0, 2, (16,)))
                         for _ in self.ENVIRONMENTS]

    def __getitem__(self, index):
        return self.datasets[index]

    def __len__(self):
        return len(self.datasets)
